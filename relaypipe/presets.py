"""params.yaml is a preset and your overrides; this module resolves them into stage sections.

    preset: micro                     # presets/micro.yaml: every stage's parameters
    overrides:                        # nested keys laid over the preset (deep merge)
      grpo: {trainer: {learning_rate: 1.0e-5}}

:func:`resolve` turns such a file into ``{stage: section}``, the shape each stage reads. A file
without a ``preset`` key is taken as already resolved (one section per stage), so
``--params my-sections.yaml`` keeps working. Merging is plain: a mapping merges into a mapping,
anything else (lists included) replaces what the preset had. Unknown keys are not caught here
but by each stage's strict params class (:func:`relaypipe.config.build`), which names the
dotted path.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from relaypipe.io import ParamsError, load_yaml_section

PRESETS_DIR = "presets"
TOP_KEYS = ("preset", "overrides")


def presets_dir(params_path: str | os.PathLike[str]) -> Path:
    """``presets/`` next to the params file (the repository root for params.yaml)."""
    return Path(params_path).resolve().parent / PRESETS_DIR


def preset_names(params_path: str | os.PathLike[str] = "params.yaml") -> list[str]:
    return sorted(p.stem for p in presets_dir(params_path).glob("*.yaml"))


def merge(base: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` with ``changes`` laid over it (mappings merge, the rest replaces)."""
    out = copy.deepcopy(dict(base))
    for key, value in changes.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _load(path: Path) -> Any:
    with path.open(encoding="utf-8") as fh:
        return yaml.safe_load(fh)  # a YAMLError is bad input too (relaypipe.errors names it)


def resolve(params_path: str | os.PathLike[str] = "params.yaml") -> dict[str, Any]:
    """``{stage: section}`` from a preset + overrides file (or an already resolved one)."""
    path = Path(params_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: params file not found")
    return _resolve_loaded(path, _load(path))


def _resolve_loaded(path: Path, data: Any) -> dict[str, Any]:
    """:func:`resolve` of a file already read (``data``: its YAML)."""
    if not isinstance(data, Mapping):
        raise ParamsError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    if "preset" not in data:
        return dict(data)
    extra = sorted(set(map(str, data)) - set(TOP_KEYS))
    if extra:
        raise ParamsError(
            f"{path}: unknown top-level key(s) {', '.join(extra)}: a file with `preset` holds "
            "only `preset` and `overrides` (put stage parameters under overrides, e.g. "
            f"overrides: {{{extra[0]}: {{...}}}})"
        )
    name = data["preset"]
    names = preset_names(path)
    if not isinstance(name, str) or name not in names:
        raise ParamsError(
            f"{path}:preset: no preset {name!r} in {presets_dir(path)}; "
            f"choose one of {', '.join(names) or '(none found)'}"
        )
    overrides = data.get("overrides") or {}
    if not isinstance(overrides, Mapping):
        raise ParamsError(
            f"{path}:overrides: expected a mapping of stage sections, got "
            f"{type(overrides).__name__}: {overrides!r}"
        )
    base = _load(presets_dir(path) / f"{name}.yaml")
    if not isinstance(base, Mapping) or "preset" in base:
        raise ParamsError(f"{presets_dir(path) / f'{name}.yaml'}: expected one section per stage")
    unknown = sorted(set(map(str, overrides)) - set(map(str, base)))
    if unknown:
        raise ParamsError(
            f"{path}:overrides: no section(s) {', '.join(unknown)} in preset {name!r} "
            f"(sections: {', '.join(map(str, base))})"
        )
    return merge(base, overrides)


def where(params_path: str | os.PathLike[str], stage: str) -> str:
    """How error messages name a stage's section: ``params.yaml (preset micro):grpo``."""
    try:
        data = _load(Path(params_path))
    except (OSError, ParamsError):
        data = None
    if isinstance(data, Mapping) and "preset" in data:
        return f"{params_path} (preset {data['preset']} + overrides):{stage}"
    return f"{params_path}:{stage}"


def section(params_path: str | os.PathLike[str], stage: str) -> dict[str, Any]:
    """One stage's resolved section; a clear ParamsError when it is missing or not a mapping."""
    path = Path(params_path)
    data = _load(path) if path.is_file() else None
    if not (isinstance(data, Mapping) and "preset" in data):
        return load_yaml_section(path, stage)  # already resolved (or missing: its message)
    sections = _resolve_loaded(path, data)  # read once
    if not isinstance(sections.get(stage), Mapping):
        raise ParamsError(f"preset {data['preset']!r} has no mapping section {stage!r}")
    return dict(sections[stage])
