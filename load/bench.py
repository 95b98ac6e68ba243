"""`make bench`: in one run on this machine, with the same model and photos,

1. the in-process limit (decode + preprocess + model in a tight loop), before and after the HTTP phases;
2. our service end to end over HTTP (local profile) at 1, 8, 64 and 400 concurrent users;
   the backend `auto` chose (ONNX Runtime on a CPU) against torch, in process and through the service, alternating;
3. the serving ceiling: the same pipeline with the classifier told to skip the forward pass;
4. the replaced 2019 design (Flask + `gunicorn -w N`) at the same concurrencies;
5. the serving cost: CPU per answered request per process role of the production file (VGG16-BCNN 448, forward
   pass skipped) with HAProxy and with Serve's proxy, the 2019 design beside it, and what that means for a GPU node
   (`load.serving_cost`);
6. overload: retry storms of 400 and 1,000 users that ignore Retry-After, after 16 calm users, on the local profile
   and on the production file (VGG16-BCNN 448, forward skipped, replicas fixed) (`load.overload`);
7. fairness: 16 polite users with one greedy client of 400 connections, from one address and from 50, on the local
   profile (`load.fairness`);
8. the Classifier alone against a simulated H200: how busy it keeps its device (`load.classifier_profile`);
9. a whole collection: `waterbirds-classify` over 2,000 and 20,000 links to the photos against `bcnn predict`
   (`load.collection`);

then writes `load/results/<date>.json`, a plot beside it, and the results tables into docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import yaml

from load import classifier_profile, collection, fairness, harness, overload, serving_cost
from load.inprocess import measure
from load.loadgen import Upload, load_uploads, run_load

USERS = (1, 8, 64, 400)
BENCH_START, BENCH_END = "<!-- bench:start -->", "<!-- bench:end -->"
COST_MARKERS = ("<!-- bench-cost:start -->", "<!-- bench-cost:end -->")
OVERLOAD_MARKERS = ("<!-- bench-overload:start -->", "<!-- bench-overload:end -->")
FAIRNESS_MARKERS = ("<!-- bench-fairness:start -->", "<!-- bench-fairness:end -->")
CLASSIFIER_MARKERS = ("<!-- bench-classifier:start -->", "<!-- bench-classifier:end -->")
COLLECTION_MARKERS = ("<!-- bench-collection:start -->", "<!-- bench-collection:end -->")


def _serving_overhead(url: str, uploads: list[Upload], requests: int = 100) -> dict[str, float]:
    """One user, one request at a time: what the service adds to the work itself, from the same requests (the
    client's latency minus the preprocess and inference times the answer reports), so the machine's drift
    between phases cannot enter it."""
    rows = []
    with httpx.Client(timeout=60) as client:
        for upload in itertools.islice(itertools.cycle(uploads), requests):
            start = time.perf_counter()
            response = client.post(url, content=upload.data, headers={"Content-Type": "image/jpeg"})
            latency_ms = (time.perf_counter() - start) * 1000
            timing = response.json()["timing_ms"]
            rows.append((latency_ms, timing["preprocess"], timing["inference"]))
    overhead, work = [r[0] - r[1] - r[2] for r in rows], [r[1] + r[2] for r in rows]
    result = {"overhead_ms_p50": round(statistics.median(overhead), 2),
              "work_ms_p50": round(statistics.median(work), 2),
              "latency_ms_p50": round(statistics.median(r[0] for r in rows), 2)}
    print(f"  one user, serving overhead p50 {result['overhead_ms_p50']} ms (work {result['work_ms_p50']} ms)",
          flush=True)
    return result


def _paired(url: str, uploads: list[Upload], users: int, seconds: float, rounds: int = 3) -> dict[str, Any]:
    """Ours against the in-process limit (2 processes x 1 thread, batch 1: how the local profile runs the model)
    in alternating slices a few seconds apart, so that the machine's drift over minutes hits both alike."""
    ratios = []
    for _ in range(rounds):
        limit = measure(uploads, processes=2, threads=1, batch_size=1, seconds=seconds)["images_per_s"]
        ours = asyncio.run(run_load(url, uploads, users=users, seconds=seconds, timeout_s=120)).throughput()
        ratios.append(round(ours / limit, 3))
        print(f"  paired: in-process {limit} img/s, ours at {users} users {ours:.2f} req/s", flush=True)
    return {"users": users, "seconds": seconds, "ratios": ratios, "median": statistics.median(ratios)}


def _backends_in_process(uploads: list[Upload], seconds: float, rounds: int = 2) -> dict[str, Any]:
    """The in-process limit's configuration (2 processes x 1 thread, batch 1) with torch and with the backend
    `auto` picks, alternating so that the machine's drift hits both alike."""
    runs: dict[str, list[float]] = {"torch": [], "auto": []}
    chosen = ""
    for _ in range(rounds):
        for backend in runs:
            result = measure(uploads, processes=2, threads=1, batch_size=1, seconds=seconds, backend=backend)
            runs[backend].append(result["images_per_s"])
            chosen = result["backend"] if backend == "auto" else chosen
            print(f"  in-process, {result['backend']}: {result['images_per_s']} img/s", flush=True)
    return _backend_ratio(runs, chosen)


def _backend_ratio(runs: dict[str, list[float]], chosen: str) -> dict[str, Any]:
    ratios = [round(a / t, 3) for t, a in zip(runs["torch"], runs["auto"], strict=True)]
    return {"auto_chose": chosen, "torch": runs["torch"], "auto": runs["auto"], "ratios": ratios,
            "median_ratio": round(statistics.median(ratios), 3)}


def _backends_through_service(url: str, uploads: list[Upload], config: dict[str, Any], env: dict[str, str],
                              users: int, seconds: float, rounds: int = 2) -> dict[str, Any]:
    """Our service at `users` with the Classifier's `backend` set to torch, then back to auto, alternating: each
    a model swap in place (`serve deploy`), as an operator would do it."""
    classifier = harness.deployment(config, "Classifier")
    runs: dict[str, list[float]] = {"torch": [], "auto": []}
    chosen = ""
    for _ in range(rounds):
        for backend in runs:
            classifier["user_config"]["backend"] = backend
            running = harness.deploy(config, env, uploads[0], model_name=harness.model_name("default"), backend=backend)
            chosen = running if backend == "auto" else chosen
            print(f"  through the service, backend {running}:", flush=True)
            runs[backend].append(harness.load_point(url, uploads, users, seconds)["throughput_rps"])
    classifier["user_config"]["backend"] = "auto"
    harness.deploy(config, env, uploads[0], model_name=harness.model_name("default"))
    return {"users": users, **_backend_ratio(runs, chosen)}


def _our_service(uploads: list[Upload], seconds: float, users: tuple[int, ...]) -> dict[str, Any]:
    env = harness.serve_env()
    config = yaml.safe_load((harness.ROOT / "serve_config.local.yaml").read_text())
    with harness.ray_cluster(env):
        harness.deploy(config, env, uploads[0], model_name=harness.model_name("default"))
        url = harness.SERVICE_URL + "/classify"
        print("our service (serve_config.local.yaml):", flush=True)
        ours = {str(u): harness.load_point(url, uploads, u, seconds) for u in users}
        overhead = _serving_overhead(url, uploads)
        paired = _paired(url, uploads, users=max(users, key=lambda u: ours[str(u)]["throughput_rps"]),
                         seconds=seconds / 2)
        print("backends through the service (torch, then auto, twice):", flush=True)
        backends = _backends_through_service(url, uploads, config, env, users=64, seconds=seconds)

        from load.devices import on_device  # Ray with it: not before the profiles have set RAY_AUTH_MODE

        config = on_device(config)
        harness.deploy(config, env, uploads[0], model_name=harness.model_name("default"))
        print("serving ceiling (classifier skips the forward pass):", flush=True)
        ceiling = {str(u): harness.load_point(url, uploads, u, seconds) for u in (1, 64)}
        return {"ours": ours, "ceiling": ceiling, "overhead": overhead, "paired": paired, "backends": backends}


def _seed_baseline(uploads: list[Upload], seconds: float, users: tuple[int, ...], workers: int) -> dict[str, Any]:
    with harness.seed_service("default", workers, uploads[0]) as url:
        print(f"seed baseline (Flask + gunicorn -w {workers}, embedded default):", flush=True)
        return {str(u): harness.load_point(url, uploads, u, seconds) for u in users}


def _in_process(uploads: list[Upload], seconds: float) -> dict[str, Any]:
    runs = [measure(uploads, processes=2, threads=1, batch_size=1, seconds=seconds),
            measure(uploads, processes=1, threads=2, batch_size=1, seconds=seconds),
            measure(uploads, processes=2, threads=1, batch_size=4, seconds=seconds)]
    for r in runs:
        print(f"  in-process {r['processes']} proc x {r['threads']} threads, batch {r['batch_size']}: "
              f"{r['images_per_s']} img/s, p50 {r['latency_ms_p50']} ms", flush=True)
    one = measure(uploads, processes=1, threads=1, batch_size=1, seconds=seconds)
    print(f"  in-process single image latency (1 proc, 1 thread): {one['latency_ms_p50']} ms", flush=True)
    return {"runs": runs, "best": max(runs, key=lambda r: r["images_per_s"]), "single": one}


def run(seconds: float, users: tuple[int, ...], workers: int, node: serving_cost.Node) -> dict[str, Any]:
    uploads = [Upload(u.name, u.data) for u in load_uploads(harness.PHOTOS)]
    print(f"{len(uploads)} photos from {harness.PHOTOS}", flush=True)
    print("in-process limit (before):", flush=True)
    before = _in_process(uploads, seconds / 2)
    print("backends in process (torch, then auto, twice):", flush=True)
    backends_in_process = _backends_in_process(uploads, seconds / 2)
    service = _our_service(uploads, seconds, users)
    seed = _seed_baseline(uploads, seconds, users, workers)
    print("in-process limit (after):", flush=True)
    after = _in_process(uploads, seconds / 2)
    cost = serving_cost.run(uploads, node=node, seed_workers=workers)
    print("overload: retry storms of 400 and 1,000 users, local profile, then the production file:", flush=True)
    storms = [overload.run(uploads, profile="local"), overload.run(uploads, profile="production", fixed_replicas=True)]
    print("fairness: one greedy client (400 connections from one address, then from 50) and 16 polite users:",
          flush=True)
    fair = fairness.measure(uploads)
    print("the Classifier alone against a simulated H200:", flush=True)
    classifier = classifier_profile.run(classifier_profile.Settings(simulate=True))
    print(f"  {classifier['images_per_s']} of the device's {classifier['device_limit_images_per_s']} images/s "
          f"(busy {classifier['device_busy']})", flush=True)
    print("a whole collection: waterbirds-classify against bcnn predict:", flush=True)
    whole = collection.measure(2000, 300, "default")
    limit = (before["best"]["images_per_s"] + after["best"]["images_per_s"]) / 2
    single_ms = (before["single"]["latency_ms_p50"] + after["single"]["latency_ms_p50"]) / 2
    ours, ceiling, overhead, paired = service["ours"], service["ceiling"], service["overhead"], service["paired"]
    best_ours = max(r["throughput_rps"] for r in ours.values())
    ratios = {
        "ours_over_in_process_limit": round(best_ours / limit, 3),
        "ours_over_in_process_paired": paired["median"],
        "ours_latency_one_user_minus_in_process_ms": round(ours["1"]["latency_ms_p50"] - single_ms, 1)
        if "1" in ours else None,
        "serving_overhead_one_user_ms": overhead["overhead_ms_p50"],
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
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": len(os.sched_getaffinity(0)), "platform": platform.platform(),
                    "python": platform.python_version()},
        "seconds_per_point": seconds,
        "in_process": {"before": before, "after": after, "limit_images_per_s": round(limit, 2),
                       "single_image_latency_ms": round(single_ms, 2), "backend": before["best"]["backend"]},
        "backends": {"in_process": backends_in_process, "through_service": service["backends"]},
        "ours": ours,
        "serving_overhead_one_user": overhead,
        "paired_with_in_process": paired,
        "serving_ceiling": ceiling,
        "seed_baseline": {"workers": workers, "results": seed},
        "ratios": ratios,
        "serving_cost": cost,
        "overload": storms,
        "fairness": fair,
        "classifier_alone": classifier,
        "collection": whole,
    }


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, results, style in (("ours (Ray Serve)", report["ours"], "o-"),
                                 ("2019 design (Flask + gunicorn)", report["seed_baseline"]["results"], "s--")):
        users = sorted(results, key=int)
        x = [int(u) for u in users]
        left.plot(x, [results[u]["throughput_rps"] for u in users], style, label=name)
        right.plot(x, [results[u]["latency_ms_p50"] for u in users], style, label=f"{name} p50")
        right.plot(x, [results[u]["latency_ms_p99"] for u in users], style, alpha=0.5, label=f"{name} p99")
    left.axhline(report["in_process"]["limit_images_per_s"], color="gray", linestyle=":", label="in-process limit")
    harness.finish_plot(fig, "answers per second", "latency (ms)",
                f"Waterbird service, {report['machine']['cpus']} CPUs, {report['date'][:10]}", path)


