"""The scenario runner: what every measurement shares, so that a scenario (`python -m load SCENARIO`) declares only
what differs. A fresh Ray cluster; a serve config deployed and waited for until it answers; the 2019 design as a
server beside it; idle CPU; load points with a named generator (`python` or `wrk`), each one result dict with the
generator's own CPU and, where asked, every process role's; and the results written as data (JSON under
load/results/, a section of docs/performance.md, a plot). The tests deploy and wait with the same functions
(tests/service.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import signal
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import yaml

from load.cpu_watch import CpuWatch, busy_ms_by_role
from load.loadgen import Upload, load_uploads, run_load, wrk
from serve_app.run import (
    DASHBOARD_URL,
    SERVE_ENV,
    cli,
    dashboard_headers,
    ensure_auth_token,
    ray_start_command,
    stop_ray,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "load" / "results"
PHOTOS = Path(os.environ.get("WATERBIRD_PHOTOS", ROOT.parent / "shared" / "waterbirds" / "photos"))
PERFORMANCE_PAGE = ROOT / "docs" / "performance.md"
SERVICE_URL = "http://127.0.0.1:8000"
CLASSIFY_URL = SERVICE_URL + "/classify"
SEED_PORT = 8001


def uploads(photos: Path = PHOTOS) -> list[Upload]:
    """The shared photos as multipart uploads."""
    if not photos.is_dir():
        raise SystemExit(f"no photos at {photos}; set WATERBIRD_PHOTOS to a folder of JPEGs")
    return [Upload(u.name, u.data) for u in load_uploads(photos)]


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def machine() -> dict[str, Any]:
    return {"cpus": len(os.sched_getaffinity(0)), "platform": platform.platform(), "python": platform.python_version()}


def serve_env(proxy: str = "haproxy") -> dict[str, str]:
    """This process's environment with the serving settings, HAProxy or Serve's own proxy in front, and the
    repository on the PYTHONPATH, where replicas find `load.devices` (which is not installed)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, **SERVE_ENV, "PYTHONPATH": path,
            "RAY_SERVE_ENABLE_HA_PROXY": "1" if proxy == "haproxy" else "0"}


def serve_config(profile: str = "local", checkpoint: str = "default", *, gpus: int = 1, classifiers_per_gpu: int = 1,
                 skip_forward: bool = False, fixed_replicas: bool = False) -> dict[str, Any]:
    """serve_config.local.yaml as it is (`local`), or serve_config.yaml (`production`) with HTTP on loopback, the
    checkpoint and one Classifier replica per GPU (or several sharing each: Ray's fractional GPUs). `fixed_replicas`
    holds autoscaled deployments at their minimum: on a small CPU standing in for a 16-core node, replicas started
    by autoscaling get no core of their own. `skip_forward`: the forward pass skipped (`load.devices`)."""
    if profile == "local":
        config = yaml.safe_load((ROOT / "serve_config.local.yaml").read_text())
    else:
        config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
        config["http_options"]["host"] = "127.0.0.1"
        classifier = deployment(config, "Classifier")
        classifier.pop("autoscaling_config", None)
        classifier["num_replicas"] = gpus * classifiers_per_gpu
        classifier["user_config"]["checkpoint"] = checkpoint
        if classifiers_per_gpu > 1:
            classifier["ray_actor_options"]["num_gpus"] = round(1 / classifiers_per_gpu, 3)
    if fixed_replicas:
        for d in deployments(config):
            if "autoscaling_config" in d:
                d["num_replicas"] = d.pop("autoscaling_config")["min_replicas"]
    if skip_forward:
        from load.devices import on_device

        return on_device(config)
    return config


def deployments(config: dict[str, Any]) -> list[dict[str, Any]]:
    return config["applications"][0]["deployments"]


def deployment(config: dict[str, Any], name: str) -> dict[str, Any]:
    return next(d for d in deployments(config) if d["name"] == name)


def model_name(checkpoint: str) -> str:
    """The name a service running `checkpoint` answers with: the registry's for a name in it, else the file's stem."""
    from bcnn.models import get_weights

    return get_weights(checkpoint).name if checkpoint == "default" else Path(checkpoint).stem


