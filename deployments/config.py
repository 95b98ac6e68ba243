"""Typed settings of each stage. They arrive as `user_config` and can change without restarting a replica."""

from __future__ import annotations

import ipaddress
import re

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from bcnn.answers import DEFAULT_WATERBIRD_THRESHOLD
from bcnn.backend_names import BackendName
from bcnn.images import DEFAULT_MAX_PIXELS


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PreprocessorConfig(_Strict):
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, gt=0, description="largest image decoded (width x height)")


MODEL_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class ModelConfig(_Strict):
    """One model a Classifier serves: what to load and the rules its answers follow."""

    checkpoint: str = Field("default", description="'default' (embedded Lite0), a registry name, or a file path")
    classes_file: str | None = Field(None, description="class list for a 2019 service checkpoint")
    waterbird_threshold: float = Field(DEFAULT_WATERBIRD_THRESHOLD, ge=0.0, le=1.0)
    # The model's own (its weights entry or checkpoint, `bcnn.species`) unless set: 7.87 for the embedded default.
    species_threshold: float | None = Field(None, description="largest answer-class logit below which a waterbird "
                                            "is answered as a species the model does not know; none: the model's")
    # ONNX Runtime is the faster of the two on a CPU for every model served (docs/performance.md, "Results"); on
    # CUDA `auto` keeps torch.
    backend: BackendName = Field("auto", description="where the forward pass runs: auto is ONNX Runtime on the CPU, "
                                 "torch on CUDA")


class ClassifierConfig(ModelConfig):
    """The default model (the fields it shares with `ModelConfig`), the models served beside it by name, and the
    replica's batching and threads, which every model shares."""

    name: str | None = Field(None, pattern=MODEL_NAME, description="the default model's name in ?model= and "
                             "answers; none: its weights' name")
    # Every replica holds every model (docs/serving.md, "Several models"): a request for any of them never waits
    # for a load, and a GPU replica serves them all.
    models: dict[str, ModelConfig] = Field({}, description="more models served beside the default, by name")
    # On a CPU core 1-4 images per pass cost about the same per image (docs/performance.md, "Results"); a GPU
    # takes 32 or more.
    max_batch_size: int = Field(8, ge=1, le=256, description="images per forward pass")
    batch_wait_timeout_s: float = Field(0.003, ge=0.0, le=1.0, description="wait for more images to merge")
    threads: int = Field(1, ge=1, le=64, description="intra-op threads; more replicas beat more threads")

    @field_validator("models")
    @classmethod
    def _model_names(cls, value: dict[str, ModelConfig]) -> dict[str, ModelConfig]:
        for name in value:
            if not re.match(MODEL_NAME, name):
                raise ValueError(f"model name {name!r}: letters, digits, '.', '_' and '-', at most 64")
        return value

    def model(self) -> ModelConfig:
        """The default model's own settings."""
        return ModelConfig(**self.model_dump(include=set(ModelConfig.model_fields)))


class Candidate(_Strict):
    """A model answering for another on a share of its uploads, or beside it in the background."""

    model: str = Field(pattern=MODEL_NAME, description="the candidate: a model the Classifiers serve")
    share: float = Field(0.0, ge=0.0, le=1.0, description="fraction of the model's uploads the candidate answers "
                         "instead (a canary)")
    shadow: float = Field(0.0, ge=0.0, le=1.0, description="fraction of the model's uploads also sent to the "
                          "candidate in the background: its answer never shown, compared with the shown one")


class IngressConfig(_Strict):
    default_top_k: int = Field(5, ge=1, le=100)
    # Uploads in flight are gathered into one call per stage: Serve's cost per call is paid once per batch.
    max_batch_size: int = Field(8, ge=1, le=256, description="uploads per call to the Preprocessor and Classifier")
    batch_wait_timeout_s: float = Field(0.0, ge=0.0, le=1.0, description="wait for a batch to fill")
    # Admission by time (serve_app.admission): the budget holds on any machine; the count only bounds memory.
    max_queue_wait_s: float = Field(20.0, gt=0, description="admit an upload only if those held can be answered "
                                    "within this, at the rate this replica answers now; else 503 before its body")
    max_pending: int = Field(1024, ge=1, description="uploads held at once at most, whatever the wait (memory); "
                             "as many more may wait at the door")
    # Clients that send again the moment they are refused would otherwise spin on refusals, and their retries take
    # the CPU the answers need; held at the door, each costs one refusal per door_wait_s at most.
    door_wait_s: float = Field(2.0, ge=0, description="an upload that cannot be admitted waits this long at the "
                               "door, unread, for a place to free up, before it is refused")
    # Fair admission (serve_app.admission): one client with hundreds of connections gets its share, and 429 past it.
    min_client_share: int = Field(8, ge=1, description="places a client may always hold while the service has "
                                  "room, however many clients share it")
    trusted_proxies: tuple[str, ...] = Field((), description="networks (CIDR) of proxies in front of the service, "
                                             "such as a load balancer, whose X-Forwarded-For is believed; the "
                                             "cluster's nodes and loopback are, where their proxy appends it")
    # The offline page (docs/offline.md): the model a phone saves is the served one up to this size, else the default.
    phone_model_max_mb: float = Field(40.0, ge=0, description="largest served model a phone saves for offline use "
                                      "(float32 MB); a larger one is answered for by the embedded default; 0: none")
    max_body_mb: float = Field(20.0, gt=0, le=512, description="request bodies larger than this get 413")
    request_timeout_s: float = Field(30.0, gt=0, description="whole request, upload included")
    upload_read_timeout_s: float = Field(15.0, gt=0, description="time allowed to receive the body")
    retry_after_s: int = Field(1, ge=0, description="least Retry-After sent with a 503; it is the expected wait")
    # Through Ray's object store the pixels skip the ingress and the Classifier maps them instead of receiving
    # them: less CPU per request where a GPU node is capped, a few ms more latency per request on a small CPU
    # (docs/serving.md, "Messages between stages").
    pixels_by_reference: bool = Field(True, description="pixels go Preprocessor -> Classifier through the object "
                                      "store; false: in gRPC messages through the ingress")
    # Routing among the models the Classifiers serve (docs/serving.md, "Several models"): an upload naming no model,
    # or naming one of these, may be answered by its candidate instead, or also sent to it in the background.
    candidates: dict[str, Candidate] = Field({}, description="model name -> its candidate (canary share, shadow)")
    # Shadow requests use spare capacity only: past this many in flight per replica, more are dropped and counted.
    max_shadows_in_flight: int = Field(8, ge=0, description="shadow requests in flight at once at most")

    @property
    def phone_model_max_bytes(self) -> int:
        """`phone_model_max_mb` in bytes: the largest model's float32 weights a phone saves (`bcnn.phone`)."""
        return int(self.phone_model_max_mb * 2**20)

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for network in value:  # a ValueError names the bad one; pydantic reports it with the field's name
            ipaddress.ip_network(network, strict=False)
        return value

    @model_validator(mode="after")
    def _wait_within_timeout(self) -> IngressConfig:
        if self.max_queue_wait_s + self.door_wait_s >= self.request_timeout_s:
            raise ValueError("max_queue_wait_s + door_wait_s must be shorter than request_timeout_s: an upload "
                             "admitted to wait that long would time out")
        return self