def table(report: dict[str, Any]) -> str:
    seed = report["seed_baseline"]["results"]
    rows = ["| users | ours req/s | ours p50 ms | ours p99 ms | ours 503 | 2019 design req/s | 2019 p50 ms "
            "| 2019 p99 ms |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for u in sorted(report["ours"], key=int):
        o, s = report["ours"][u], seed.get(u, {})
        rows.append(f"| {u} | {o['throughput_rps']} | {o['latency_ms_p50']} | {o['latency_ms_p99']} | "
                    f"{o['overloaded_503']} | {s.get('throughput_rps', '')} | {s.get('latency_ms_p50', '')} | "
                    f"{s.get('latency_ms_p99', '')} |")
    r = report["ratios"]
    ip = report["in_process"]
    lines = [
        f"Measured {report['date']} on {report['machine']['cpus']} CPUs ({report['machine']['platform']}), "
        f"{report['seconds_per_point']:g} s per point, `make bench`. Every figure below runs the model with the "
        f"backend `auto` chose here, **{ip['backend']}**, ours, the 2019 design and the in-process limit alike, "
        f"except the torch column of the backend comparison.",
        "",
        *rows,
        "",
        f"- In-process limit (decode + preprocess + model, best of 2x1-thread / 1x2-thread / batch 4, mean of "
        f"before and after): **{ip['limit_images_per_s']} img/s**; one image alone: "
        f"{ip['single_image_latency_ms']} ms.",
        f"- Ours / in-process limit: **{r['ours_over_in_process_limit']}**; measured in alternating slices "
        f"(ours at {report['paired_with_in_process']['users']} users against 2 processes x 1 thread, the median of "
        f"{len(report['paired_with_in_process']['ratios'])}): **{r['ours_over_in_process_paired']}**. "
        f"Ours at one user, p50 minus the "
        f"in-process latency: **{r['ours_latency_one_user_minus_in_process_ms']} ms**; measured within the same "
        f"requests (client latency minus the preprocess and inference times each answer reports, p50): "
        f"**{r['serving_overhead_one_user_ms']} ms**.",
        f"- Serving ceiling (the same pipeline, classifier skipping the forward pass): "
        f"**{r['serving_ceiling_rps']} req/s**.",
        _backends_line(report["backends"]),
    ]
    for u in ("64", "400"):
        if f"throughput_ours_over_seed_at_{u}" in r:
            lines.append(f"- At {u} users, ours / 2019 design: throughput "
                         f"**{r[f'throughput_ours_over_seed_at_{u}']}**, p99 **{r[f'p99_ours_over_seed_at_{u}']}**.")
    return "\n".join(lines)


def _backends_line(backends: dict[str, Any]) -> str:
    in_process, service = backends["in_process"], backends["through_service"]

    def runs(b: dict[str, Any], unit: str) -> str:
        return (f"torch {' / '.join(map(str, b['torch']))} {unit} against {b['auto_chose']} "
                f"{' / '.join(map(str, b['auto']))} {unit}")

    return (f"- Backend `auto` ({in_process['auto_chose']}) / torch, alternating runs: in process (2 processes x 1 "
            f"thread, batch 1) **{in_process['median_ratio']}x** ({runs(in_process, 'img/s')}); through the service at "
            f"{service['users']} users, swapped in place with `serve deploy` **{service['median_ratio']}x** "
            f"({runs(service, 'req/s')}).")


def cost_section(report: dict[str, Any]) -> str:
    cost = report["serving_cost"]
    return (f"Measured {report['date']} on {report['machine']['cpus']} CPUs, `make bench`: {cost['model']}, "
            f"{cost['users']} users for {cost['seconds']:g} s after a warm-up, the production `serve_config.yaml` "
            f"on Ray declaring 16 CPUs and 1 GPU; CPU from /proc per process, each process's idle rate "
            f"subtracted.\n\n{serving_cost.table(cost)}")


def classifier_section(report: dict[str, Any]) -> str:
    return (f"`make bench` {report['date']} on {report['machine']['cpus']} CPUs, the simulated H200 (time_scale 1), "
            f"20 s:\n\n{classifier_profile.table({'make bench': report['classifier_alone']})}")


def main(argv: list[str] | None = None) -> int:
    profile = argparse.ArgumentParser(add_help=False)
    profile.add_argument("--profile", choices=("cpu", "gpu", "classifier"), default="cpu")
    chosen, rest = profile.parse_known_args(argv)
    if chosen.profile == "gpu":
        from load import gpu_profile

        return gpu_profile.main(rest)
    if chosen.profile == "classifier":
        from load import classifier_profile

        return classifier_profile.main(rest)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=("cpu", "gpu", "classifier"), default="cpu",
                        help="gpu: the production file on a GPU machine (python -m load.bench --profile gpu --help); "
                             "classifier: the Classifier alone against its device, real or simulated")
    parser.add_argument("--seconds", type=float, default=20.0, help="measuring time per point")
    parser.add_argument("--users", default=",".join(map(str, USERS)))
    parser.add_argument("--seed-workers", type=int, default=len(os.sched_getaffinity(0)),
                        help="gunicorn workers for the 2019 design (default: one per CPU, its best case)")
    parser.add_argument("--node-cores", type=int, default=serving_cost.Node.cores,
                        help="the GPU node the serving cost is projected onto: its cores (default: the H100 machine)")
    parser.add_argument("--gpu-rate", type=float, default=serving_cost.Node.gpu_images_per_s,
                        help="and its GPU's images/s (default: the H100 with the VGG16-BCNN 448 at batch 128)")
    parser.add_argument("--no-readme", action="store_true")
    args = parser.parse_args(argv)
    if not harness.PHOTOS.is_dir():
        print(f"no photos at {harness.PHOTOS}; set WATERBIRD_PHOTOS to a folder of JPEGs", file=sys.stderr)
        return 2
    harness.RESULTS.mkdir(parents=True, exist_ok=True)
    report = run(args.seconds, tuple(int(u) for u in args.users.split(",")), args.seed_workers,
                 serving_cost.Node(args.node_cores, args.gpu_rate))
    stem = report["date"][:10]
    (harness.RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, harness.RESULTS / f"{stem}.png")
    text = table(report)
    cost = cost_section(report)
    print("\n" + text + "\n\n" + cost)
    if not args.no_readme:
        harness.replace_doc_section((BENCH_START, BENCH_END), f"{text}\n\n![Benchmark](../load/results/{stem}.png)")
        harness.replace_doc_section(COST_MARKERS, cost)
        harness.replace_doc_section(CLASSIFIER_MARKERS, classifier_section(report))
        harness.replace_doc_section(COLLECTION_MARKERS, collection.section(report["collection"]))
        harness.replace_doc_section(OVERLOAD_MARKERS, overload.section(report["overload"], report["date"],
                                                               report["machine"]["cpus"]))
        harness.replace_doc_section(FAIRNESS_MARKERS, fairness.section(report["fairness"], report["date"],
                                                               report["machine"]["cpus"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
