"""`python -m load SCENARIO [options]`: one command for every measurement. A scenario is a module that declares its
`Settings` (a frozen dataclass: its options, with their defaults), `run(settings)` (one result, JSON data) and
`sections(result)` (the markdown it writes between the `<!-- NAME:start -->` and `<!-- NAME:end -->` markers of
docs/performance.md), and where it draws one, `plot(result, path)`. The result is written to `--out` (default
`load/results/<scenario>-<date>.json`), the plot beside it, the sections printed, and with `--docs` written into
the page.

`make bench` is `python -m load bench --docs`: `service` then the scenarios of `BENCH`, in one report
(`load/results/<date>.json`). The GPU machine's run is `python -m load.gpu_run` (load/gpu_run.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from load import runner

SCENARIOS = {"bench": __name__, "service": "load.service", "cost": "load.cost", "overload": "load.overload",
             "fairness": "load.fairness", "classifier": "load.classifier", "collection": "load.collection",
             "gpu": "load.gpu", "variants": "load.variants", "gpu-check": "load.gpu_check",
             "phone": "load.phone_page", "models": "load.models"}
# What `make bench` runs after the service end to end: (its key in the report, scenario, settings changed).
BENCH: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("serving_cost", "cost", {}),
    ("overload", "overload", {}),
    ("fairness", "fairness", {}),
    ("classifier_alone", "classifier", {"simulate": True}),
    ("collection", "collection", {}),
    # The VGG16-BCNN at 448 takes about a hundred times as long a photo as the default: hundreds, not thousands.
    ("collection_448", "collection", {"checkpoint": "vgg16_448", "photos": 24, "predict_photos": 24}),
    ("models", "models", {}),
)


@dataclasses.dataclass(frozen=True)
class Settings:
    seconds: float = 20.0
    users: tuple[int, ...] = (1, 8, 64, 400)
    seed_workers: int = 0  # gunicorn workers for the 2019 design; 0: one per CPU, its best case
    node_cores: int = 16  # the GPU node the serving cost is projected onto: its cores
    gpu_rate: float = 1693.0  # and its GPU's images/s


def _scenario(name: str) -> Any:
    return importlib.import_module(SCENARIOS[name])


def run(s: Settings) -> dict[str, Any]:
    service = _scenario("service")
    report = service.run(service.Settings(s.seconds, s.users, s.seed_workers))
    common = {"seed_workers": s.seed_workers, "cores": s.node_cores, "gpu_rate": s.gpu_rate}
    for key, name, changes in BENCH:
        module = _scenario(name)
        fields = {f.name for f in dataclasses.fields(module.Settings)}
        print(f"{name}:", flush=True)
        report[key] = module.run(module.Settings(**{k: v for k, v in common.items() if k in fields}, **changes))
    return report


def plot(report: dict[str, Any], path: Path) -> None:
    _scenario("service").plot(report, path)


def sections(report: dict[str, Any]) -> dict[str, str]:
    texts = _scenario("service").sections(report)
    for key, name, _ in BENCH:
        texts |= _scenario(name).sections(report[key])
    return texts


def _parser(name: str, module: Any) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m load {name}", description=module.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(module.Settings):
        flag, default = "--" + f.name.replace("_", "-"), f.default
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif isinstance(default, tuple):
            kind = type(default[0]) if default else str
            parser.add_argument(flag, type=lambda text, kind=kind: tuple(kind(v) for v in text.split(",") if v),
                                default=default, metavar=",".join(map(str, default)))
        else:
            parser.add_argument(flag, type=type(default), default=default, metavar=str(default))
    parser.add_argument("--out", type=Path, help="the result as JSON (a plot beside it)")
    parser.add_argument("--docs", action="store_true", help="write its sections into docs/performance.md")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in SCENARIOS:
        print(f"usage: python -m load {{{','.join(SCENARIOS)}}} [options] (--help for each)", file=sys.stderr)
        return 2
    name, module = argv[0], _scenario(argv[0])
    args = _parser(name, module).parse_args(argv[1:])
    # Ray reads its settings (the token auth among them) once, when it is first imported: a scenario that imports it
    # (the benchmark devices, the Classifier alone) must find them already set, whichever runs first.
    os.environ.update({k: v for k, v in runner.serve_env().items() if k.startswith("RAY_")})
    result = module.run(module.Settings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(module.Settings)}))
    date = runner.now()[:10]
    out = args.out or runner.RESULTS / (f"{date}.json" if name == "bench" else f"{name}-{date}.json")
    runner.save(result, out)
    texts = module.sections(result) if hasattr(module, "sections") else {}
    if hasattr(module, "plot"):
        module.plot(result, out.with_suffix(".png"))
        first = next(iter(texts), None)
        if first is not None and out.resolve().parent == runner.RESULTS:
            texts[first] += f"\n\n![{name}](../load/results/{out.with_suffix('.png').name})"
    if not texts:
        print(json.dumps(result, indent=1, ensure_ascii=False))
    for marker, text in texts.items():
        print(f"\n{text}")
        if args.docs:
            runner.replace_doc_section((f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"), text)
    print(f"\nwritten: {out}")
    return 1 if isinstance(result, dict) and result.get("passed") is False else 0


if __name__ == "__main__":
    sys.exit(main())