def serve_deploy(config: dict[str, Any], env: dict[str, str]) -> None:
    """`serve deploy` of `config`; returns once the controller has it, before anything runs."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="deploy-") as path:
        yaml.safe_dump(config, path)
        path.flush()
        result = subprocess.run([*cli("serve"), "deploy", path.name], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"serve deploy failed (exit {result.returncode}): {result.stderr.strip()[-2000:]}")


def application() -> dict[str, Any]:
    """The application as Serve's controller sees it, from the dashboard's API rather than `serve status`: the CLI
    is a Python process that takes a second or two of this small machine's CPU from the replicas starting, at
    every look. Empty until it is deployed."""
    apps = httpx.get(DASHBOARD_URL + "/api/serve/applications/", headers=dashboard_headers(), timeout=30)
    return apps.json()["applications"].get("waterbirds", {})


def wait_healthy(url: str = SERVICE_URL, timeout_s: float = 240) -> None:
    """Until the application is RUNNING with every deployment HEALTHY and its /healthz answers 200."""
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = app = application()
            if app.get("status") == "RUNNING" and all(d["status"] == "HEALTHY" for d in app["deployments"].values()):
                if httpx.get(url + "/healthz", timeout=10).status_code == 200:
                    return
        except (KeyError, TypeError, ValueError, httpx.HTTPError) as e:
            last = e
        time.sleep(1)
    raise TimeoutError(f"the application did not become healthy in {timeout_s:g} s; last status: {last}")


class Cluster:
    """A fresh local Ray head for one scenario, stopped (with its HAProxy) on leaving; `deploy` puts a serve config
    on it and waits until it answers."""

    def __init__(self, proxy: str = "haproxy", *, num_cpus: int | None = None, num_gpus: int | None = None) -> None:
        self.env, self.num_cpus, self.num_gpus = serve_env(proxy), num_cpus, num_gpus

    def __enter__(self) -> Cluster:
        stop_ray(self.env, force=True)
        ensure_auth_token(self.env)
        subprocess.run(ray_start_command(num_cpus=self.num_cpus, num_gpus=self.num_gpus), env=self.env, check=True,
                       capture_output=True)
        return self

    def __exit__(self, *_exc: object) -> None:
        stop_ray(self.env, force=True)

    def deploy(self, config: dict[str, Any], upload: Upload, checkpoint: str = "default", *,
               backend: str | None = None, timeout_s: float = 600) -> str:
        """`serve deploy`, then wait until the application is RUNNING and answers with the checkpoint's model
        (right after a deploy that swaps the model, the previous one can still show RUNNING) and, where given,
        runs on `backend`. Returns the backend the Classifiers run."""
        serve_deploy(config, self.env)
        name, deadline, last = model_name(checkpoint), time.monotonic() + timeout_s, None
        while time.monotonic() < deadline:
            try:
                if application().get("status") == "RUNNING":
                    response = httpx.post(CLASSIFY_URL, content=upload.data, timeout=60,
                                          headers={"Content-Type": "image/jpeg"})
                    last = response.text[:300]
                    if response.status_code == 200 and response.json()["model"]["name"] == name:
                        running = httpx.get(SERVICE_URL + "/labels", timeout=30).json()["model"]["backend"]
                        if backend in (None, "auto", running):
                            return str(running)
            except (httpx.HTTPError, KeyError, ValueError) as e:
                last = e
            time.sleep(1)
        raise TimeoutError(f"the application did not answer with {name} in {timeout_s:g} s; last: {last}")


@contextmanager
def seed_service(checkpoint: str, workers: int, upload: Upload, *, skip_forward: bool = False,
                 timeout_s: float = 180) -> Iterator[str]:
    """The 2019 design (Flask + `gunicorn -w <workers>`) with `checkpoint`, once it answers `upload`; yields its
    upload URL."""
    command = [*cli("gunicorn"), "-w", str(workers), "-b", f"127.0.0.1:{SEED_PORT}", "--backlog", "2048",
               "--timeout", "120", "load.seed_baseline.service:app"]
    env = {**os.environ, "SEED_CHECKPOINT": checkpoint, "SEED_SKIP_FORWARD": "1" if skip_forward else "0"}
    server = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True, env=env)
    url, deadline, last = f"http://127.0.0.1:{SEED_PORT}/upload/", time.monotonic() + timeout_s, None
    try:
        while server.poll() is None:
            try:
                response = httpx.post(url, files={"file": (upload.name, upload.data)}, timeout=30)
                if response.status_code == 200:
                    break
                last = response.text[:300]
            except httpx.HTTPError as e:
                last = e
            if time.monotonic() > deadline:
                raise TimeoutError(f"the 2019 design did not answer within {timeout_s:g} s; last: {last}")
            time.sleep(1)
        else:
            raise RuntimeError(f"the 2019 design exited ({server.returncode}); last: {last}")
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


def idle_cpu(seconds: float) -> CpuWatch:
    """Every serving process's CPU over `seconds` with no load: the idle rates a point subtracts."""
    with CpuWatch() as idle:
        time.sleep(seconds)
    return idle


