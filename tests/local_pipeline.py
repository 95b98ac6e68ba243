"""The ingress's interface (`serve_app.http.Pipeline`) over the model in this process, for the HTTP face's tests
without Ray: the real admission, client identity and routing among models (`serve_app.candidates`), the real
decoding and the embedded default's forward pass with its rules, served under each name in `names` (the first the
default); no batching, no replicas. `hold` keeps uploads in the pipeline until it is set."""

from __future__ import annotations

import asyncio
import time

import torch
from starlette.types import Scope

from bcnn.models import get_weights
from bcnn.phone import parameter_bytes
from bcnn.predict import Predictor
from bcnn.preprocess import load_image
from deployments.config import IngressConfig
from deployments.messages import Catalog, Classified, ModelCard
from serve_app.admission import Admission, Limits
from serve_app.candidates import Comparisons, route
from serve_app.client_identity import ClientIdentity
from serve_app.ingress import admission_limits


class LocalPipeline:
    def __init__(self, config: IngressConfig | None = None, *, limits: Limits | None = None,
                 names: tuple[str, ...] = ("waterbirds-imagenet",), failed: dict[str, str] | None = None) -> None:
        self.config = config or IngressConfig()
        self.admission = Admission(limits or admission_limits(self.config))
        self.identity = ClientIdentity()
        self.identity.set_trusted(nodes=["127.0.0.1"])  # as behind HAProxy on this node
        self.weights = get_weights("default")
        self.predictor = Predictor(self.weights)
        size = parameter_bytes(self.weights)
        self._catalog = Catalog(names[0], {name: ModelCard(name, self.weights.version, self.predictor.labels,
                                                           self.weights.preprocess, str(self.predictor.device),
                                                           self.predictor.backend.name, size) for name in names},
                                dict(failed or {}))
        self.comparisons = Comparisons()
        self.hold: asyncio.Event | None = None
        self.in_pipeline = 0

    def client_of(self, scope: Scope) -> str:
        return self.identity.client_of(scope)

    async def admit(self, client: str) -> None:
        await self.admission.enter(client)

    def release(self, client: str, *, answered: bool) -> None:
        self.admission.release(client, answered=answered)

    async def classify(self, data: bytes, top_k: int, request_id: str, deadline: float, client: str,
                       model: str | None = None) -> Classified:
        chosen = route(model, self._catalog, self.config.candidates)
        async with self.admission.turn(client):
            self.in_pipeline += 1
            try:
                if self.hold is not None:
                    await self.hold.wait()
                start = time.perf_counter()
                loaded = load_image(data, self.weights.preprocess)
                decoded = time.perf_counter()
                logits = self.predictor.logits(torch.from_numpy(loaded.pixels[None]).permute(0, 3, 1, 2))
                answer = self.predictor.rank(logits, top_k).answer(0, self.predictor.labels, top_k)
                return Classified(answer.to_dict(), chosen.model, self.weights.version,
                                  (decoded - start) * 1000, (time.perf_counter() - decoded) * 1000, 1)
            finally:
                self.in_pipeline -= 1

    async def catalog(self, *, refresh: bool = False) -> Catalog:
        return self._catalog

    async def phone_model_info(self, model: str | None = None) -> dict[str, object] | None:
        return None  # the phone's model: tests/test_phone.py and tests/test_offline_page.py

    async def phone_model_file(self, sha256: str, model: str | None = None) -> bytes | None:
        return None

    async def health(self) -> dict[str, object]:
        return {"status": "ok", "stages": {"ingress": "ok", "preprocessor": "ok", "classifier": "ok"},
                "deployments": {}}
