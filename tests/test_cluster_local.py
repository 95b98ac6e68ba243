"""serve_config.yaml on a real multi-node Ray cluster on this machine (cluster/local.sh), laid out like production:
placement on CPU and GPU nodes, HTTP through HAProxy on the head to ingress replicas on another node, and a GPU
node stopped while requests flow.

With the head-failure tests (tests/test_cluster_head_failure.py), the multi-node tests: `make test-long`, which
`.ci/run` runs after `make test` (a cluster of four raylets on this machine takes about two minutes of the 15 the
suite may take)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from load.loadgen import BackgroundLoad, Upload
from serve_app.run import DASHBOARD_URL, cli, ray_running
from tests.conftest import Photo
from tests.service import ENV, REDIS_MISSING, ROOT, Service

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.long]
LOCAL = ROOT / "cluster" / "local.sh"


def _local(*args: str) -> None:
    subprocess.run([str(LOCAL), *args], env=ENV, check=True, capture_output=True, timeout=300)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    if ray_running(ENV):
        raise RuntimeError("A Ray cluster is already running here; stop it (`.venv/bin/ray stop`) first.")
    if shutil.which("redis-server") is None:
        pytest.skip(REDIS_MISSING)
    try:
        _local("up")
        service = Service("http://127.0.0.1:8000", tmp_path_factory.mktemp("cluster"))
        service.wait_running()
        yield service
    finally:
        subprocess.run([str(LOCAL), "down"], env=ENV, capture_output=True, timeout=120)


def _nodes(service: Service) -> dict[str, dict]:
    nodes = service.dashboard("/api/v0/nodes?detail=1&limit=100").json()["data"]["result"]["result"]
    return {n["node_id"]: n for n in nodes if n["state"] == "ALIVE"}


def _replicas(service: Service, deployment: str) -> list[dict]:
    app = service.dashboard("/api/serve/applications/").json()["applications"]["waterbirds"]
    return [r for r in app["deployments"][deployment]["replicas"] if r["state"] == "RUNNING"]


def test_classifiers_run_one_per_gpu_node_and_serve(cluster: Service, mapped_photos: list[Photo]) -> None:
    nodes = _nodes(cluster)
    gpu_nodes = {i for i, n in nodes.items() if n["resources_total"].get("GPU", 0) >= 1}
    assert len(nodes) == 4 and len(gpu_nodes) == 2
    head = [n for n in nodes.values() if n["is_head_node"]][0]
    assert head["resources_total"].get("GPU", 0) == 0 and head["resources_total"].get("head_node") == 1
    assert head["resources_total"].get("CPU", 0) == 0  # no replica lands on the head
    classifiers = _replicas(cluster, "Classifier")
    assert len(classifiers) == 2
    assert {r["node_id"] for r in classifiers} == gpu_nodes  # only on GPU nodes, one per node
    names = {next(k for k in nodes[r["node_id"]]["resources_total"] if k.startswith("gpu_node_")) for r in classifiers}
    assert names == {"gpu_node_1", "gpu_node_2"}
    for photo in mapped_photos[:4]:
        response = httpx.post(cluster.url + "/classify", content=photo.path.read_bytes(),
                              headers={"Content-Type": "image/jpeg"}, timeout=60)
        assert response.status_code == 200 and response.json()["predictions"][0]["label"] == photo.imagenet_label
    # Each replica saw the GPU Ray gave it on its own node: logical GPU 0 of that node.
    for records in cluster.replica_logs("Classifier").values():
        assert any("CUDA_VISIBLE_DEVICES='0'" in r["message"] for r in records)


def test_the_heads_haproxy_forwards_to_ingress_replicas_on_another_node(cluster: Service,
                                                                        mapped_photos: list[Photo]) -> None:
    nodes = _nodes(cluster)
    [cpu_node] = [i for i, n in nodes.items() if n["resources_total"].get("cpu_node")]
    ingresses = _replicas(cluster, "Ingress")
    assert ingresses and {r["node_id"] for r in ingresses} == {cpu_node}
    assert {r["node_id"] for r in _replicas(cluster, "Preprocessor")} == {cpu_node}
    [listener] = [c for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.laddr.port == 8000]
    assert psutil.Process(listener.pid).name() == "haproxy"  # not Serve's Python proxy

    photo = mapped_photos[0]
    response = httpx.post(cluster.url + "/classify", content=photo.path.read_bytes(), timeout=60,
                          headers={"Content-Type": "image/jpeg", "X-Request-ID": "through-the-head"})
    assert response.status_code == 200 and response.json()["predictions"][0]["label"] == photo.imagenet_label
    answered_by = {replica for replica, records in cluster.replica_logs("Ingress").items()
                   if any(r.get("request_id") == "through-the-head" and "access" in r for r in records)}
    assert answered_by and answered_by <= {r["replica_id"] for r in ingresses}


def test_stopping_a_gpu_node_under_load_loses_no_request(cluster: Service, photos: list[Photo]) -> None:
    uploads = [Upload(p.path.name, p.path.read_bytes()) for p in photos[:30]]
    with BackgroundLoad(cluster.url + "/classify", uploads, users=8) as load:
        time.sleep(5)
        _local("stop-worker", "1")
        time.sleep(20)  # requests keep flowing on the other GPU node
    result = load.result
    assert result is not None
    assert result.statuses == {200: len(result.outcomes)}, result.summary()
    assert len(result.outcomes) > 30

    _local("start-worker", "1")  # Serve restores the replica count on the returning node
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len(_replicas(cluster, "Classifier")) < 2:
        time.sleep(3)
    assert len(_replicas(cluster, "Classifier")) == 2
    assert httpx.get(cluster.url + "/healthz", timeout=30).status_code == 200


def test_a_whole_collection_spreads_over_the_nodes(cluster: Service, photos: list[Photo], tmp_path: Path) -> None:
    """`waterbirds-classify` on the cluster (docs/batch.md): with Serve shut down and the GPUs free, Ray's state API
    shows its model actors' work on both GPU nodes and its decoding on the CPU node, and every photo has its record.
    Last in the module: it shuts Serve down."""
    subprocess.run([*cli("serve"), "shutdown", "-y", "--address", DASHBOARD_URL], env=ENV, check=True,
                   capture_output=True, timeout=120)
    out = tmp_path / "predictions.jsonl"
    run = subprocess.run([sys.executable, "-m", "batch", str(photos[0].path.parent), "--out", str(out), "--address",
                          "auto", "--batch-size", "16", "--no-progress"], env=ENV, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(out.read_text().splitlines()) == len(photos)

    nodes = _nodes(cluster)
    gpu_nodes = {i for i, n in nodes.items() if n["resources_total"].get("GPU", 0) >= 1}
    [cpu_node] = [i for i, n in nodes.items() if n["resources_total"].get("cpu_node")]
    tasks = cluster.dashboard("/api/v0/tasks?detail=1&limit=10000").json()["data"]["result"]["result"]

    def worked_on(stage: str) -> set[str]:
        return {t["node_id"] for t in tasks
                if t["type"] == "ACTOR_TASK" and f"({stage})" in t["name"] and t["state"] == "FINISHED"}

    assert worked_on("Classify") == gpu_nodes and len(gpu_nodes) == 2
    assert worked_on("Decode") == {cpu_node}
