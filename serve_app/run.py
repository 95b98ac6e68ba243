"""`make serve`: a local Ray head (dashboard and metrics on 127.0.0.1, token authentication on), the local
profile deployed in the foreground with `serve run`, until Ctrl-C; then the Ray it started is stopped. An already
running local Ray is reused.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil

from serve_app.haproxy import bundled_haproxy

BIN = Path(sys.executable).parent
# Where a CLI is neither beside this Python (a venv) nor on PATH, it runs as a module of this Python.
_CLI_MODULES = {"ray": "ray.scripts.scripts", "serve": "ray.serve.scripts", "gunicorn": "gunicorn"}
GCS_PORT = 6379
DASHBOARD_PORT = 8265
METRICS_PORT = 8080
DASHBOARD_URL = f"http://127.0.0.1:{DASHBOARD_PORT}"

# The serving settings measured to help on this kind of machine (docs/performance.md, "What was tried on the
# serving path"); exported before Ray starts, because Serve's controller and replicas read them when they start.
SERVE_ENV = {
    # Ray 2.60 makes a token for a new local cluster (~/.ray/auth_token), but its CLI clients (`serve run`,
    # `serve deploy`, `serve status`) send it only when told to.
    "RAY_AUTH_MODE": "token",
    # Ray's throughput mode: user code on the replica's main loop, gRPC between replicas, buffered request
    # logs; faster at every load measured (docs/performance.md, "What was tried on the serving path").
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    # HAProxy in front of the ingress replicas, which then serve HTTP themselves: no Python proxy hop, whose CPU
    # per request was the largest of the path (docs/performance.md, "What was tried on the serving path").
    # `stop_ray` stops it with Ray.
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
}
# ... run through `waterbirds-haproxy`, which appends each client's address to X-Forwarded-For: fair admission
# tells clients apart by it (serve_app/haproxy.py, serve_app/client_identity.py). Where it is not installed, every
# client behind HAProxy counts as one.
_WRAPPER = BIN / "waterbirds-haproxy" if (BIN / "waterbirds-haproxy").is_file() else shutil.which("waterbirds-haproxy")
if _WRAPPER:
    SERVE_ENV["RAY_SERVE_HAPROXY_BINARY_PATH"] = str(_WRAPPER)


def cli(name: str) -> list[str]:
    """The command line that runs `ray`, `serve` or `gunicorn` for this Python: beside it in a virtual
    environment (`make`), else on PATH, else `python -m` (a machine with no `make` set-up, such as the GPU kit)."""
    beside = BIN / name
    if beside.is_file():
        return [str(beside)]
    found = shutil.which(name)
    return [found] if found else [sys.executable, "-m", _CLI_MODULES[name]]


def ray_start_command(*, num_cpus: int | None = None, num_gpus: int | None = None) -> list[str]:
    command = [*cli("ray"), "start", "--head", f"--port={GCS_PORT}",
               "--dashboard-host=127.0.0.1", f"--dashboard-port={DASHBOARD_PORT}",
               f"--metrics-export-port={METRICS_PORT}", "--disable-usage-stats"]
    if num_cpus is not None:
        command.append(f"--num-cpus={num_cpus}")
    if num_gpus is not None:
        command.append(f"--num-gpus={num_gpus}")
    return command


def ensure_auth_token(env: dict[str, str]) -> None:
    """A new machine has no token yet, and with RAY_AUTH_MODE=token `ray start` refuses to start without one."""
    if env.get("RAY_AUTH_TOKEN") or env.get("RAY_AUTH_TOKEN_PATH") or (Path.home() / ".ray" / "auth_token").is_file():
        return
    subprocess.run([*cli("ray"), "get-auth-token", "--generate"], env=env, check=True, capture_output=True)


def dashboard_headers() -> dict[str, str]:
    """The local cluster's token for the dashboard's REST API (`/api/serve/applications/` is what `serve status`
    shows), taken from where Ray's own clients take it."""
    token = os.environ.get("RAY_AUTH_TOKEN")
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if not token and path.is_file():
        token = path.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def ray_running(env: dict[str, str]) -> bool:
    status = subprocess.run([*cli("ray"), "status"], env=env, capture_output=True, text=True)
    return status.returncode == 0


def stop_ray(env: dict[str, str], *, force: bool = False) -> None:
    """`ray stop`, then Serve's HAProxy: Ray 2.60 stops it on `serve shutdown` only, so after `ray stop` it would
    live on and keep port 8000 bound."""
    subprocess.run([*cli("ray"), "stop", *(["--force"] if force else [])], env=env, capture_output=True)
    bundled = bundled_haproxy()
    if bundled is None:
        return
    haproxy = os.path.realpath(bundled)
    for process in psutil.process_iter(["exe"]):
        if process.info["exe"] == haproxy:
            process.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="serve_config.local.yaml")
    args = parser.parse_args(argv)
    env = {**os.environ, **{k: v for k, v in SERVE_ENV.items() if k not in os.environ}}
    started = False
    if ray_running(env):
        print(f"Using the Ray already running at 127.0.0.1:{GCS_PORT}.", flush=True)
    else:
        ensure_auth_token(env)
        subprocess.run(ray_start_command(), env=env, check=True)
        started = True
    print(f"\nService:   http://127.0.0.1:8000   (page at /, API at /classify, /healthz, /labels)\n"
          f"Dashboard: http://127.0.0.1:{DASHBOARD_PORT}   (token: ~/.ray/auth_token)\n"
          f"Metrics:   http://127.0.0.1:{METRICS_PORT}/metrics\nCtrl-C stops the service.\n", flush=True)
    try:
        return supervise([*cli("serve"), "run", "--address=auto", args.config], env)
    finally:
        if started:
            stop_ray(env)


def supervise(command: list[str], env: dict[str, str]) -> int:
    """Run `command` in the foreground until it ends; Ctrl-C (SIGINT) and SIGTERM stop it. Its exit status, except
    after a Ctrl-C: the service was asked to stop and did, which is a success (`make serve` then ends quietly)."""
    # Started as a background job, a process inherits SIGINT ignored: restore Ctrl-C for us and for the child.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    child = subprocess.Popen(command, env=env, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # A supervisor's SIGTERM must reach the child too, or it outlives us; `ray stop` cleans up after it.
    signal.signal(signal.SIGTERM, lambda *_: child.terminate())
    interrupted = False
    while True:
        try:
            status = child.wait()
            return 0 if interrupted else status
        except KeyboardInterrupt:
            # A terminal's Ctrl-C reached the child too; a SIGINT sent to us alone must be passed on.
            interrupted = True
            child.send_signal(signal.SIGINT)


if __name__ == "__main__":
    sys.exit(main())
