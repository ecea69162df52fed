"""Build a throwaway git + DVC repository holding this project's pipeline, with small params."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]


def tool_env() -> dict[str, str]:
    """The environment stage commands run in: this interpreter's ``python`` and ``dvc`` first."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("GIT_AUTHOR_NAME", "relaypipe test")
    env.setdefault("GIT_AUTHOR_EMAIL", "test@relaypipe.local")
    env["GIT_COMMITTER_NAME"] = env["GIT_AUTHOR_NAME"]
    env["GIT_COMMITTER_EMAIL"] = env["GIT_AUTHOR_EMAIL"]
    env["DVC_NO_ANALYTICS"] = "1"
    return env


def sh(*cmd: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, env=tool_env(), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode})\nstdout:\n{proc.stdout[-3000:]}"
            f"\nstderr:\n{proc.stderr[-3000:]}"
        )
    return proc


def deep_update(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = value
    return base


SMALL_PARAMS: dict[str, Any] = {
    "prepare": {
        "terms": [4],
        "n_train": 300,
        "n_eval": 24,
        "benchmarks": [
            {"name": "arith-d1t6", "difficulty": 1, "terms": 6, "n": 6},
            {"name": "arith-d1t8", "difficulty": 1, "terms": 8, "n": 6},
        ],
    },
    "bootstrap": {
        "student": {"hidden_size": 16, "intermediate_size": 32},
        # a teacher that solves some 4-term problems (0.25 measured), so the filter keeps a few
        # and grpo trains: about 4 s
        "teacher": {"hidden_size": 64, "layers": 2, "intermediate_size": 128},
        "student_train": {"steps": 4, "batch_size": 8},
        "teacher_train": {"steps": 200, "batch_size": 32},
        "max_new_tokens": 64,
        "eval_batch_size": 12,
        # models this small learn nothing in a few steps: the checks warn instead of failing
        "allow_degenerate": True,
    },
    "filter": {"k": 2, "n_problems": 8, "max_new_tokens": 64},
    "warmup_data": {
        "n_problems": 8,
        "offset": 8,
        "samples_per_problem": 1,
        "max_new_tokens": 40,
        "min_examples": 8,
        "top_up_with_reference": True,
        "allow_degenerate": True,
        # a 4-step student is wrong nearly everywhere: every mistakes row would need more than
        # max_commands calls and be dropped; random placement keeps these pipelines training
        "insert": {"policy": "random"},
    },
    "sft": {
        "allow_degenerate": True,
        "eval_n": 8,
        "max_new_tokens": 40,
        "trainer": {"max_steps": 2, "per_device_train_batch_size": 4, "save_steps": 1},
    },
    "grpo": {
        "allow_degenerate": True,
        "eval_n": 8,
        "max_new_tokens": 24,
        "trainer": {
            "max_steps": 1,
            "per_device_train_batch_size": 8,
            "num_generations": 4,
            "save_steps": 1,
        },
    },
    "evaluate": {
        "router_p": [0.2, 0.5],
        "call_bias_sweep": [-2.0, 2.0],
        "oracle_sweep": [0.01, 0.5],
        "max_new_tokens": 24,
        "batch_size": 8,
    },
}


def make_repo(dest: Path, params: dict[str, Any] | None = None) -> Path:
    """A git repo with dvc.yaml, the presets, a copy of the packages (stage deps) and a
    params.yaml of the micro preset shrunk by ``params`` (default :data:`SMALL_PARAMS`) as its
    overrides."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(ROOT / name, dest / name)
    for package in ("relaypipe", "flows", "presets"):  # flows: dvc.yaml runs the stages
        shutil.copytree(
            ROOT / package, dest / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    overrides = params if params is not None else SMALL_PARAMS
    (dest / "params.yaml").write_text(yaml.safe_dump({"preset": "micro", "overrides": overrides}))
    sh("git", "init", "-q", "-b", "main", cwd=dest)
    sh("dvc", "init", "-q", cwd=dest)
    sh("dvc", "config", "core.analytics", "false", cwd=dest)
    template = ROOT / ".dvc" / "plots" / "offline.html"  # built by make setup (flows.plots)
    if template.is_file():
        (dest / ".dvc" / "plots").mkdir()
        shutil.copy(template, dest / ".dvc" / "plots" / "offline.html")
        sh("dvc", "config", "plots.html_template", "plots/offline.html", cwd=dest)
    sh("git", "add", "-A", cwd=dest)
    sh("git", "commit", "-qm", "pipeline", cwd=dest)
    return dest
