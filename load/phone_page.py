"""The offline page's measurements that are not in the suite (docs/offline.md), on the shared photos:

- `shrink`: each photo enlarged to a phone camera's 4,032 px on its longer side (Pillow, bicubic, JPEG quality 95),
  then classified by a running service twice, as it is and as the page's own code (`serve_app/static/photo.js`, in
  headless Chromium) shrinks it before upload; top-1 and `is_waterbird` agreement, and the bytes each sends.
- `quantization`: the phone's model quantized by ONNX Runtime (dynamic, uint8 weights) against the float32 one:
  size, top-1 and `is_waterbird` agreement.

`--url`: the running service the shrink measure uses; `--only`: one of the two.
"""

from __future__ import annotations

import base64
import io
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from load.runner import PHOTOS, SERVICE_URL

PHONE_SIDE = 4032
SHRINK = """async ([shell, data, maxSide, quality]) => {
    const { shrunkForUpload } = await import(new URL(shell, document.baseURI).href);
    const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
    const shrunk = await shrunkForUpload(new File([bytes], "photo.jpg", {type: "image/jpeg"}),
                                          maxSide || undefined, quality || undefined);
    const buffer = new Uint8Array(await shrunk.arrayBuffer());
    let text = "";
    for (let i = 0; i < buffer.length; i += 32768) text += String.fromCharCode(...buffer.subarray(i, i + 32768));
    return btoa(text);
}"""


def enlarged(path: Path) -> bytes:
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    scale = PHONE_SIDE / max(rgb.size)
    size = (round(rgb.width * scale), round(rgb.height * scale))
    out = io.BytesIO()
    rgb.resize(size, Image.Resampling.BICUBIC).save(out, "JPEG", quality=95)
    return out.getvalue()


def _answer(client: httpx.Client, url: str, data: bytes) -> dict[str, Any]:
    response = client.post(url + "/classify?top_k=1", files={"file": ("photo.jpg", data, "image/jpeg")})
    response.raise_for_status()
    body = response.json()
    return {"label": body["predictions"][0]["label"], "is_waterbird": body["is_waterbird"]}


def shrink(url: str, photos: list[Path], max_side: int | None = None, quality: float | None = None) -> dict[str, Any]:
    """None: the page's own settings (serve_app/static/photo.js)."""
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    rows = []
    with sync_playwright() as p, httpx.Client(timeout=120) as client:
        browser = p.chromium.launch(executable_path=chromium, args=["--headless", "--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        page.goto(url + "/")
        shell = page.evaluate("JSON.parse(document.getElementById('app-config').textContent).shell['photo.js']")
        for path in photos:
            large = enlarged(path)
            shrunk_b64 = page.evaluate(SHRINK, [shell, base64.b64encode(large).decode(), max_side, quality])
            small = base64.b64decode(shrunk_b64)
            full, shrunk = _answer(client, url, large), _answer(client, url, small)
            rows.append({"photo": path.name, "bytes": [len(large), len(small)], "full_size": full, "shrunk": shrunk})
        browser.close()
    same_top1 = [r for r in rows if r["full_size"]["label"] == r["shrunk"]["label"]]
    same_waterbird = [r for r in rows if r["full_size"]["is_waterbird"] == r["shrunk"]["is_waterbird"]]
    return {"photos": len(rows), "phone_side_px": PHONE_SIDE, "max_side": max_side or "the page's",
            "quality": quality or "the page's",
            "top1_agreement": len(same_top1) / len(rows), "is_waterbird_agreement": len(same_waterbird) / len(rows),
            "median_bytes": {"full_size": int(np.median([r["bytes"][0] for r in rows])),
                             "shrunk": int(np.median([r["bytes"][1] for r in rows]))},
            "disagreements": [r for r in rows if r not in same_top1 or r not in same_waterbird]}


def quantization(photos: list[Path]) -> dict[str, Any]:
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from bcnn.answers import DEFAULT_WATERBIRD_THRESHOLD
    from bcnn.models import get_weights
    from bcnn.phone import phone_model
    from bcnn.preprocess import load_image

    weights = get_weights("default")
    model = phone_model(weights, max_bytes=2**40, waterbird_threshold=DEFAULT_WATERBIRD_THRESHOLD)
    answers = np.array(weights.answer_indices)
    with tempfile.TemporaryDirectory() as tmp:
        float32, int8 = Path(tmp) / "float32.onnx", Path(tmp) / "int8.onnx"
        float32.write_bytes(model.data)
        quantize_dynamic(float32, int8, weight_type=QuantType.QUInt8)
        sessions = [ort.InferenceSession(str(f)) for f in (float32, int8)]
        sizes = [f.stat().st_size for f in (float32, int8)]

    def ranked(logits: np.ndarray) -> tuple[int, bool]:
        probs = np.exp(logits - logits.max())
        on_answers = probs[answers] / probs.sum()
        return int(on_answers.argmax()), bool(on_answers.sum() >= DEFAULT_WATERBIRD_THRESHOLD)

    same_top1 = same_waterbird = 0
    for path in photos:
        pixels = load_image(path.read_bytes(), weights.preprocess).chw.numpy()[None].copy()
        (top_a, waterbird_a), (top_b, waterbird_b) = (ranked(s.run(None, {"images": pixels})[0][0]) for s in sessions)
        same_top1 += top_a == top_b
        same_waterbird += waterbird_a == waterbird_b
    return {"photos": len(photos), "bytes": {"float32": sizes[0], "int8": sizes[1]},
            "top1_agreement": same_top1 / len(photos), "is_waterbird_agreement": same_waterbird / len(photos)}


@dataclass(frozen=True)
class Settings:
    url: str = SERVICE_URL  # a running service (for shrink)
    only: str = ""  # shrink or quantization; empty: both
    max_side: int = 0  # shrink to this longer side instead of the page's
    quality: float = 0.0  # JPEG quality (0-1) instead of the page's


def run(s: Settings) -> dict[str, Any]:
    photos = sorted(p for p in PHOTOS.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    measures = {"shrink": lambda: shrink(s.url, photos, s.max_side or None, s.quality or None),
                "quantization": lambda: quantization(photos)}
    return {name: measure() for name, measure in measures.items() if s.only in ("", name)}
