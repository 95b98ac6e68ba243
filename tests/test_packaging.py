"""What pyproject.toml promises: Python 3.11 to 3.13, the torch a GPU machine already has, and constraints.txt (what
`make` installs) inside the ranges. Resolution only: nothing is installed."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import httpx
import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
PYTHONS = ("3.11", "3.12", "3.13")
# Versions the README claims work: the suite's, and what the GPU machines measured here came with.
CLAIMED = {"torch": ("2.11.0", "2.14.1"), "torchvision": ("0.26.0", "0.29.1"), "ray": ("2.60.0",)}


def _configured_index() -> str:
    """The index pip is configured with here (`index-url` in its environment or configuration files), else pip's
    own default: the test asks whatever index `make` would install from."""
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    urls = [line.split("=", 1)[1].strip().strip("'\"") for line in listed.splitlines()
            if line.split("=", 1)[0].endswith(".index-url")]
    if urls:
        return urls[0].rstrip("/") + "/"
    from pip._internal.models.index import PyPI  # pip's default index, as pip itself names it

    return PyPI.simple_url.rstrip("/") + "/"


INDEX = _configured_index()
MANYLINUX = [*(f"manylinux_2_{minor}_x86_64" for minor in range(39, 4, -1)),
             "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64"]


def _requirements() -> list[Requirement]:
    lines = PYPROJECT["dependencies"] + [r for extra in PYPROJECT["optional-dependencies"].values() for r in extra]
    return [r for r in map(Requirement, lines) if canonicalize_name(r.name) != "waterbirds"]


def _pins() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt pins exact versions only: {line!r}"
            pins[canonicalize_name(name)] = Version(version)
    return pins


def _python_make_picks(tmp_path: Path, versions: dict[str, str]) -> str:
    """The Python `make` picks on a PATH where each name in `versions` is an interpreter of that version (this one,
    told so) and no other Python comes before them."""
    for name in ("python3.11", "python3.12", "python3.13", "python3"):
        shim = tmp_path / name
        version = versions.get(name, "2.7")
        shim.write_text(f"#!/bin/sh\nexec {sys.executable} -c 'import sys; sys.version_info = "
                        f"({', '.join(version.split('.'))}, 0); exec(sys.argv[1])' \"$2\"\n")
        shim.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run(["make", "-s", "--no-print-directory", "-f", str(ROOT / "Makefile"),
                          "--eval", "which-python: ; @echo $(PYTHON)", "which-python"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


@pytest.mark.parametrize("python", PYTHONS)
def test_every_supported_python_is_admitted(python: str, tmp_path: Path) -> None:
    assert Version(python) in SpecifierSet(PYPROJECT["requires-python"])
    assert _python_make_picks(tmp_path, {f"python{python}": python}) == f"python{python}"


def test_make_passes_over_a_python_it_does_not_support(tmp_path: Path) -> None:
    picked = _python_make_picks(tmp_path, {"python3.11": "3.10", "python3.12": "3.14", "python3.13": "3.13"})
    assert picked == "python3.13"
    assert _python_make_picks(tmp_path, {"python3": "3.14"}) == ""


def test_the_next_python_is_not_claimed_before_it_is_checked() -> None:
    assert Version("3.14") not in SpecifierSet(PYPROJECT["requires-python"])


@pytest.mark.parametrize(("name", "version"), [(n, v) for n, versions in CLAIMED.items() for v in versions])
def test_the_claimed_versions_are_inside_the_ranges(name: str, version: str) -> None:
    ranges = [r.specifier for r in _requirements() if canonicalize_name(r.name) == name]
    assert ranges and all(Version(version) in spec for spec in ranges), (name, version, ranges)


def test_constraints_pin_every_requirement_inside_its_range() -> None:
    pins = _pins()
    for requirement in _requirements():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} has no pin in constraints.txt (make constraints)"
        assert pins[name] in requirement.specifier, f"constraints.txt pins {name} {pins[name]} outside {requirement}"


def _tags(python: str) -> set[Tag]:
    version = tuple(int(p) for p in python.split("."))
    return set(cpython_tags(version, platforms=MANYLINUX)) | set(compatible_tags(version, platforms=MANYLINUX))


async def _files(names: list[str]) -> dict[str, list[str]]:
    headers = {"Accept": "application/vnd.pypi.simple.v1+json"}
    limit = asyncio.Semaphore(16)
    async with httpx.AsyncClient(timeout=30, follow_redirects=True) as client:
        async def one(name: str) -> tuple[str, list[str]]:
            async with limit:
                response = await client.get(f"{INDEX}{name}/", headers=headers)
                response.raise_for_status()
                return name, [f["filename"] for f in response.json()["files"]]

        return dict(await asyncio.gather(*(one(n) for n in names)))


@pytest.fixture(scope="module")
def index_files() -> dict[str, list[str]]:
    try:
        return asyncio.run(_files(sorted(_pins())))
    except httpx.HTTPError as e:
        pytest.skip(f"the package index ({INDEX}) cannot be reached here: {type(e).__name__}")


@pytest.mark.parametrize("python", ("3.12", "3.13"))
def test_every_pinned_version_has_a_wheel_for(python: str, index_files: dict[str, list[str]]) -> None:
    """`make` on Python 3.12 or 3.13 finds an installable file for every pin in constraints.txt: a wheel for that
    Python on x86-64 Linux, or, where a release has no wheels at all, its source (pure Python)."""
    tags = _tags(python)
    missing = []
    for name, version in _pins().items():
        files = [f for f in index_files[name] if _version_of(f, name) == version]
        wheels = [f for f in files if f.endswith(".whl")]
        if wheels and not any(_wheel_tags(f) & tags for f in wheels):
            missing.append(f"{name}=={version}")
        elif not files:
            missing.append(f"{name}=={version} (not on the index)")
    assert not missing, f"no file for Python {python}: {missing}"


def _wheel_tags(filename: str) -> frozenset[Tag]:
    try:
        return parse_wheel_filename(filename)[3]
    except InvalidWheelFilename:  # old uploads with names no installer accepts today
        return frozenset()


def _version_of(filename: str, name: str) -> Version | None:
    if filename.endswith(".whl"):
        try:
            return parse_wheel_filename(filename)[1]
        except InvalidWheelFilename:
            return None
    match = re.match(rf"(?i){re.sub(r'[-_.]+', '[-_.]+', name)}-(.+?)\.(tar\.gz|zip)$", filename)
    try:
        return Version(match.group(1)) if match else None
    except ValueError:
        return None
