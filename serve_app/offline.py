"""The page as an installable web app that works with no network (docs/offline.md): its files under URLs that
name their content, the service worker that keeps them, the web app manifest, and what "save for offline" fetches.

Files under `assets/<hash>/` never change (a new file is a new hash) and are cached for a year; the page, the
service worker and the manifest are revalidated on every load, so a redeploy reaches a phone at its next visit
online. The shell (page, scripts, icons) is one hash for all, so that its modules import each other by relative
URL; ONNX Runtime Web (`make web-runtime`) is another.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib.resources import files
from importlib.resources.abc import Traversable
from urllib.parse import quote

STATIC = files("serve_app").joinpath("static")
SHELL_FILES = ("photo.js", "ondevice.js", "icon.svg", "icon-192.png", "icon-512.png")
RUNTIME_DIR = "ort"
RUNTIME_FILES = ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
CONTENT_TYPES = {".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm",
                 ".svg": "image/svg+xml", ".png": "image/png"}
IMMUTABLE = "public, max-age=31536000, immutable"
REVALIDATE = "no-cache"
# The page and its workers isolated from other origins: ONNX Runtime Web then runs on several cores (threads need
# SharedArrayBuffer). Everything the page loads is its own origin's.
ISOLATION = {"Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp",
             "Cross-Origin-Resource-Policy": "same-origin"}
MODEL_PATH = "model/{sha256}.onnx"


@dataclass(frozen=True)
class Asset:
    path: str
    """relative to the page: `assets/<hash>/<name>`"""
    data: bytes
    content_type: str


def _digest(named: dict[str, bytes]) -> str:
    digest = hashlib.sha256()
    for name, data in sorted(named.items()):
        digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    return digest.hexdigest()[:16]


def _read(folder: Traversable, names: tuple[str, ...]) -> dict[str, bytes] | None:
    try:
        return {name: folder.joinpath(name).read_bytes() for name in names}
    except FileNotFoundError:
        return None


def _assets(named: dict[str, bytes]) -> dict[str, Asset]:
    version = _digest(named)
    return {name: Asset(f"assets/{version}/{name}", data, CONTENT_TYPES[name[name.rindex("."):]])
            for name, data in named.items()}


class WebApp:
    """Built once per ingress replica from the package's static folder."""

    def __init__(self, static: Traversable = STATIC) -> None:
        page_template = static.joinpath("index.html").read_text(encoding="utf-8")
        shell = _read(static, SHELL_FILES)
        if shell is None:
            raise FileNotFoundError(f"the page's files {SHELL_FILES} are not all in {static}")
        self.shell = _assets(shell)
        runtime = _read(static.joinpath(RUNTIME_DIR), RUNTIME_FILES)
        self.runtime = _assets(runtime) if runtime is not None else {}
        self.assets = {a.path: a for a in (*self.shell.values(), *self.runtime.values())}
        config = {"shell": {name: a.path for name, a in self.shell.items()},
                  "runtime": {name: a.path for name, a in self.runtime.items()}}
        # `</` cannot end the script element the configuration sits in
        self.page = page_template.replace("%APP_CONFIG%", json.dumps(config).replace("</", "<\\/")).encode()
        self.manifest = json.dumps({
            "name": "Waterbird recognition", "short_name": "Waterbirds",
            "description": "Name the waterbird in a photo, also with no network",
            "start_url": "./", "scope": "./", "display": "standalone",
            "background_color": "#f4f7f9", "theme_color": "#0b5c8a",
            "icons": [{"src": self.shell["icon-192.png"].path, "sizes": "192x192", "type": "image/png"},
                      {"src": self.shell["icon-512.png"].path, "sizes": "512x512", "type": "image/png",
                       "purpose": "any maskable"},
                      {"src": self.shell["icon.svg"].path, "sizes": "any", "type": "image/svg+xml"}],
        }).encode()
        cached_shell = ["./", "manifest.webmanifest", *(a.path for a in self.shell.values())]
        shell_version = _digest({"page": self.page, "manifest": self.manifest, **shell})
        self.service_worker = (static.joinpath("sw.js").read_text(encoding="utf-8")
                               .replace("%SHELL_VERSION%", shell_version)
                               .replace("%SHELL%", json.dumps(cached_shell))).encode()

    def offline_files(self, phone_model: dict[str, object] | None, model: str | None = None) -> dict[str, object]:
        """/offline.json: what "save for offline" downloads (for the service's `model`, or its default), with
        sizes, or why it cannot."""
        if not self.runtime:
            return {"available": False, "reason": "ONNX Runtime Web is not installed on the service "
                                                  "(make web-runtime): the page works online only"}
        if phone_model is None:
            return {"available": False, "reason": "the service offers no model for phones (phone_model_max_mb: 0)"}
        model_path = MODEL_PATH.format(sha256=phone_model["sha256"]) + (f"?model={quote(model)}" if model else "")
        runtime = {name: {"path": a.path, "bytes": len(a.data)} for name, a in self.runtime.items()}
        return {"available": True, "runtime": runtime, "model": {"path": model_path, **phone_model},
                "bytes": sum(len(a.data) for a in self.runtime.values()) + int(phone_model["bytes"])}  # type: ignore[call-overload]
