"""The lock (constraints.txt) agrees with pyproject.toml's ranges, and is what is installed."""

from __future__ import annotations

import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def _requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"]) + list(project["optional-dependencies"]["test"])
    return [Requirement(r) for r in reqs]


def _pins() -> dict[str, str]:
    pins = {}
    for n, line in enumerate((ROOT / "constraints.txt").read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, pinned = line.partition("==")
        assert sep, f"constraints.txt:{n}: {line!r} is not an exact pin (name==version)"
        pins[canonicalize_name(name)] = pinned
    return pins


DIRECT = [r for r in _requirements() if canonicalize_name(r.name) != "torch"]


def test_torch_is_not_locked():
    # TORCH_SPEC chooses the build (CPU here, CUDA elsewhere); a pin here would fight it.
    assert "torch" not in _pins()


@pytest.mark.parametrize("req", DIRECT, ids=lambda r: r.name)
def test_every_direct_dependency_is_pinned_inside_its_range(req: Requirement):
    pins = _pins()
    name = canonicalize_name(req.name)
    assert name in pins, f"{req.name} is a dependency in pyproject.toml but not in constraints.txt"
    assert req.specifier.contains(pins[name], prereleases=True), (
        f"constraints.txt pins {req.name}=={pins[name]}, outside pyproject.toml's {req}"
    )


@pytest.mark.parametrize("req", DIRECT, ids=lambda r: r.name)
def test_the_environment_is_the_lock(req: Requirement):
    """What the tests run against is what constraints.txt says (make setup installs with -c)."""
    try:
        installed = version(req.name)
    except PackageNotFoundError:
        pytest.fail(f"{req.name} is not installed; run make setup")
    assert installed == _pins()[canonicalize_name(req.name)], (
        f"{req.name} {installed} is installed but constraints.txt pins "
        f"{_pins()[canonicalize_name(req.name)]}: rerun make setup (or make lock to move the pin)"
    )


def test_torch_satisfies_the_range():
    spec = next(r for r in _requirements() if r.name == "torch").specifier
    assert spec.contains(version("torch").split("+")[0])
