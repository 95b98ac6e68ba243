"""`make serve`'s foreground supervision (`serve_app.run.supervise`): Ctrl-C stops the service and ends quietly with
success; a service that fails by itself ends with its own status. Real processes and real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from tests.service import ROOT

# Like `serve run`: serves until SIGINT, then shuts down and exits 1 (what made `make serve` print an error).
SERVICE = """
import signal, sys, time
def stop(*_):
    print("stopped after SIGINT", flush=True)
    sys.exit(1)
signal.signal(signal.SIGINT, stop)
print("ready", flush=True)
time.sleep(120)
"""
SUPERVISOR = "import os, sys; from serve_app.run import supervise; sys.exit(supervise(sys.argv[1:], dict(os.environ)))"


def _supervised(code: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", SUPERVISOR, sys.executable, "-c", code], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ})


def test_ctrl_c_stops_the_service_and_ends_with_success() -> None:
    supervisor = _supervised(SERVICE)
    assert supervisor.stdout is not None and supervisor.stdout.readline().strip() == "ready"
    supervisor.send_signal(signal.SIGINT)  # a SIGINT to the supervisor alone: it passes it on
    out, err = supervisor.communicate(timeout=60)
    assert supervisor.returncode == 0
    assert out.strip() == "stopped after SIGINT" and "Traceback" not in err


def test_a_service_that_fails_by_itself_ends_with_its_status() -> None:
    supervisor = _supervised("import sys; print('ready', flush=True); sys.exit(3)")
    supervisor.communicate(timeout=60)
    assert supervisor.returncode == 3
