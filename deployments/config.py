"""Typed settings of each stage. They arrive as `user_config` and can change without restarting a replica."""

from __future__ import annotations

import ipaddress

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from bcnn.answers import DEFAULT_WATERBIRD_THRESHOLD
from bcnn.backend_names import BackendName
from bcnn.images import DEFAULT_MAX_PIXELS


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PreprocessorConfig(_Strict):
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, gt=0, description="largest image decoded (width x height)")


class ClassifierConfig(_Strict):
    checkpoint: str = Field("default", description="'default' (embedded Lite0), a registry name, or a file path")
    classes_file: str | None = Field(None, description="class list for a 2019 service checkpoint")
    waterbird_threshold: float = Field(DEFAULT_WATERBIRD_THRESHOLD, ge=0.0, le=1.0)
    # The model's own (its weights entry or checkpoint, `bcnn.species`) unless set: 7.87 for the embedded default.
    species_threshold: float | None = Field(None, description="largest answer-class logit below which a waterbird "
                                            "is answered as a species the model does not know; none: the model's")
    # On a CPU core 1-4 images per pass cost about the same per image (docs/performance.md, "Results"); a GPU
    # takes 32 or more.
    max_batch_size: int = Field(8, ge=1, le=256, description="images per forward pass")
    batch_wait_timeout_s: float = Field(0.003, ge=0.0, le=1.0, description="wait for more images to merge")
    # ONNX Runtime is the faster of the two on a CPU for every model served (docs/performance.md, "Results"); on
    # CUDA `auto` keeps torch.
    backend: BackendName = Field("auto", description="where the forward pass runs: auto is ONNX Runtime on the CPU, "
                                 "torch on CUDA")
    threads: int = Field(1, ge=1, le=64, description="intra-op threads; more replicas beat more threads")


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
