"""Custom metrics, exported by Ray with the `ray_` prefix next to Serve's own (dashboard, Prometheus).

Each stage creates its own set inside its replica; Serve adds the deployment, replica and application tags.
"""

from __future__ import annotations

from ray.serve.metrics import Counter, Gauge, Histogram

LATENCY_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]
BATCH_SIZES = [1, 2, 4, 8, 16, 32, 64, 128]
PIXELS = [1e5, 3e5, 1e6, 3e6, 1e7, 3e7, 1e8]


class IngressMetrics:
    def __init__(self) -> None:
        self.requests = Counter("waterbirds_requests", description="HTTP requests by route and outcome "
                                "(ok, client_error, overloaded, server_error)", tag_keys=("route", "outcome"))
        self.predictions = Counter("waterbirds_predictions", description="Answers by top species and verdict",
                                   tag_keys=("species", "is_waterbird"))
        self.latency = Histogram("waterbirds_request_latency_ms", description="Whole /classify request, ms",
                                 boundaries=LATENCY_MS)

    def request(self, route: str, status: int) -> None:
        if status < 400:
            outcome = "ok"
        elif status == 503:
            outcome = "overloaded"
        elif status < 500:
            outcome = "client_error"
        else:
            outcome = "server_error"
        self.requests.inc(tags={"route": route, "outcome": outcome})


class PreprocessorMetrics:
    def __init__(self) -> None:
        self.latency = Histogram("waterbirds_preprocess_latency_ms", description="Decode and resize, ms",
                                 boundaries=LATENCY_MS)
        self.pixels = Histogram("waterbirds_image_pixels", description="Uploaded image size (width x height)",
                                boundaries=PIXELS)


class ClassifierMetrics:
    def __init__(self) -> None:
        self.latency = Histogram("waterbirds_inference_latency_ms", description="Forward pass of one batch, ms",
                                 boundaries=LATENCY_MS)
        self.batch_size = Histogram("waterbirds_batch_size", description="Images per forward pass",
                                    boundaries=BATCH_SIZES)
        self.load_seconds = Gauge("waterbirds_model_load_seconds", description="Time the current model took to load")
        self.model = Gauge("waterbirds_model_info", description="1 for the model this replica serves",
                           tag_keys=("model", "version", "device", "backend"))
