"""Our service end to end against its limits and the 2019 design, with the same model and photos, in one run:

1. the in-process limit (decode + preprocess + model in a tight loop, `load.bare_model.in_process`), before and
   after the HTTP phases, and the backend `auto` chose (ONNX Runtime on a CPU) against torch in process;
2. the local profile (`make serve`) at 1, 8, 64 and 400 users; one user's serving overhead; ours against the
   in-process limit in alternating slices; the backends again through the service, swapped in place;
3. the serving ceiling: the same pipeline with the Classifier's forward pass skipped;
4. the 2019 design (Flask + `gunicorn -w N`) at the same points.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from load import runner
from load.bare_model import in_process
from load.loadgen import Upload, run_load


@dataclass(frozen=True)
class Settings:
    seconds: float = 20.0
    users: tuple[int, ...] = (1, 8, 64, 400)
    seed_workers: int = 0  # gunicorn workers for the 2019 design; 0: one per CPU, its best case


def _limit(uploads: list[Upload], seconds: float) -> dict[str, Any]:
    runs = [in_process(uploads, processes=2, threads=1, batch_size=1, seconds=seconds),
            in_process(uploads, processes=1, threads=2, batch_size=1, seconds=seconds),
            in_process(uploads, processes=2, threads=1, batch_size=4, seconds=seconds)]
    one = in_process(uploads, processes=1, threads=1, batch_size=1, seconds=seconds)
    for r in [*runs, one]:
        print(f"  in-process {r['processes']} proc x {r['threads']} threads, batch {r['batch_size']}: "
              f"{r['images_per_s']} img/s, p50 {r['latency_ms_p50']} ms", flush=True)
    return {"runs": runs, "best": max(runs, key=lambda r: r["images_per_s"]), "single": one}


def _backend_ratio(runs: dict[str, list[float]], chosen: str) -> dict[str, Any]:
    ratios = [round(a / t, 3) for t, a in zip(runs["torch"], runs["auto"], strict=True)]
    return {"auto_chose": chosen, "torch": runs["torch"], "auto": runs["auto"], "ratios": ratios,
            "median_ratio": round(statistics.median(ratios), 3)}


def _backends_in_process(uploads: list[Upload], seconds: float, rounds: int = 2) -> dict[str, Any]:
    """2 processes x 1 thread, batch 1, with torch and with `auto`, alternating so that drift hits both alike."""
    runs: dict[str, list[float]] = {"torch": [], "auto": []}
    chosen = ""
    for _ in range(rounds):
        for backend in runs:
            result = in_process(uploads, processes=2, threads=1, batch_size=1, seconds=seconds, backend=backend)
            runs[backend].append(result["images_per_s"])
            chosen = result["backend"] if backend == "auto" else chosen
            print(f"  in-process, {result['backend']}: {result['images_per_s']} img/s", flush=True)
    return _backend_ratio(runs, chosen)


def _serving_overhead(uploads: list[Upload], requests: int = 100) -> dict[str, float]:
    """One user, one request at a time: the client's latency minus the preprocess and inference times each answer
    reports, so that the machine's drift between phases cannot enter it."""
    rows = []
    with httpx.Client(timeout=60) as client:
        for upload in itertools.islice(itertools.cycle(uploads), requests):
            start = time.perf_counter()
            response = client.post(runner.CLASSIFY_URL, content=upload.data, headers={"Content-Type": "image/jpeg"})
            timing = response.json()["timing_ms"]
            rows.append(((time.perf_counter() - start) * 1000, timing["preprocess"] + timing["inference"]))
    return {"overhead_ms_p50": round(statistics.median(r[0] - r[1] for r in rows), 2),
            "work_ms_p50": round(statistics.median(r[1] for r in rows), 2),
            "latency_ms_p50": round(statistics.median(r[0] for r in rows), 2)}


def _paired(uploads: list[Upload], users: int, seconds: float, rounds: int = 3) -> dict[str, Any]:
    """Ours against the in-process limit (2 processes x 1 thread, batch 1: how the local profile runs the model) in
    alternating slices a few seconds apart, so that the machine's drift over minutes hits both alike."""
    ratios = []
    for _ in range(rounds):
        limit = in_process(uploads, processes=2, threads=1, batch_size=1, seconds=seconds)["images_per_s"]
        ours = asyncio.run(run_load(runner.CLASSIFY_URL, uploads, users=users, seconds=seconds, timeout_s=120))
        ratios.append(round(ours.throughput() / limit, 3))
        print(f"  paired: in-process {limit} img/s, ours at {users} users {ours.throughput():.2f} req/s", flush=True)
    return {"users": users, "seconds": seconds, "ratios": ratios, "median": statistics.median(ratios)}


