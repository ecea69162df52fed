"""Every preset (and params.yaml) loads and validates without running anything: each stage
section builds into that stage's params dataclass, exactly as ``dvc repro`` would build it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flows.stages import STAGES, params_class
from relaypipe.config import build
from relaypipe.stages.prepare import PrepareParams
from relaypipe.tasks.dataset import DatasetSpec

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "presets").glob("*.yaml"))
FILES = [ROOT / "params.yaml", *PRESETS]

# The paper's six benchmarks, by hub dataset id (arXiv 2601.05167, DESIGN.md).
PAPER_BENCHMARKS = {
    "math500": "HuggingFaceH4/MATH-500",
    "gsm8k": "openai/gsm8k",
    "minerva": "math-ai/minervamath",
    "olympiadbench": "math-ai/olympiadbench",
    "aime2024": "HuggingFaceH4/aime_2024",
    "aime2025": "math-ai/aime25",
}


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_the_presets_are_there():
    assert {p.name for p in PRESETS} >= {"smollm2-cpu.yaml", "paper-gpu.yaml"}


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_every_stage_section_builds(path):
    config = load(path)
    assert set(config) == set(STAGES), f"{path.name}: sections differ from the stages"
    for stage in STAGES:
        params = build(params_class(stage), config[stage], f"{path.name}:{stage}")
        assert params is not None


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_presets_use_pretrained_models_with_their_chat_template(path):
    config = load(path)
    boot = build(params_class("bootstrap"), config["bootstrap"], "bootstrap")
    assert boot.kind == "pretrained"
    for stage in ("bootstrap", "filter", "warmup_data", "sft", "grpo", "evaluate"):
        assert config[stage].get("chat_template") is True, f"{path.name}:{stage}"
    # evaluation decodes under the bounds the student was trained under
    assert config["evaluate"]["relay"] == config["grpo"]["relay"]


def test_smollm2_preset_needs_no_hub():
    config = load(ROOT / "presets" / "smollm2-cpu.yaml")
    assert config["bootstrap"]["student_source"] == "smollm2"
    assert config["bootstrap"]["teacher_source"] == "smollm2"
    for stage in STAGES:
        assert "teacher_url" not in config[stage]  # everything in-process on the CPU
    assert all("source" not in b for b in config["prepare"]["benchmarks"])  # procedural


def test_paper_preset_names_the_six_benchmarks_with_their_columns():
    config = load(ROOT / "presets" / "paper-gpu.yaml")
    prepare = build(PrepareParams, config["prepare"], "paper-gpu.yaml:prepare")
    assert {b.name: b.source for b in prepare.benchmarks} == PAPER_BENCHMARKS
    for bench in prepare.benchmarks:
        spec = bench.dataset_spec()
        assert isinstance(spec, DatasetSpec) and spec.name == bench.name
        assert spec.question_column and spec.answer_column and spec.split
        assert spec.task_name == bench.name
    gsm8k = next(b for b in prepare.benchmarks if b.name == "gsm8k")
    assert gsm8k.config == "main"  # openai/gsm8k has no default config


def test_paper_preset_serves_the_teacher_to_every_stage_that_decodes_with_it():
    config = load(ROOT / "presets" / "paper-gpu.yaml")
    boot = config["bootstrap"]
    assert boot["student_source"] == "Qwen/Qwen3-1.7B"
    assert boot["teacher_model"] == "Qwen/Qwen3-8B" and "teacher_source" not in boot
    for stage in ("bootstrap", "filter", "sft", "grpo", "evaluate"):
        section = config[stage]
        assert section["teacher_url"] == boot["teacher_url"], stage
        assert section["teacher_model"] == boot["teacher_model"], stage
    assert config["evaluate"]["teacher_params"] > 1e9
    # disagreement insertion needs the teacher's logits, which a completions API lacks
    assert config["warmup_data"]["insert"]["policy"] == "random"
