"""A real Ray cluster on this machine with the application deployed through the `serve` CLI, for tests.

Ray is started with logical GPUs (`--num-gpus 2`) so the production config's `num_gpus: 1` replicas schedule;
torch sees no GPU and runs on the CPU. Everything is bound to loopback and stopped at the end.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from load import runner
from load.runner import deployment
from serve_app.run import DASHBOARD_URL, cli, dashboard_headers, ray_running, stop_ray

ROOT = Path(__file__).resolve().parents[1]
SERVE_PORT = 8000
REDIS_MISSING = "redis-server is not installed (the local cluster's GCS keeps its state there): apt-get install " \
                "redis-server, as .ci/run does"
LOGS = Path("/tmp/ray/session_latest/logs/serve")
# The environment `make serve` runs with, plus request logs written at once so tests can read them, and an ingress
# replica that stops drains for 5 s instead of Serve's 30 (RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S): the 30 s
# let an outside load balancer deregister it, and here there is none but Serve's own HAProxy. Harsher, not kinder,
# than production: Serve stops an old ingress replica before its replacement runs, and the 30 s usually cover the
# replacement's start, so here an upload can wait through a gap that production would not have. (`serve_env` puts
# the repository on the PYTHONPATH: replicas of the tests' bench devices import `load.devices`, not installed.)
ENV = {**runner.serve_env(), "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1",
       "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5"}


def load_config(name: str = "serve_config.yaml", *, min_classifiers: int | None = 2) -> dict[str, Any]:
    """A serve config from the repo, with HTTP bound to loopback for tests. The test cluster declares two GPUs,
    and by default the Classifier keeps one on each, as a cluster of GPU nodes would (the file's own minimum is
    one, for machines with one GPU; `min_classifiers=None` keeps it)."""
    config = yaml.safe_load((ROOT / name).read_text())
    config["http_options"]["host"] = "127.0.0.1"
    config["http_options"]["port"] = SERVE_PORT
    classifier = deployment(config, "Classifier")
    if min_classifiers is not None and "autoscaling_config" in classifier:
        classifier["autoscaling_config"]["min_replicas"] = min_classifiers
    return config


@dataclass
class Service:
    url: str
    workdir: Path

    def dashboard(self, path: str) -> httpx.Response:
        return httpx.get(DASHBOARD_URL + path, headers=dashboard_headers(), timeout=30)

    def deploy(self, config: dict[str, Any], *, wait: bool = True) -> None:
        runner.serve_deploy(config, ENV)
        if wait:
            self.wait_running()

    def status(self) -> dict[str, Any]:
        return yaml.safe_load(run([*cli("serve"), "status"]).stdout)

    def wait_running(self, timeout_s: float = 240) -> None:
        runner.wait_healthy(self.url, timeout_s)

    def running_replicas(self, deployment_name: str) -> set[str]:
        """Replica ids of a deployment's RUNNING replicas, as the dashboard sees them."""
        app = runner.application()
        return {r["replica_id"] for r in app["deployments"][deployment_name]["replicas"] if r["state"] == "RUNNING"}

    def replica_logs(self, deployment_name: str) -> dict[str, list[dict[str, Any]]]:
        """JSON log records of each replica of a deployment, by replica id."""
        records: dict[str, list[dict[str, Any]]] = {}
        for path in sorted(LOGS.glob(f"replica_waterbirds_{deployment_name}_*.log")):
            lines = path.read_text(errors="replace").splitlines()
            records[path.stem.rsplit("_", 1)[1]] = [json.loads(line) for line in lines if line.startswith("{")]
        return records


def run(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300, **kwargs)
    if result.returncode != 0:
        raise subprocess.CalledProcessError(result.returncode, command, result.stdout, result.stderr)
    return result


def start_service(workdir: Path, config: dict[str, Any], *, num_cpus: int = 8, num_gpus: int = 2) -> Iterator[Service]:
    if ray_running(ENV):
        raise RuntimeError("A Ray cluster is already running on this machine (make serve?). The service tests "
                           "start their own; stop it first with `.venv/bin/ray stop`.")
    from serve_app.run import ensure_auth_token, ray_start_command

    ensure_auth_token(ENV)
    run(ray_start_command(num_cpus=num_cpus, num_gpus=num_gpus))
    try:
        service = Service(f"http://127.0.0.1:{SERVE_PORT}", workdir)
        service.deploy(config)
        yield service
    finally:
        stop_ray(ENV, force=True)
