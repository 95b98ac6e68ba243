"""What the benchmarks share: where the photos and results are, a Ray cluster for one run, deploying a config and
waiting until it answers, the production file made ready to measure, one load point, the 2019 design as a server,
and writing results into docs/performance.md. Each benchmark (`bench`, `gpu_profile`, `serving_cost`,
`overload`, `classifier_profile`) imports from here and never from another benchmark.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml

from load import wrk
from load.loadgen import Upload, run_load
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
SEED_PORT = 8001


def serve_env(proxy: str = "haproxy") -> dict[str, str]:
    """This process's environment with the serving settings, HAProxy or Serve's own proxy in front, and the
    repository on the PYTHONPATH, where replicas find `load.devices` (which is not installed)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, **SERVE_ENV, "PYTHONPATH": path,
            "RAY_SERVE_ENABLE_HA_PROXY": "1" if proxy == "haproxy" else "0"}


@contextmanager
def ray_cluster(env: dict[str, str], *, num_cpus: int | None = None, num_gpus: int | None = None) -> Iterator[None]:
    """A fresh local Ray head for one measurement, stopped (with its HAProxy) afterwards."""
    stop_ray(env, force=True)
    ensure_auth_token(env)
    subprocess.run(ray_start_command(num_cpus=num_cpus, num_gpus=num_gpus), env=env, check=True,
                   capture_output=True)
    try:
        yield
    finally:
        stop_ray(env, force=True)


def production_config(checkpoint: str, *, gpus: int = 1, classifiers_per_gpu: int = 1,
                      skip_forward: bool = False) -> dict[str, Any]:
    """serve_config.yaml with HTTP on loopback, the checkpoint, one Classifier replica per GPU (or several sharing
    each, Ray's fractional GPUs), the forward pass skipped (`load.devices`) or not."""
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["http_options"]["host"] = "127.0.0.1"
    classifier = deployment(config, "Classifier")
    classifier.pop("autoscaling_config", None)
    classifier["num_replicas"] = gpus * classifiers_per_gpu
    classifier["user_config"]["checkpoint"] = checkpoint
    if classifiers_per_gpu > 1:
        classifier["ray_actor_options"]["num_gpus"] = round(1 / classifiers_per_gpu, 3)
    if skip_forward:
        from load.devices import on_device

        return on_device(config)
    return config


def model_name(checkpoint: str) -> str:
    """The name a service running `checkpoint` answers with: the registry's for a name in it, else the file's stem."""
    from bcnn.models import get_weights

    return get_weights(checkpoint).name if checkpoint == "default" else Path(checkpoint).stem


def deployments(config: dict[str, Any]) -> list[dict[str, Any]]:
    return config["applications"][0]["deployments"]


def deployment(config: dict[str, Any], name: str) -> dict[str, Any]:
    return next(d for d in deployments(config) if d["name"] == name)


