"""DVC stage ``configure``: params.yaml (a preset + overrides) -> one config file per stage.

    python -m flows.configure [--params params.yaml] [--out data/config]

params.yaml names a preset and the keys you change (relaypipe/presets.py). This stage resolves
them, builds every stage's strict params class (so a typo anywhere fails here, before anything
trains, with its dotted path), and writes ``data/config/<stage>.yaml``::

    grpo: {...}                         # the stage's resolved section
    code: {sha256: ..., files: 31}      # digest of the stage's import closure (flows/deps.py)

Each stage of dvc.yaml depends on its own config file and nothing else of the configuration or
the code, so DVC re-runs a stage exactly when its parameters or any project file it imports
change, and ``dvc exp show`` stays narrow: the parameters it lists are ``preset`` and the
overrides you set, one column per config file instead of one per parameter and code file.

Paths are the stages' defaults and dvc.yaml's deps and outs; this stage checks that every
``data/...`` path a stage's params name is one of that stage's deps or outs in dvc.yaml, so
overriding a path alone (which would silently cut the graph) fails instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from flows.deps import ROOT, stage_closure
from relaypipe import errors, presets
from relaypipe.config import build
from relaypipe.io import ParamsError
from relaypipe.publish import together

OUT_DIR = "data/config"
# Path params that are not DVC outputs by design: training checkpoints live beside the
# pipeline (a crashed run resumes from them) and never enter DVC's cache.
NOT_IN_GRAPH = frozenset({"checkpoint_dir"})


def code_digest(stage: str, root: Path = ROOT) -> dict[str, Any]:
    """sha256 over the (path, bytes) of every project file the stage imports."""
    files = sorted(stage_closure(stage, root))
    h = hashlib.sha256()
    for rel in files:
        h.update(rel.encode() + b"\0")
        h.update((root / rel).read_bytes())
        h.update(b"\0")
    return {"sha256": h.hexdigest(), "files": len(files)}


def data_paths(params: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(dotted key, value) of every ``data/...`` string in a params dataclass, nested included."""
    if dataclasses.is_dataclass(params) and not isinstance(params, type):
        for f in dataclasses.fields(params):
            if f.name not in NOT_IN_GRAPH:
                yield from data_paths(getattr(params, f.name), f"{prefix}{f.name}.")
    elif isinstance(params, dict):
        for key, value in params.items():
            yield from data_paths(value, f"{prefix}{key}.")
    elif isinstance(params, list | tuple):
        for i, value in enumerate(params):
            yield from data_paths(value, f"{prefix}{i}.")
    elif isinstance(params, str) and params.startswith("data/"):
        yield prefix.rstrip("."), params


def graph_paths(dvc_stage: dict[str, Any]) -> list[str]:
    """Every dep, out, metrics and plots path of one dvc.yaml stage."""
    out = []
    for kind in ("deps", "outs", "metrics", "plots"):
        for entry in dvc_stage.get(kind) or []:
            out.extend(entry if isinstance(entry, dict) else [entry])
    return [str(p).rstrip("/") for p in out]


def _related(path: str, other: str) -> bool:
    a, b = path.rstrip("/"), other
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def check_paths(stage: str, params: Any, dvc_stage: dict[str, Any], where: str) -> None:
    known = graph_paths(dvc_stage)
    bad = [(k, v) for k, v in data_paths(params) if not any(_related(v, p) for p in known)]
    if bad:
        listed = "; ".join(f"{k} = {v}" for k, v in bad)
        raise ParamsError(
            f"{where}: {listed}: not among stage {stage!r}'s deps or outs in dvc.yaml, so DVC "
            "would not track it; paths are set by dvc.yaml (change a path there and in the "
            "stage's default together, not in params)"
        )


def load_dvc_stages(dvc_yaml: Path) -> dict[str, Any]:
    with dvc_yaml.open(encoding="utf-8") as fh:
        return (yaml.safe_load(fh) or {}).get("stages") or {}


def configure(
    params_path: str | os.PathLike[str] = "params.yaml",
    out_dir: str | os.PathLike[str] = OUT_DIR,
    dvc_yaml: str | os.PathLike[str] = "dvc.yaml",
    root: Path = ROOT,
) -> dict[str, dict[str, Any]]:
    """Resolve, check and write every stage's config; returns ``{stage: code digest}``."""
    from flows.stages import STAGES, params_class

    sections = presets.resolve(params_path)
    unknown = sorted(set(map(str, sections)) - set(STAGES))
    if unknown:
        raise ParamsError(
            f"{params_path}: no stage(s) {', '.join(unknown)}; stages: {', '.join(STAGES)}"
        )
    dvc_stages = load_dvc_stages(Path(dvc_yaml))
    configs = {}
    for stage in STAGES:
        where = presets.where(params_path, stage)
        section = presets.section(params_path, stage)
        params = build(params_class(stage), section, where)
        if stage in dvc_stages:
            check_paths(stage, params, dvc_stages[stage], where)
        configs[stage] = {stage: section, "code": code_digest(stage, root)}
    with together() as pub:  # all or nothing: never a mix of old and new configs
        folder = pub.directory(out_dir)
        for stage, config in configs.items():
            (folder / f"{stage}.yaml").write_text(
                yaml.safe_dump(config, sort_keys=False), encoding="utf-8"
            )
    return {stage: config["code"] for stage, config in configs.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.configure",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--params", default="params.yaml", help="preset + overrides file")
    parser.add_argument("--out", default=OUT_DIR, help="folder of the per-stage config files")
    parser.add_argument("--dvc-yaml", default="dvc.yaml", help="the pipeline whose paths to check")
    args = parser.parse_args(argv)

    def run() -> int:
        digests = configure(args.params, args.out, args.dvc_yaml)
        for stage, code in digests.items():
            print(f"{args.out}/{stage}.yaml  code {code['sha256'][:12]} ({code['files']} files)")
        return 0

    return errors.run_main(run, prog="python -m flows.configure")


if __name__ == "__main__":
    sys.exit(main())
