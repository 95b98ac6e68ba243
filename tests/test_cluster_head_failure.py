"""The head node dies under load, on the local multi-node cluster (cluster/local.sh): with the GCS's state in Redis
the replicas on the other nodes keep answering and a restarted head takes the cluster back as it was; without it
(the control) the restarted head is a new, empty cluster.

Long tests (two clusters, about five minutes): `make test-long`, which `.ci/run` runs after `make test`."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from load.loadgen import BackgroundLoad, LoadResult, Upload
from serve_app.run import cli, ray_running
from tests.conftest import Photo
from tests.service import ENV, REDIS_MISSING, ROOT, Service

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.long]
LOCAL = ROOT / "cluster" / "local.sh"
DEPLOYED = Path("/tmp/waterbirds-local-cluster.yaml")  # what local.sh deployed
OUTAGE_S = 20


def _local(*args: str, gcs_ft: bool = True) -> None:
    env = {**ENV, "GCS_FT": "1" if gcs_ft else "0"}
    subprocess.run([str(LOCAL), *args], env=env, check=True, capture_output=True, timeout=300)


def _cluster(tmp_path: Path, *, gcs_ft: bool) -> Iterator[Service]:
    if ray_running(ENV):
        raise RuntimeError("A Ray cluster is already running here; stop it (`.venv/bin/ray stop`) first.")
    if shutil.which("redis-server") is None:
        pytest.skip(REDIS_MISSING)
    try:
        _local("up", gcs_ft=gcs_ft)
        service = Service("http://127.0.0.1:8000", tmp_path)
        service.wait_running()
        yield service
    finally:
        subprocess.run([str(LOCAL), "down"], env=ENV, capture_output=True, timeout=120)


@pytest.fixture
def with_redis(tmp_path: Path) -> Iterator[Service]:
    yield from _cluster(tmp_path, gcs_ft=True)


@pytest.fixture
def without_redis(tmp_path: Path) -> Iterator[Service]:
    yield from _cluster(tmp_path, gcs_ft=False)


def _ingress_urls() -> list[str]:
    """The ingress replicas' own HTTP ports (on the CPU worker node): what a worker node's HAProxy forwards to."""
    urls = set()
    for c in psutil.net_connections("tcp"):
        if c.status != psutil.CONN_LISTEN or not c.pid or not 30000 <= c.laddr.port < 31000:
            continue
        try:
            if psutil.Process(c.pid).cmdline()[0].startswith("ray::ServeReplica:waterbirds:Ingress"):
                urls.add(f"http://127.0.0.1:{c.laddr.port}")
        except (psutil.Error, IndexError):
            continue
    return sorted(urls)


def _replica_ids(service: Service) -> dict[str, set[str]]:
    app = service.dashboard("/api/serve/applications/").json()["applications"]["waterbirds"]
    return {name: {r["replica_id"] for r in d["replicas"] if r["state"] == "RUNNING"}
            for name, d in app["deployments"].items()}


def _app_status() -> str:
    status = subprocess.run([*cli("serve"), "status"], env=ENV, capture_output=True, text=True, timeout=60)
    app = ((yaml.safe_load(status.stdout) or {}).get("applications") or {}).get("waterbirds") or {}
    return str(app.get("status", "absent"))


def _window(result: LoadResult, start: float, end: float) -> tuple[int, int]:
    sent = [o for o in result.outcomes if start <= o.sent_at < end]
    return sum(o.status == 200 for o in sent), len(sent)


def test_with_redis_the_head_dies_and_comes_back_while_the_other_nodes_answer(
        with_redis: Service, photos: list[Photo]) -> None:
    before = _replica_ids(with_redis)
    [url, *_] = _ingress_urls()
    uploads = [Upload(p.path.name, p.path.read_bytes()) for p in photos[:30]]
    with BackgroundLoad(url + "/classify", uploads, users=8) as load:
        time.sleep(5)
        gcs_killed = time.monotonic()
        _local("kill-gcs")
        time.sleep(OUTAGE_S / 2)
        _local("kill-head")  # then everything else of the head: raylet, Serve's controller, dashboard, HAProxy
        time.sleep(OUTAGE_S / 2)
        restarted = time.monotonic()
        _local("restart-head")
        deadline = time.monotonic() + 120
        while _app_status() != "RUNNING":
            assert time.monotonic() < deadline, "the application did not come back within 2 minutes"
            time.sleep(1)
        recovered = time.monotonic()
        time.sleep(5)
    result = load.result
    assert result is not None
    answered, sent = _window(result, gcs_killed, restarted)
    print(f"head down {restarted - gcs_killed:.0f} s: {answered}/{sent} answered through the CPU node; "
          f"RUNNING {recovered - restarted:.1f} s after the restart; {result.summary()}")
    assert sent > 50 and answered == sent, result.summary()
    assert result.statuses == {200: len(result.outcomes)}, result.summary()

    assert _replica_ids(with_redis) == before  # the same replicas: nothing redeployed
    assert httpx.get(with_redis.url + "/healthz", timeout=30).status_code == 200  # the head's HAProxy is back

    # The restored cluster still takes a new deployment: a model swap.
    config = yaml.safe_load(DEPLOYED.read_text())
    classifier = next(d for d in config["applications"][0]["deployments"] if d["name"] == "Classifier")
    classifier["user_config"]["checkpoint"] = "imagenet-lite0"
    with_redis.deploy(config, wait=False)
    deadline = time.monotonic() + 240
    while httpx.get(with_redis.url + "/labels", timeout=30).json()["model"]["name"] != "imagenet-lite0":
        assert time.monotonic() < deadline, "the model swap did not land within 4 minutes"
        time.sleep(2)
    photo = photos[0]
    response = httpx.post(with_redis.url + "/classify", content=photo.path.read_bytes(), timeout=60,
                          headers={"Content-Type": "image/jpeg"})
    assert response.status_code == 200 and response.json()["model"]["name"] == "imagenet-lite0"


def test_without_redis_a_restarted_head_is_an_empty_cluster(without_redis: Service, photos: list[Photo]) -> None:
    """The control: what users lose today where the GCS keeps its state in memory."""
    [url, *_] = _ingress_urls()
    uploads = [Upload(p.path.name, p.path.read_bytes()) for p in photos[:30]]
    with BackgroundLoad(url + "/classify", uploads, users=8) as load:
        time.sleep(5)
        killed = time.monotonic()
        _local("kill-head", gcs_ft=False)
        time.sleep(OUTAGE_S)
        restarted = time.monotonic()
        _local("restart-head", gcs_ft=False)
        # The old workers stop when their raylets find the new head (or give up on the old one: 60 s by default);
        # how soon depends on the machine, so wait for it to happen rather than for a fixed time.
        deadline = restarted + 120
        while _ingress_urls():
            assert time.monotonic() < deadline, "the old ingress replicas still run 2 minutes after the restart"
            time.sleep(0.5)
        gone = time.monotonic()
        time.sleep(10)
        status = _app_status()
        stopped = time.monotonic()
    result = load.result
    assert result is not None
    during, sent_during = _window(result, killed, restarted)
    after, sent_after = _window(result, gone, stopped)
    print(f"head down {restarted - killed:.0f} s: {during}/{sent_during} answered; the old replicas stopped "
          f"{gone - restarted:.1f} s after the restart; after that {after}/{sent_after} answered; application {status}")
    assert status != "RUNNING"  # the new head knows no application: it has to be deployed again
    assert sent_after > 0 and after == 0  # the replicas on the other nodes went with the old cluster, none came back
    assert _ingress_urls() == []