def _ours(uploads: list[Upload], s: Settings) -> dict[str, Any]:
    config = runner.serve_config("local")
    with runner.Cluster() as cluster:
        cluster.deploy(config, uploads[0])
        print("our service (serve_config.local.yaml):", flush=True)
        ours = {str(u): runner.point(runner.CLASSIFY_URL, uploads, u, s.seconds) for u in s.users}
        overhead = _serving_overhead(uploads)
        print(f"  one user, serving overhead p50 {overhead['overhead_ms_p50']} ms", flush=True)
        best = max(s.users, key=lambda u: ours[str(u)]["throughput_rps"])
        paired = _paired(uploads, users=best, seconds=s.seconds / 2)
        print("backends through the service (torch, then auto, twice), each a swap in place:", flush=True)
        runs: dict[str, list[float]] = {"torch": [], "auto": []}
        chosen = ""
        for backend in [*runs] * 2:
            runner.deployment(config, "Classifier")["user_config"]["backend"] = backend
            running = cluster.deploy(config, uploads[0], backend=backend)
            chosen = running if backend == "auto" else chosen
            runs[backend].append(runner.point(runner.CLASSIFY_URL, uploads, 64, s.seconds)["throughput_rps"])
        print("serving ceiling (the Classifier skips the forward pass):", flush=True)
        cluster.deploy(runner.serve_config("local", skip_forward=True), uploads[0])
        ceiling = {str(u): runner.point(runner.CLASSIFY_URL, uploads, u, s.seconds) for u in (1, 64)}
    return {"ours": ours, "ceiling": ceiling, "overhead": overhead, "paired": paired,
            "backends": {"users": 64, **_backend_ratio(runs, chosen)}}


def run(s: Settings) -> dict[str, Any]:
    uploads = runner.uploads()
    workers = s.seed_workers or runner.machine()["cpus"]
    date = runner.now()
    print("in-process limit (before), then the backends in process (torch, then auto, twice):", flush=True)
    before = _limit(uploads, s.seconds / 2)
    backends_in_process = _backends_in_process(uploads, s.seconds / 2)
    service = _ours(uploads, s)
    with runner.seed_service("default", workers, uploads[0]) as url:
        print(f"the 2019 design (Flask + gunicorn -w {workers}, embedded default):", flush=True)
        seed = {str(u): runner.point(url, uploads, u, s.seconds) for u in s.users}
    print("in-process limit (after):", flush=True)
    after = _limit(uploads, s.seconds / 2)
    limit = (before["best"]["images_per_s"] + after["best"]["images_per_s"]) / 2
    single_ms = (before["single"]["latency_ms_p50"] + after["single"]["latency_ms_p50"]) / 2
    ours, ceiling = service["ours"], service["ceiling"]
    ratios = {
        "ours_over_in_process_limit": round(max(r["throughput_rps"] for r in ours.values()) / limit, 3),
        "ours_over_in_process_paired": service["paired"]["median"],
        "ours_latency_one_user_minus_in_process_ms": round(ours["1"]["latency_ms_p50"] - single_ms, 1)
        if "1" in ours else None,
        "serving_overhead_one_user_ms": service["overhead"]["overhead_ms_p50"],
        "serving_ceiling_rps": max(r["throughput_rps"] for r in ceiling.values()),
        "auto_over_torch_in_process": backends_in_process["median_ratio"],
        "auto_over_torch_through_service": service["backends"]["median_ratio"],
    }
    for u in ("64", "400"):
        if u in ours and u in seed:
            ratios[f"throughput_ours_over_seed_at_{u}"] = round(
                ours[u]["throughput_rps"] / max(seed[u]["throughput_rps"], 1e-9), 3)
            ratios[f"p99_ours_over_seed_at_{u}"] = round(ours[u]["latency_ms_p99"] / seed[u]["latency_ms_p99"], 3)
    return {
        "date": date, "machine": runner.machine(), "seconds_per_point": s.seconds,
        "in_process": {"before": before, "after": after, "limit_images_per_s": round(limit, 2),
                       "single_image_latency_ms": round(single_ms, 2), "backend": before["best"]["backend"]},
        "backends": {"in_process": backends_in_process, "through_service": service["backends"]},
        "ours": ours, "serving_overhead_one_user": service["overhead"], "paired_with_in_process": service["paired"],
        "serving_ceiling": ceiling, "seed_baseline": {"workers": workers, "results": seed}, "ratios": ratios,
    }