def point(url: str, uploads: list[Upload], users: int, seconds: float, *, generator: str = "python",
          warm_s: float = 3.0, idle: CpuWatch | None = None, honour_retry_after: bool = True,
          local_addresses: Sequence[str] = (), photos: Path = PHOTOS, field_name: str = "file",
          quiet: bool = False) -> dict[str, Any]:
    """A warm-up of `warm_s` (at most 8 users), then `users` closed-loop users for `seconds`: the generator's
    summary (statuses, rate, latency) with its own CPU, and `lost` (no HTTP answer at all). With `idle` (the
    service's CPU at rest), every role's CPU ms beyond its idle rate (`cpu_ms`, the load generator's included: it
    runs on the same cores), the idle cores and the processes by role. `generator`: `python` (`load.loadgen`, in
    this process) or `wrk` (compiled, for rates one Python process on the same cores could not drive)."""
    if warm_s:
        asyncio.run(run_load(url, uploads, users=min(users, 8), seconds=warm_s, field_name=field_name,
                             local_addresses=local_addresses))
    with CpuWatch() if idle is not None else nullcontext() as watch:
        if generator == "wrk":
            summary = wrk(url, photos, users=users, seconds=seconds, field_name=field_name)
        else:
            cpu = time.process_time()
            result = asyncio.run(run_load(url, uploads, users=users, seconds=seconds, timeout_s=120,
                                          field_name=field_name, honour_retry_after=honour_retry_after,
                                          local_addresses=local_addresses))
            cpu = time.process_time() - cpu  # this process: the service's replicas are others
            summary = {**result.summary(), "generator": "python",
                       "generator_cpu_cores": round(cpu / max(result.seconds, 1e-9), 3),
                       "generator_cpu_ms_per_request": round(cpu * 1000 / max(len(result.outcomes), 1), 4)}
    summary["lost"] = summary["statuses"].get("0", 0)
    if idle is not None:
        busy, idle_cores = busy_ms_by_role(idle, watch)
        if generator == "python":
            busy["load generator"] = summary["generator_cpu_cores"] * summary["seconds"] * 1000
        summary["cpu_ms"] = {r: round(ms, 1) for r, ms in sorted(busy.items())}
        summary["idle_cores"] = {r: round(c, 3) for r, c in sorted(idle_cores.items())}
        summary["processes"] = dict(sorted(Counter(s.role for s in watch.seen.values()).items()))
    if not quiet:
        print(f"  {users:>4} users: {summary['throughput_rps']:7.2f} req/s  p50 {summary['latency_ms_p50']:8.1f} ms  "
              f"p99 {summary['latency_ms_p99']:8.1f} ms  {summary['statuses']}  ({summary['generator']}: "
              f"{summary['generator_cpu_cores']} cores)", flush=True)
    return summary


def save(report: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")


def replace_doc_section(markers: tuple[str, str], text: str, page: Path = PERFORMANCE_PAGE) -> None:
    """Write `text` between the two markers in a documentation page (left alone where they are missing). Paths in
    it are relative to the page's folder."""
    content = page.read_text()
    start, end = markers
    if start in content and end in content:
        head, _, rest = content.partition(start)
        _, _, tail = rest.partition(end)
        page.write_text(f"{head}{start}\n{text}\n{end}{tail}")


def plot_by_users(path: Path, title: str, series: list[tuple[str, dict[str, dict[str, Any]], str]], *,
                  latencies: tuple[str, ...] = ("latency_ms_p99",), limits: Sequence[tuple[str, float]] = (),
                  left_label: str = "answers per second") -> None:
    """Throughput (left) and latency (right, log) against concurrent users (log), one line per (label, points by
    users, matplotlib style); `limits` as dotted horizontal lines on the left."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, points, style in series:
        users = sorted(points, key=int)
        x = [int(u) for u in users]
        left.plot(x, [points[u]["throughput_rps"] for u in users], style, label=label)
        for i, key in enumerate(latencies):
            right.plot(x, [points[u][key] for u in users], style, alpha=1 - 0.5 * i,
                       label=f"{label} {key.rsplit('_', 1)[1]}")
    for label, value in limits:
        left.axhline(value, color="gray", linestyle=":", label=label)
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xlabel("concurrent users")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    left.set_ylabel(left_label)
    right.set_ylabel("latency (ms)")
    right.set_yscale("log")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