def serve_deploy(config: dict[str, Any], env: dict[str, str]) -> None:
    """`serve deploy` of `config`; returns once the controller has it, before anything runs."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="deploy-") as path:
        yaml.safe_dump(config, path)
        path.flush()
        result = subprocess.run([*cli("serve"), "deploy", path.name], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise subprocess.CalledProcessError(result.returncode, result.args, result.stdout, result.stderr)


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


def deploy(config: dict[str, Any], env: dict[str, str], upload: Upload, *, model_name: str,
           backend: str | None = None, timeout_s: float = 600) -> str:
    """`serve deploy`, then wait until the application is RUNNING and answers with `model_name` (right after a
    deploy that swaps the model, `serve status` can still show the previous one RUNNING) and, where given, runs on
    `backend`. Returns the backend the Classifiers run."""
    serve_deploy(config, env)
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = app = application()
        except (httpx.HTTPError, KeyError, ValueError) as e:
            last, app = e, {}
        if app.get("status") == "RUNNING":
            try:
                response = httpx.post(SERVICE_URL + "/classify", content=upload.data, timeout=60,
                                      headers={"Content-Type": "image/jpeg"})
                last = response.text[:300]
                if response.status_code == 200 and response.json()["model"]["name"] == model_name:
                    running = httpx.get(SERVICE_URL + "/labels", timeout=30).json()["model"]["backend"]
                    if backend in (None, "auto", running):
                        return str(running)
            except httpx.HTTPError as e:
                last = e
        time.sleep(1)
    raise TimeoutError(f"the application did not answer with {model_name} in {timeout_s:g} s; last: {last}")


def load_point(url: str, uploads: list[Upload], users: int, seconds: float, *, generator: str = "python",
               photos: Path = PHOTOS, field_name: str = "file") -> dict[str, Any]:
    """A short warm-up of every replica, then `users` closed-loop users for `seconds`: the load generator's summary
    (statuses, rate, latency) with its own CPU. `generator`: `python` (`load.loadgen`, in this process) or `wrk`
    (`load.wrk`, compiled, for rates a Python process on the same cores could not drive)."""
    asyncio.run(run_load(url, uploads, users=min(users, 8), seconds=3, field_name=field_name))
    if generator == "wrk":
        summary = wrk.run(url, photos, users=users, seconds=seconds, field_name=field_name)
    else:
        cpu = time.process_time()
        result = asyncio.run(run_load(url, uploads, users=users, seconds=seconds, timeout_s=120,
                                      field_name=field_name))
        cpu = time.process_time() - cpu  # this process: the service's replicas are others
        summary = {**result.summary(), "generator": "python",
                   "generator_cpu_cores": round(cpu / max(result.seconds, 1e-9), 3),
                   "generator_cpu_ms_per_request": round(cpu * 1000 / max(len(result.outcomes), 1), 4)}
    summary["lost"] = summary["statuses"].get("0", 0)  # no HTTP answer at all
    print(f"  {users:>4} users: {summary['throughput_rps']:7.2f} req/s  p50 {summary['latency_ms_p50']:8.1f} ms  "
          f"p99 {summary['latency_ms_p99']:8.1f} ms  {summary['statuses']}  ({summary['generator']}: "
          f"{summary['generator_cpu_cores']} cores)", flush=True)
    return summary


@contextmanager
def py_spy_record(role: str, seconds: float, out: Path, label: str) -> Iterator[list[Path]]:
    """While the block runs, py-spy samples every process of a serving role (`load.cpu_watch.role_of`) for `seconds`
    (threads apart, idle samples left out), into `out/py-spy-<label>-<pid>.txt` (folded stacks; a flame graph tool
    reads them). Nothing where py-spy is not installed."""
    import psutil

    from load.cpu_watch import role_of

    binary = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if binary is None:
        print("  (py-spy is not installed: no profile)", flush=True)
        yield []
        return
    pids = [p.pid for p in psutil.process_iter(["cmdline"]) if role_of(p.info["cmdline"] or []) == role]
    paths = [out / f"py-spy-{label}-{pid}.txt" for pid in pids]
    print(f"  py-spy: {len(pids)} {role} processes for {seconds:g} s", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    recorders = [subprocess.Popen([binary, "record", "--nonblocking", "--threads", "-r", "100", "-d",
                                   str(max(1, round(seconds))), "-f", "raw", "-o", str(path), "-p", str(pid)],
                                  stdout=subprocess.DEVNULL, stderr=path.with_suffix(".log").open("w"))
                 for pid, path in zip(pids, paths, strict=True)]
    try:
        yield paths
    finally:
        for recorder in recorders:
            try:
                recorder.wait(timeout=seconds + 30)
            except subprocess.TimeoutExpired:
                recorder.kill()


@contextmanager
def seed_service(checkpoint: str, workers: int, upload: Upload, *, skip_forward: bool = False) -> Iterator[str]:
    """The 2019 design (Flask + `gunicorn -w <workers>`) with `checkpoint`, once it answers `upload`; yields its
    upload URL."""
    command = [*cli("gunicorn"), "-w", str(workers), "-b", f"127.0.0.1:{SEED_PORT}", "--backlog", "2048",
               "--timeout", "120", "load.seed_baseline.service:app"]
    env = {**os.environ, "SEED_CHECKPOINT": checkpoint, "SEED_SKIP_FORWARD": "1" if skip_forward else "0"}
    server = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True, env=env)
    url = f"http://127.0.0.1:{SEED_PORT}/upload/"
    try:
        _wait_for_seed(url, upload, server)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


def _wait_for_seed(url: str, upload: Upload, server: subprocess.Popen[bytes], timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline and server.poll() is None:
        try:
            response = httpx.post(url, files={"file": (upload.name, upload.data)}, timeout=30)
            if response.status_code == 200:
                return
            last = response.text[:300]
        except httpx.HTTPError as e:
            last = e
        time.sleep(1)
    raise TimeoutError(f"the 2019 design did not answer within {timeout_s:g} s (exit {server.poll()}); last: {last}")


def finish_plot(fig: Any, left_label: str, right_label: str, title: str, path: Path) -> None:
    """The profiles' plots: throughput (left) and latency (right, log) against concurrent users (log)."""
    import matplotlib.pyplot as plt

    left, right = fig.axes
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xlabel("concurrent users")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    left.set_ylabel(left_label)
    right.set_ylabel(right_label)
    right.set_yscale("log")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def replace_doc_section(markers: tuple[str, str], text: str, page: Path = PERFORMANCE_PAGE) -> None:
    """Write `text` between the two markers in a documentation page (left alone where they are missing). Paths in
    it are relative to the page's folder."""
    content = page.read_text()
    start, end = markers
    if start in content and end in content:
        head, _, rest = content.partition(start)
        _, _, tail = rest.partition(end)
        page.write_text(f"{head}{start}\n{text}\n{end}{tail}")