def plot(report: dict[str, Any], path: Path) -> None:
    runner.plot_by_users(path, f"Waterbird service, {report['machine']['cpus']} CPUs, {report['date'][:10]}",
                         [("ours (Ray Serve)", report["ours"], "o-"),
                          ("2019 design (Flask + gunicorn)", report["seed_baseline"]["results"], "s--")],
                         latencies=("latency_ms_p50", "latency_ms_p99"),
                         limits=[("in-process limit", report["in_process"]["limit_images_per_s"])])


def sections(report: dict[str, Any]) -> dict[str, str]:
    seed, r, ip = report["seed_baseline"]["results"], report["ratios"], report["in_process"]
    rows = ["| users | ours req/s | ours p50 ms | ours p99 ms | ours 503 | 2019 design req/s | 2019 p50 ms "
            "| 2019 p99 ms |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for u in sorted(report["ours"], key=int):
        o, s = report["ours"][u], seed.get(u, {})
        rows.append(f"| {u} | {o['throughput_rps']} | {o['latency_ms_p50']} | {o['latency_ms_p99']} | "
                    f"{o['overloaded_503']} | {s.get('throughput_rps', '')} | {s.get('latency_ms_p50', '')} | "
                    f"{s.get('latency_ms_p99', '')} |")
    inp, svc = report["backends"]["in_process"], report["backends"]["through_service"]

    def runs(b: dict[str, Any], unit: str) -> str:
        return (f"torch {' / '.join(map(str, b['torch']))} {unit} against {b['auto_chose']} "
                f"{' / '.join(map(str, b['auto']))} {unit}")

    lines = [
        f"Measured {report['date']} on {report['machine']['cpus']} CPUs ({report['machine']['platform']}), "
        f"{report['seconds_per_point']:g} s per point, `make bench`. Every figure below runs the model with the "
        f"backend `auto` chose here, **{ip['backend']}**, ours, the 2019 design and the in-process limit alike, "
        f"except the torch column of the backend comparison.", "", *rows, "",
        f"- In-process limit (decode + preprocess + model, best of 2x1-thread / 1x2-thread / batch 4, mean of "
        f"before and after): **{ip['limit_images_per_s']} img/s**; one image alone: "
        f"{ip['single_image_latency_ms']} ms.",
        f"- Ours / in-process limit: **{r['ours_over_in_process_limit']}**; measured in alternating slices "
        f"(ours at {report['paired_with_in_process']['users']} users against 2 processes x 1 thread, the median of "
        f"{len(report['paired_with_in_process']['ratios'])}): **{r['ours_over_in_process_paired']}**. Ours at one "
        f"user, p50 minus the in-process latency: **{r['ours_latency_one_user_minus_in_process_ms']} ms**; "
        f"measured within the same requests (client latency minus the preprocess and inference times each answer "
        f"reports, p50): **{r['serving_overhead_one_user_ms']} ms**.",
        f"- Serving ceiling (the same pipeline, classifier skipping the forward pass): "
        f"**{r['serving_ceiling_rps']} req/s**.",
        f"- Backend `auto` ({inp['auto_chose']}) / torch, alternating runs: in process (2 processes x 1 thread, "
        f"batch 1) **{inp['median_ratio']}x** ({runs(inp, 'img/s')}); through the service at {svc['users']} users, "
        f"swapped in place with `serve deploy` **{svc['median_ratio']}x** ({runs(svc, 'req/s')}).",
    ]
    for u in ("64", "400"):
        if f"throughput_ours_over_seed_at_{u}" in r:
            lines.append(f"- At {u} users, ours / 2019 design: throughput "
                         f"**{r[f'throughput_ours_over_seed_at_{u}']}**, p99 **{r[f'p99_ours_over_seed_at_{u}']}**.")
    return {"bench": "\n".join(lines)}
