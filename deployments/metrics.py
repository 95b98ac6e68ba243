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
        self.predictions = Counter("waterbirds_predictions", description="Answers by model, top species and "
                                   "verdict", tag_keys=("model", "species", "is_waterbird"))
        self.latency = Histogram("waterbirds_request_latency_ms", description="Whole /classify request, ms",
                                 boundaries=LATENCY_MS)
        # Shadows (serve_app.candidates): a candidate's answers compared with the shown ones, never shown.
        self.shadow_compared = Counter("waterbirds_shadow_compared", description="Shadow answers compared with the "
                                       "shown model's, by measure (top1, is_waterbird, species_known) and agreement",
                                       tag_keys=("model", "candidate", "measure", "agreed"))
        self.shadow_dropped = Counter("waterbirds_shadow_dropped", description="Shadow requests not sent (the "
                                      "service busy) or failed", tag_keys=("model", "candidate"))
        self.shadow_latency = Histogram("waterbirds_shadow_latency_ms", description="A shadow request through the "
                                        "pipeline, ms", boundaries=LATENCY_MS, tag_keys=("model", "candidate"))


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
                                 boundaries=LATENCY_MS, tag_keys=("model",))
        self.batch_size = Histogram("waterbirds_batch_size", description="Images per forward pass",
                                    boundaries=BATCH_SIZES, tag_keys=("model",))
        self.load_seconds = Gauge("waterbirds_model_load_seconds", description="Time each model took to load",
                                  tag_keys=("model",))
        self.model = Gauge("waterbirds_model_info", description="1 for each model this replica serves",
                           tag_keys=("model", "version", "device", "backend"))
        self._serving: dict[str, dict[str, str]] = {}
        self._load_seconds: dict[str, float] = {}

    def loaded(self, model: str, load_seconds: float) -> None:
        self._load_seconds[model] = load_seconds

    def serving(self, models: dict[str, dict[str, str]]) -> None:
        """The models this replica now serves, by name (each holds the info gauge's tags), until the next call."""
        for name, tags in self._serving.items():
            if models.get(name) != tags:
                self.model.set(0, tags=tags)
        self._serving = models
        self._load_seconds = {name: s for name, s in self._load_seconds.items() if name in models}
        self.refresh()

    def refresh(self) -> None:
        """Sets the serving models' gauges again. Ray exports a gauge's value once after each set and its metrics
        agent forgets it two report intervals later (20 s by default), so a value set once at load would vanish
        from Prometheus and the dashboard; the replica calls this every `GAUGE_REFRESH_S`."""
        for name, tags in self._serving.items():
            self.model.set(1, tags=tags)
            if name in self._load_seconds:
                self.load_seconds.set(self._load_seconds[name], tags={"model": name})
