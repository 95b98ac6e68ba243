"""CPU per refusal, and per admitted upload, in the ingress's admission code, before (48ba6da) and after (this
tree), back to back, in process:   .venv/bin/python load/results/fairness-2026-12-02/refusal_cost.py"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from serve_app import admission as new  # noqa: E402
from serve_app.client_identity import ClientIdentity  # noqa: E402

SCOPE = {"type": "http", "client": ("127.0.0.1", 5000),
         "headers": [(b"host", b"x"), (b"content-type", b"image/jpeg"), (b"x-forwarded-for", b"127.0.0.2")]}


def load_old():  # noqa: ANN201
    path = Path(tempfile.mkdtemp()) / "admission_old.py"
    path.write_text(subprocess.run(["git", "show", "48ba6da:serve_app/admission.py"], cwd=ROOT, check=True,
                                   capture_output=True, text=True).stdout)
    spec = importlib.util.spec_from_file_location("admission_old", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["admission_old"] = module
    spec.loader.exec_module(module)
    return module


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def full(module, **limits):  # noqa: ANN001, ANN201
    """An admission that refuses: 50 answers/s measured, a second's worth held."""
    clock = Clock()
    admission = module.Admission(module.Limits(max_wait_s=1.0, max_pending=10**6, floor=4, door_wait_s=0, **limits),
                                 clock)
    for _ in range(64):
        admission.admit()
        clock.now += 0.02
        admission.release()
    while True:
        try:
            admission.admit()
        except module.Overloaded:
            return admission


async def refusals_us(admission, count: int, identity: ClientIdentity | None = None) -> float:  # noqa: ANN001
    started = time.process_time()
    for _ in range(count):
        try:
            await (admission.enter() if identity is None else admission.enter(identity.client_of(SCOPE)))
        except Exception:  # noqa: BLE001, S110 - every call is refused; only its cost is measured
            pass
    return (time.process_time() - started) / count * 1e6


async def admitted_us(module, count: int, identity: ClientIdentity | None = None) -> float:  # noqa: ANN001
    """One admitted upload's way through admission (with `identity`: its address, the door with 16 other clients
    holding a place each, its turn into the pipeline, the release)."""
    admission = module.Admission(module.Limits(max_wait_s=20, max_pending=1024, floor=32, door_wait_s=2))
    for i in range(16 if identity else 0):
        admission.admit(f"10.0.0.{i}")
    started = time.process_time()
    for _ in range(count):
        if identity is None:
            await admission.enter()
            admission.release()
            continue
        client = identity.client_of(SCOPE)
        await admission.enter(client)
        async with admission.turn(client):
            pass
        admission.release(client)
    return (time.process_time() - started) / count * 1e6


def main() -> None:
    old = load_old()
    identity = ClientIdentity(nodes=["127.0.0.1"])
    results: dict[str, list[float]] = {"before_us": [], "after_us": [], "after_429_us": [],
                                       "admitted_before_us": [], "admitted_after_us": []}
    for _ in range(3):
        results["before_us"].append(asyncio.run(refusals_us(full(old), 50_000)))
        results["after_us"].append(asyncio.run(refusals_us(full(new), 50_000, identity)))
        # 429: another client holds a place, and this one is over its share of one
        over = new.Admission(new.Limits(max_wait_s=100.0, max_pending=10**6, floor=4, door_wait_s=0,
                                        min_client_share=1))
        over.admit("someone-else")
        over.admit("127.0.0.2")
        results["after_429_us"].append(asyncio.run(refusals_us(over, 50_000, identity)))
        results["admitted_before_us"].append(asyncio.run(admitted_us(old, 50_000)))
        results["admitted_after_us"].append(asyncio.run(admitted_us(new, 50_000, identity)))
    print(json.dumps({k: [round(v, 2) for v in values] for k, values in results.items()}))


if __name__ == "__main__":
    main()
