"""The ingress deployment: the HTTP app's pipeline. Bytes go to a Preprocessor, its uint8 tensor straight on
to a Classifier (the ingress never receives it), the small answer comes back."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.types import ASGIApp

from deployments.config import IngressConfig
from deployments.messages import Classified, ModelCard
from deployments.metrics import IngressMetrics
from serve_app.http import build_http_app

log = logging.getLogger("ray.serve")

HEALTH_TIMEOUT_S = 5.0
_REPLICA_LOST = (ActorDiedError, ActorUnavailableError)


@serve.deployment(name="Ingress", user_config={}, ray_actor_options={"num_cpus": 0.5})
@serve.ingress()
class Ingress:
    def __init__(self, preprocessor: DeploymentHandle, classifier: DeploymentHandle) -> None:
        self.preprocessor = preprocessor
        self.classifier = classifier
        self.config = IngressConfig()
        self._card: ModelCard | None = None
        self._card_lock = asyncio.Lock()

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.config = IngressConfig(**user_config)

    def __serve_build_asgi_app__(self) -> ASGIApp:
        return build_http_app(self, IngressMetrics())

    async def model_card(self, *, seen_version: str | None = None) -> ModelCard:
        """The classifiers' model: its preprocessing travels with every request to the preprocessors. Fetched
        again once a response shows a version other than the cached one (a swap landed), once per swap."""
        async with self._card_lock:
            if self._card is None or (seen_version is not None and self._card.version != seen_version):
                self._card = await self.classifier.card.remote()
            return self._card

    async def classify(self, data: bytes, top_k: int) -> Classified:
        card = await self.model_card()
        try:
            result = await self._run(data, card, top_k)
        except _REPLICA_LOST as e:
            # The replica died mid-request (a crash, a node gone): the bytes are still here, so try once more;
            # Serve routes around the dead replica.
            log.warning("replica lost (%s); retrying once", type(e).__name__)
            result = await self._run(data, card, top_k)
        if result.model_version != card.version:
            await self.model_card(seen_version=result.model_version)
        return result

    async def _run(self, data: bytes, card: ModelCard, top_k: int) -> Classified:
        prepared = self.preprocessor.remote(data, card.preprocess)
        return await self.classifier.remote(prepared, top_k)

    async def health(self) -> dict[str, object]:
        """Each stage answers (one replica of each is asked), plus Serve's view of every deployment, so that a
        replica lost and being replaced shows as "degraded" while the service still answers."""

        async def check(name: str, call: Any) -> tuple[str, str]:
            try:
                async with asyncio.timeout(HEALTH_TIMEOUT_S):
                    await call
                return name, "ok"
            except Exception as e:  # noqa: BLE001 - any failure means the stage is not serving
                return name, f"unavailable: {type(e).__name__}: {str(e).strip().splitlines()[-1][:200]}"

        stages = dict(await asyncio.gather(check("preprocessor", self.preprocessor.check_health.remote()),
                                           check("classifier", self.classifier.card.remote())))
        deployments = await self._deployments()
        if not all(v == "ok" for v in stages.values()):
            status = "unavailable"
        elif any(d["status"] != "HEALTHY" for d in deployments.values()):
            status = "degraded"
        else:
            status = "ok"
        return {"status": status, "stages": {"ingress": "ok", **stages}, "deployments": deployments}

    async def _deployments(self) -> dict[str, dict[str, object]]:
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT_S):
                status = await asyncio.to_thread(serve.status)
        except Exception:  # noqa: BLE001 - the controller's view is extra detail, not a health condition
            return {}
        app = status.applications.get(serve.get_replica_context().app_name)
        if app is None:
            return {}
        return {name: {"status": str(d.status.value), "running": d.replica_states.get("RUNNING", 0),
                       "starting": d.replica_states.get("STARTING", 0)}
                for name, d in app.deployments.items()}
