"""Each DVC stage's code dependencies, computed from its import closure instead of picked by hand.

A stage runs ``python -m flows.stages <stage>``, which imports ``flows.stages`` and then
``relaypipe.stages.<stage>``; every project file those import, directly or through others, at
module level or lazily inside a function, can change what the stage writes. DVC only re-runs a
stage when one of its deps changes. Stage ``configure`` (flows/configure.py) hashes each
stage's closure into that stage's ``data/config/<stage>.yaml``, which is the stage's dep; so
the closure is covered when configure's deps cover every file in it and every stage depends on
its own config file. This module computes the closures and checks both:

    python -m flows.deps --check    # exit 1 and list what is not covered

The closure is read from the source (``ast``), not by importing: an ``import a.b`` or ``from a
import b`` anywhere in a module, ``try`` blocks and function bodies included, counts. It is a
superset of what one run executes (a lazy import used only with a remote teacher still counts),
which is the safe side for a cache. Dynamic imports by string are not followed; the one place
that does so (``flows.stages``) is why each stage's own module is a root.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("relaypipe", "flows")

# Files a stage imports that by design cannot change what it writes.
EXEMPT: dict[str, str] = {
    "flows/__init__.py": "Prefect settings defaults only (how Prefect starts and logs)",
}


def module_file(module: str, root: Path = ROOT) -> Path | None:
    """The project file of a dotted module name, or None when it is not one of ours."""
    if module.split(".")[0] not in PACKAGES:
        return None
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _package_of(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1])
    return ".".join(parts[:-1])


def imported_modules(path: Path, root: Path = ROOT) -> set[str]:
    """Every dotted module name ``path`` imports, anywhere in its source."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _package_of(path, root)
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, node.module] if node.module else anchor)
            else:
                base = node.module or ""
            out.add(base)
            # `from pkg import name`: name may be a submodule
            out.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return out


def _with_parents(module: str) -> list[str]:
    """``a.b.c`` imports ``a`` and ``a.b`` (their ``__init__``) first."""
    parts = module.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def closure(roots: list[str], root: Path = ROOT) -> set[str]:
    """Repo-relative paths of every project file importing ``roots`` executes (or may)."""
    seen: set[Path] = set()
    todo = [m for r in roots for m in _with_parents(r)]
    while todo:
        path = module_file(todo.pop(), root)
        if path is None or path in seen:
            continue
        seen.add(path)
        for name in imported_modules(path, root):
            todo.extend(_with_parents(name))
    return {p.relative_to(root).as_posix() for p in seen}


def stage_closure(stage: str, root: Path = ROOT) -> set[str]:
    return closure(["flows.stages", f"relaypipe.stages.{stage}"], root) - set(EXEMPT)


def _covered(path: str, deps: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


def load_stages(dvc_yaml: Path) -> dict[str, list[str]]:
    from ruamel.yaml import YAML

    doc = YAML().load(dvc_yaml.read_text())
    return {name: [str(d) for d in stage.get("deps", [])] for name, stage in doc["stages"].items()}


CONFIGURE = "configure"


def config_dep(stage: str) -> str:
    return f"data/config/{stage}.yaml"


def missing(dvc_yaml: Path = ROOT / "dvc.yaml", root: Path = ROOT) -> dict[str, list[str]]:
    """Per stage, what leaves its code uncovered: imported files configure's deps miss, or a
    missing dep on its own config file."""
    stages = load_stages(dvc_yaml)
    watched = stages.get(CONFIGURE, [])
    out = {}
    for stage, deps in stages.items():
        if stage == CONFIGURE:
            files = closure(["flows.configure"], root) - set(EXEMPT)
            problems = sorted(f for f in files if not _covered(f, watched))
        else:
            files = stage_closure(stage, root)
            problems = [
                f"{CONFIGURE} deps miss {f}" for f in sorted(files) if not _covered(f, watched)
            ]
            if config_dep(stage) not in deps:
                problems.insert(0, f"no dep on {config_dep(stage)}")
        if problems:
            out[stage] = problems
    if CONFIGURE not in stages:
        out[CONFIGURE] = ["no configure stage"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.deps", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--check", action="store_true", required=True, help="list what is uncovered; exit 1 if any"
    )
    parser.add_argument(
        "--dvc-yaml", type=Path, default=ROOT / "dvc.yaml", help="(default: %(default)s)"
    )
    args = parser.parse_args(argv)
    gaps = missing(args.dvc_yaml)
    for stage, files in gaps.items():
        print(f"{stage}: {'; '.join(files)}")
    return 1 if gaps else 0


if __name__ == "__main__":
    sys.exit(main())
