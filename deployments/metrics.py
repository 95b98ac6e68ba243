"""Custom metrics, exported by Ray with the `ray_` prefix next to Serve's own (dashboard, Prometheus).

Each stage creates its own set inside its replica; Serve adds the deployment, replica and application tags.
"""

from __future__ import annotations

from ray.serve.metrics import Counter, Gauge, Histogram

LATENCY_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]
BATCH_SIZES = [1, 2, 4, 8, 16, 32, 64, 128]
PIXELS = [1e5, 3e5, 1e6, 3e6, 1e7, 3e7, 1e8]
# Shorter than Ray's shortest report interval (1 s; 10 s by default), so every export carries the gauges.
GAUGE_REFRESH_S = 1.0


class IngressMetrics:
    def __init__(self) -> None:
        self.requests = Counter("waterbirds_requests", description="HTTP requests by route and outcome "
                                "(ok, client_error, over_share, overloaded, server_error: serve_app.http.outcome_of)",
                                tag_keys=("route", "outcome"))
        self.predictions = Counter("waterbirds_predictions", description="Answers by top species and verdict",
                                   tag_keys=("species", "is_waterbird"))
        self.latency = Histogram("waterbirds_request_latency_ms", description="Whole /classify request, ms",
                                 boundaries=LATENCY_MS)


class PreprocessorMetrics:
    def __init__(self) -> None:
        self.latency = Histogram("waterbirds_preprocess_latency_ms", description="Decode and resize, ms",
                                 boundaries=LATENCY_MS)
        self.pixels = Histogram("waterbirds_image_pixels", description="Uploaded image size (width x height)",
                                boundaries=PIXELS)


class ClassifierMetrics:
    def __init__(self) -> None:
        self.latency = Histogram("waterbirds_inference_latency_ms", description="Forward pass of one batch, from "
                                 "staging to ranked answers (the wait behind the pass before it included), ms",
                                 boundaries=LATENCY_MS)
        self.batch_size = Histogram("waterbirds_batch_size", description="Images per forward pass",
                                    boundaries=BATCH_SIZES)
        self.load_seconds = Gauge("waterbirds_model_load_seconds", description="Time the current model took to load")
        self.model = Gauge("waterbirds_model_info", description="1 for the model this replica serves",
                           tag_keys=("model", "version", "device", "backend"))
        self._serving: tuple[dict[str, str], float] | None = None

    def serving(self, model: dict[str, str], load_seconds: float) -> None:
        """The model this replica now serves (`model` holds the info gauge's tags), until the next call."""
        if self._serving is not None and self._serving[0] != model:
            self.model.set(0, tags=self._serving[0])
        self._serving = (model, load_seconds)
        self.refresh()

    def refresh(self) -> None:
        """Sets the serving model's gauges again. Ray exports a gauge's value once after each set and its metrics
        agent forgets it two report intervals later (20 s by default), so a value set once at load would vanish
        from Prometheus and the dashboard; the replica calls this every `GAUGE_REFRESH_S`."""
        if self._serving is not None:
            model, load_seconds = self._serving
            self.model.set(1, tags=model)
            self.load_seconds.set(load_seconds)
