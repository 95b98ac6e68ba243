"""The ingress deployment: the pipeline behind the HTTP face (`serve_app.http`). It admits uploads (fairly among
clients, `serve_app.admission`), chooses the model that answers each (`serve_app.candidates`), gathers those in
flight into batches, sends each batch's bytes to a Preprocessor in one call per model and its pixels from there to
a Classifier in one call (through Ray's object store, the ingress handing on a reference, or through the ingress),
and hands each upload's answer back; it sends an upload again where a replica was lost under it, or where a swap
to a model of another input size landed while it was decoded. Shadow requests go after the shown answer.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any

import ray
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.types import ASGIApp, Scope

from bcnn.allocator import keep_freed_memory
from bcnn.images import ImageError
from deployments.config import IngressConfig
from deployments.messages import (
    CALL_BUDGET_BYTES,
    Catalog,
    Classified,
    ModelCard,
    ModelUnavailable,
    Outcome,
    PreparedForAnotherModel,
)
from deployments.metrics import IngressMetrics
from serve_app.admission import Admission, Limits, Overloaded, RefusalLog
from serve_app.candidates import Comparisons, Route, resolve, route
from serve_app.client_identity import ClientIdentity, haproxy_appends_forwarded_for, parse_networks
from serve_app.http import build_http_app

log = logging.getLogger("ray.serve")

HEALTH_TIMEOUT_S = 5.0
_REPLICA_LOST = (ActorDiedError, ActorUnavailableError)
# Batches of uploads in flight from one ingress replica at once: enough to keep a Preprocessor and several
# Classifiers busy at the same time. More ingress replicas give more.
CONCURRENT_BATCHES = 4
# An upload is sent on only if its deadline leaves this many times the recent time a batch took.
DEADLINE_MARGIN = 2.0
# Sends of an upload again, decoded each time for the model the Classifiers serve now, before it is refused (503).
RESENDS_DURING_A_SWAP = 4
# An upload naming a model the cached catalog lacks fetches it again at most this often (one may have been added).
CATALOG_RECHECK_S = 1.0
# Phones' model files kept here, one per model asked for, the least recently asked dropped first.
PHONE_FILES_KEPT = 4


@dataclass(frozen=True)
class _Upload:
    data: bytes
    top_k: int
    request_id: str
    deadline: float = float("inf")  # time.monotonic() by which it must be answered
    model: str = ""  # the model that answers it; "": the default


@serve.deployment(name="Ingress", user_config={}, ray_actor_options={"num_cpus": 0.5})
@serve.ingress()
class Ingress:
    def __init__(self, preprocessor: DeploymentHandle, classifier: DeploymentHandle) -> None:
        keep_freed_memory()  # messages of a few MB each: reuse their buffers instead of page-faulting new ones
        self.preprocessor = preprocessor
        self.classifier = classifier
        # The two ways a batch can travel (`IngressConfig.pixels_by_reference`): by reference, the Preprocessor's
        # result stays in Ray's object store, the ingress hands the Classifier a reference and the Classifier maps
        # the pixels; by value, they come back here and go on in Serve's gRPC messages.
        self._stages = {True: (preprocessor.options(_by_reference=True), classifier.options(_by_reference=True)),
                        False: (preprocessor, classifier)}
        self.config = IngressConfig()
        self.admission = Admission(admission_limits(self.config))
        self.identity = ClientIdentity()
        self._refusals = RefusalLog()
        # Serve's proxies run on the cluster's nodes; HAProxy's word is taken only if it appends X-Forwarded-For.
        self._nodes_are_proxies = haproxy_appends_forwarded_for()
        if not self._nodes_are_proxies:
            log.warning("Serve's HAProxy does not run through waterbirds-haproxy (RAY_SERVE_HAPROXY_BINARY_PATH), so "
                        "it appends no X-Forwarded-For: every client behind it counts as one for fair admission")
        self._refresh_nodes()
        self._catalog: Catalog | None = None
        self._catalog_at = 0.0
        self._catalog_lock = asyncio.Lock()
        self._phone_files: OrderedDict[str, bytes] = OrderedDict()  # sha256 -> the ONNX file served to phones
        self._batch_s = 0.0  # recent time from a batch's dispatch to its answers, smoothed
        self.metrics = IngressMetrics()
        self.comparisons = Comparisons(self.metrics)
        self._shadows: set[asyncio.Task[None]] = set()

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.config = IngressConfig(**user_config)
        self.admission.limits = admission_limits(self.config)
        self.identity.set_trusted(networks=parse_networks(self.config.trusted_proxies))
        self._pipeline.set_max_batch_size(self.config.max_batch_size)
        self._pipeline.set_batch_wait_timeout_s(self.config.batch_wait_timeout_s)

    async def check_health(self) -> None:
        """Called by Serve's controller every few seconds: nodes that joined the cluster since are trusted too."""
        try:
            await asyncio.to_thread(self._refresh_nodes)
        except Exception as e:  # noqa: BLE001 - the nodes known before stay trusted; this replica is still healthy
            log.warning("could not list the cluster's nodes: %s", e)

    def _refresh_nodes(self) -> None:
        if self._nodes_are_proxies:  # HAProxy reaches a replica on its own node through loopback
            self.identity.set_trusted(nodes=["127.0.0.1", "::1",
                                             *(node["NodeManagerAddress"] for node in ray.nodes() if node["Alive"])])

    def __serve_build_asgi_app__(self) -> ASGIApp:
        return build_http_app(self, self.metrics)

    async def catalog(self, *, seen: Classified | None = None, routed: str = "", refresh: bool = False) -> Catalog:
        """The classifiers' models: each one's preprocessing travels with every request to the preprocessors.
        Fetched again once an answer (`seen`, of an upload sent to the model `routed`, "" for the default) shows a
        model or version other than the cached one (a swap landed), once per swap, or when asked (`/models`,
        `/labels`: the backend can change without a new version)."""
        async with self._catalog_lock:
            cached = self._catalog
            if refresh or cached is None or (seen is not None and _stale(cached, seen, routed)):
                self._catalog = await self.classifier.catalog.remote()
                self._catalog_at = time.monotonic()
            return self._catalog  # type: ignore[return-value]

    async def _catalog_for(self, model: str | None) -> Catalog:
        catalog = await self.catalog()
        if model and model not in catalog.cards and time.monotonic() - self._catalog_at > CATALOG_RECHECK_S:
            catalog = await self.catalog(refresh=True)  # added since, or loaded by a redeploy since it failed
        return catalog

    async def phone_model_info(self, model: str | None = None) -> dict[str, object] | None:
        """The model a phone saves for offline use (`bcnn.phone`) to stand in for `model` (default: the default),
        without the file; None where none is offered."""
        max_bytes = self.config.phone_model_max_bytes
        if max_bytes == 0:
            return None
        name = resolve(model, await self._catalog_for(model)) if model else ""
        return await self.classifier.phone_model_info.remote(max_bytes, name)

    async def phone_model_file(self, sha256: str, model: str | None = None) -> bytes | None:
        """The phone's model file by its hash, kept here once fetched (phones download it once per model); None
        for a file the classifiers no longer give."""
        if sha256 in self._phone_files:
            self._phone_files.move_to_end(sha256)
            return self._phone_files[sha256]
        max_bytes = self.config.phone_model_max_bytes
        data = await self.classifier.phone_model_data.remote(sha256, max_bytes, model or "") if max_bytes else None
        if data is not None:
            self._phone_files[sha256] = data
            while len(self._phone_files) > PHONE_FILES_KEPT:
                self._phone_files.popitem(last=False)
        return data

    def client_of(self, scope: Scope) -> str:
        return self.identity.client_of(scope)

    async def admit(self, client: str) -> None:
        try:
            await self.admission.enter(client)
        except Overloaded as e:
            self._refusals.refused(e, self.admission)
            raise

    def release(self, client: str, *, answered: bool) -> None:
        self.admission.release(client, answered=answered)

    async def classify(self, data: bytes, top_k: int, request_id: str, deadline: float, client: str,
                       model: str | None = None) -> Classified:
        """An admitted upload's answer from `model` (or the default, or their candidate), once it has had its turn
        into the pipeline (`Admission.turn`)."""
        chosen = await self._route(model)
        upload = _Upload(data, top_k, request_id, deadline, chosen.model)
        async with self.admission.turn(client):
            try:
                outcome = await self._pipeline(upload)
            except Exception as e:
                if not replica_lost(e):
                    raise
                # A replica died mid-request (a crash, a node gone): the bytes are still here, so try once more;
                # Serve routes around the dead replica.
                log.warning("replica lost (%s); retrying once", type(e).__name__)
                outcome = await self._pipeline(upload)
            # While Classifier replicas swap one by one, a resend can reach one still serving the other model; and an
            # upload this replica routed to a model a redeploy just removed (a candidate promoted) is routed again.
            for _ in range(RESENDS_DURING_A_SWAP):
                if isinstance(outcome, PreparedForAnotherModel):
                    await self.catalog(refresh=True)
                elif isinstance(outcome, ModelUnavailable) and model is None:
                    await self.catalog(refresh=True)
                    chosen = await self._route(None)
                    upload = replace(upload, model=chosen.model)
                else:
                    break
                outcome = await self._pipeline(upload)
        if isinstance(outcome, ImageError | Overloaded | ModelUnavailable):
            raise outcome
        if isinstance(outcome, PreparedForAnotherModel):
            raise Overloaded("the model is being swapped", self.admission.retry_after_s())
        await self.catalog(seen=outcome, routed=upload.model)  # a swap to the same input size shows here
        if chosen.shadow is not None:
            self._shadow(replace(upload, deadline=float("inf")), chosen.shadow, outcome)
        return outcome

    async def _route(self, model: str | None) -> Route:
        """Where an upload goes (`serve_app.candidates.route`); the default is sent as "" (the Classifier's own
        default), so that a redeploy that changes which model is the default needs no word from this replica."""
        catalog = await self._catalog_for(model)
        chosen = route(model, catalog, self.config.candidates)
        return replace(chosen, model="") if model is None and chosen.model == catalog.default else chosen

    def _shadow(self, upload: _Upload, candidate: str, shown: Classified) -> None:
        """Send `upload` to `candidate` too, in the background, and compare its answer with `shown`: only while the
        pipeline has room (`Admission.limits.floor` uploads held at most) and fewer than `max_shadows_in_flight`
        are out, so that a shadow never takes a place an upload needs."""
        busy = self.admission.held >= self.admission.limits.floor
        if busy or len(self._shadows) >= self.config.max_shadows_in_flight:
            self.comparisons.dropped(shown.model_name, candidate)
            return

        async def ask() -> None:
            start = time.monotonic()
            try:
                outcome = await self._pipeline(replace(upload, model=candidate))
            except Exception as e:  # noqa: BLE001 - a shadow's failure is counted, never seen by the client
                log.warning("shadow request to %s failed: %s: %s", candidate, type(e).__name__, e)
                outcome = None
            if isinstance(outcome, Classified):
                self.comparisons.compare(shown.model_name, candidate, shown.answer, outcome.answer,
                                         (time.monotonic() - start) * 1000)
            else:
                self.comparisons.dropped(shown.model_name, candidate)

        task = asyncio.get_running_loop().create_task(ask())
        self._shadows.add(task)
        task.add_done_callback(self._shadows.discard)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0, max_concurrent_batches=CONCURRENT_BATCHES)
    async def _pipeline(self, uploads: list[_Upload]) -> list[Outcome | Overloaded]:
        # An upload that waited so long it would be answered after its deadline is refused before it costs a
        # decode or a forward pass: admission by time makes this rare, and it keeps a 504 from ever being the
        # answer to a wait.
        late = past_deadline(uploads, now=time.monotonic(), batch_s=self._batch_s)
        if not any(late):
            return await self._answer(uploads)
        log.warning("%d uploads would miss their deadline; refused before decoding", sum(late))
        live = [u for u, too_late in zip(uploads, late, strict=True) if not too_late]
        answers = iter(await self._answer(live) if live else [])
        retry_after = self.admission.retry_after_s()
        return [Overloaded("its deadline would pass", retry_after) if too_late else next(answers) for too_late in late]

    async def _answer(self, uploads: list[_Upload]) -> list[Outcome]:
        """Each model's uploads in calls of their own (its input size; a forward pass never mixes models)."""
        start = time.monotonic()
        catalog = await self.catalog()
        by_model: dict[str, list[int]] = {}
        for i, upload in enumerate(uploads):
            by_model.setdefault(upload.model, []).append(i)

        async def answer(model: str, positions: list[int]) -> list[Outcome]:
            card = catalog.cards.get(model or catalog.default)
            if card is None:  # removed by a redeploy since the upload was routed
                return [ModelUnavailable(model, catalog.failed.get(model, "not served now"))] * len(positions)
            side = card.preprocess.crop_size
            parts = split_by_bytes([uploads[i] for i in positions], pixel_bytes=3 * side * side,
                                   budget=CALL_BUDGET_BYTES)
            outcomes = await asyncio.gather(*(self._prepare_and_classify(part, card, model) for part in parts))
            return list(itertools.chain.from_iterable(outcomes))

        answered = await asyncio.gather(*(answer(model, positions) for model, positions in by_model.items()))
        outcomes: list[Outcome] = [None] * len(uploads)  # type: ignore[list-item]
        for positions, results in zip(by_model.values(), answered, strict=True):
            for i, outcome in zip(positions, results, strict=True):
                outcomes[i] = outcome
        self._batch_s += 0.2 * (time.monotonic() - start - self._batch_s)
        return outcomes

    async def _prepare_and_classify(self, uploads: list[_Upload], card: ModelCard, model: str) -> list[Outcome]:
        preprocessor, classifier = self._stages[self.config.pixels_by_reference]
        prepared = preprocessor.remote([u.data for u in uploads], card.preprocess, tuple(u.request_id for u in uploads))
        return await classifier.remote(prepared, tuple(u.top_k for u in uploads), model)

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
                                           check("classifier", self.classifier.catalog.remote())))
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


def _stale(catalog: Catalog, seen: Classified, routed: str) -> bool:
    card = catalog.cards.get(seen.model_name)
    return card is None or card.version != seen.model_version or (not routed and seen.model_name != catalog.default)


def past_deadline(uploads: list[_Upload], *, now: float, batch_s: float) -> list[bool]:
    """Which uploads would be answered after their deadline if sent on now, a batch having recently taken `batch_s`."""
    return [u.deadline - now < DEADLINE_MARGIN * batch_s for u in uploads]


def admission_limits(config: IngressConfig) -> Limits:
    # Below `floor` uploads held the pipeline is not yet full, and the wait is no more than one batch's.
    return Limits(max_wait_s=config.max_queue_wait_s, max_pending=config.max_pending,
                  floor=config.max_batch_size * CONCURRENT_BATCHES, min_retry_after_s=config.retry_after_s,
                  door_wait_s=config.door_wait_s, min_client_share=config.min_client_share,
                  over_share_door_wait_s=config.request_timeout_s - config.max_queue_wait_s - config.door_wait_s)


def replica_lost(error: BaseException) -> bool:
    """A replica of some stage died under this request. With pixels passed by reference, a Preprocessor lost
    after its call was sent fails the Classifier's call too: Serve raises a `RayServeException` then, caused by
    the Preprocessor's `ActorDiedError`."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, _REPLICA_LOST):
            return True
        cause = cause.__cause__
    return False


def split_by_bytes(uploads: list[_Upload], *, pixel_bytes: int, budget: int) -> list[list[_Upload]]:
    """Consecutive parts of a batch whose upload bytes plus decoded pixels stay within `budget` each, so that no
    call between stages is ever too large, whatever the batch size, upload size or model input size."""
    parts: list[list[_Upload]] = [[]]
    size = 0
    for upload in uploads:
        cost = len(upload.data) + pixel_bytes
        if parts[-1] and size + cost > budget:
            parts.append([])
            size = 0
        parts[-1].append(upload)
        size += cost
    return parts
