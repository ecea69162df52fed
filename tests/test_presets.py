"""Every preset loads and validates without running anything: each stage
section builds into that stage's params dataclass, exactly as ``dvc repro`` would build it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from flows.stages import STAGES, params_class
from relaypipe.config import ConfigError, build
from relaypipe.micro.models import ModelSize, build_model
from relaypipe.micro.tokenizer import build_char_tokenizer
from relaypipe.models import trainer_precision
from relaypipe.stages import grpo, sft
from relaypipe.stages.prepare import PrepareParams
from relaypipe.tasks.dataset import DatasetSpec

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "presets").glob("*.yaml"))

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


PROMPT_STAGES = ("bootstrap", "filter", "warmup_data", "sft", "grpo", "evaluate")


def test_the_presets_are_there():
    assert {p.name for p in PRESETS} >= {"micro.yaml", "smollm2-cpu.yaml", "paper-gpu.yaml"}


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_every_stage_section_builds(path):
    config = load(path)
    assert set(config) == set(STAGES), f"{path.name}: sections differ from the stages"
    for stage in STAGES:
        params = build(params_class(stage), config[stage], f"{path.name}:{stage}")
        assert params is not None


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_every_stage_shows_the_same_prompt_and_bounds(path):
    config = load(path)
    # one prompt format in every stage: the chat template everywhere or nowhere
    # (evaluate's null: the relay model's recorded format, i.e. grpo's)
    forms = {
        config[stage].get("chat_template", False)
        for stage in PROMPT_STAGES
        if not (stage == "evaluate" and config[stage].get("chat_template") is None)
    }
    assert len(forms) == 1, f"{path.name}: chat_template differs between stages"
    # evaluation decodes under the bounds the student was trained under: the ones grpo
    # records in the relay model's relay.json (null), or equal ones
    assert config["evaluate"]["bounds"] in (None, config["grpo"]["bounds"])


def test_paper_preset_uses_the_chat_template_of_its_pretrained_models():
    config = load(ROOT / "presets" / "paper-gpu.yaml")
    assert build(params_class("bootstrap"), config["bootstrap"], "bootstrap").kind == "pretrained"
    assert all(config[stage]["chat_template"] is True for stage in PROMPT_STAGES[:-1])
    assert config["evaluate"]["chat_template"] is None  # the relay model's: grpo's


def test_smollm2_preset_needs_no_hub():
    config = load(ROOT / "presets" / "smollm2-cpu.yaml")
    assert config["bootstrap"]["student_source"] == "smollm2"
    assert config["bootstrap"]["teacher_source"] == "smollm2"
    for stage in STAGES:  # everything in-process on the CPU
        assert "teacher_server" not in config[stage]
        teacher = config[stage].get("teacher")
        assert not (isinstance(teacher, dict) and teacher.get("server")), stage
    assert all("source" not in b for b in config["prepare"]["benchmarks"])  # procedural
    # the knowledge gap is a set of code letters the student never sees, all on the benchmarks
    letters = config["prepare"]["letters"]
    assert letters == 12
    assert all(b["letters"] == letters and b["n"] >= 200 for b in config["prepare"]["benchmarks"])
    assert config["bootstrap"]["student_train"]["withhold"] == r"\b[j-l]\b"
    assert "withhold" not in config["bootstrap"]["teacher_train"]


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
    server = boot["teacher_server"]
    assert server["model"] == "Qwen/Qwen3-8B" and "teacher_source" not in boot
    for stage in ("filter", "sft", "grpo", "evaluate"):  # one server, described once (&served)
        assert config[stage]["teacher"]["server"] == server, stage
    evaluate = build(params_class("evaluate"), config["evaluate"], "evaluate")
    assert evaluate.teacher.server.params > 1e9
    # disagreement insertion needs the teacher's logits, which a completions API lacks
    assert config["warmup_data"]["insert"]["policy"] == "random"


def _weights(dtype: str) -> torch.nn.Module:
    """A tiny CPU model in the section's dtype ("auto": float32, as a fresh model is)."""
    model = build_model(ModelSize(16, 1, 2, 32), build_char_tokenizer(), seed=0)
    return model.to(getattr(torch, "float32" if dtype == "auto" else dtype))


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_trainer_sections_build_the_installed_trls_configs(path):
    """sft.trainer and grpo.trainer through the very functions the stages build their trl
    configs with, on the CPU: before a model is loaded, and with the precision flags of weights
    in the section's dtype. A key or value the installed trl refuses fails here, not hours into
    a run."""
    config = load(path)
    s = build(sft.SFTParams, config["sft"], f"{path.name}:sft")
    g = build(grpo.GRPOParams, config["grpo"], f"{path.name}:grpo")
    sft.build_sft_config(s, "cpu")
    args = sft.build_sft_config(
        s, "cpu", precision=trainer_precision(_weights(s.dtype), s.trainer, "sft"), max_length=64
    )
    assert args.use_cpu and args.completion_only_loss and args.max_length == 64
    assert args.output_dir == s.checkpoint_dir
    grpo.build_grpo_config(g, "cpu")
    args = grpo.build_grpo_config(
        g, "cpu", precision=trainer_precision(_weights(g.dtype), g.trainer, "grpo")
    )
    assert args.use_cpu and args.max_completion_length == g.max_new_tokens
    for key, value in g.trainer.items():
        assert getattr(args, key) == value, key  # passed through as written


def test_a_key_the_installed_trl_does_not_know_fails_when_the_params_are_parsed():
    with pytest.raises(ConfigError, match=r"sft\.trainer\.warmup_ratio is not a field of SFTConf"):
        build(sft.SFTParams, {"trainer": {"warmup_ratio": 0.05}}, "p.yaml:sft")
    with pytest.raises(ConfigError, match=r"use warmup_steps \(a float below 1 is a ratio"):
        build(sft.SFTParams, {"trainer": {"warmup_ratio": 0.05}}, "p.yaml:sft")
    with pytest.raises(ConfigError, match=r"num_generation is not .*did you mean num_generations"):
        build(grpo.GRPOParams, {"trainer": {"num_generation": 8}}, "p.yaml:grpo")
    with pytest.raises(ConfigError, match=r"sft\.trainer\.output_dir is set by the stage from sft"):
        build(sft.SFTParams, {"trainer": {"output_dir": "x"}}, "p.yaml:sft")


def test_a_bad_trainer_value_fails_before_any_model_is_loaded(tmp_path):
    """The student does not exist: the config error comes first, so no model was loaded."""
    missing = str(tmp_path / "no-such-model")
    bad = {"lr_scheduler_type": "cosine-ish"}
    s = sft.SFTParams(trainer=bad, student=missing, data=missing, device="cpu")
    with pytest.raises(ConfigError, match=r"sft\.trainer: SFTConfig refused it: .*cosine-ish"):
        sft.train_sft(s)
    g = grpo.GRPOParams(trainer=bad, student=missing, problems=missing, device="cpu")
    with pytest.raises(ConfigError, match=r"grpo\.trainer: GRPOConfig refused it"):
        grpo.train_grpo(g)


def test_several_processes_must_each_hold_whole_prompt_groups():
    """The difficulty-aware reward judges a prompt's group together, but each process scores
    only its own completions (trl gathers rewards after the reward function ran)."""
    # built as one process, trl refuses a per-process count that splits groups
    split = {"per_device_train_batch_size": 2, "num_generations": 4}
    with pytest.raises(ConfigError, match=r"must be divisible by num_generations \(4\)"):
        grpo.build_grpo_config(grpo.GRPOParams(trainer=split, num_processes=2), "cpu")
    # a generation_batch_size is shared out among the processes: 16 / 4 = 4 per process
    shared = {"per_device_train_batch_size": 4, "num_generations": 8, "generation_batch_size": 16}
    grpo.build_grpo_config(grpo.GRPOParams(trainer=shared), "cpu")  # one process: 16 is fine
    with pytest.raises(ConfigError, match=r"processes \(grpo\.num_processes\) scores 4 compl"):
        grpo.build_grpo_config(grpo.GRPOParams(trainer=shared, num_processes=4), "cpu")
    grpo.build_grpo_config(grpo.GRPOParams(trainer=shared, num_processes=2), "cpu")
    paper = build(grpo.GRPOParams, load(ROOT / "presets" / "paper-gpu.yaml")["grpo"], "paper")
    grpo.build_grpo_config(grpo.GRPOParams(trainer=paper.trainer, num_processes=8), "cpu")
    with pytest.raises(ConfigError, match="num_processes must be >= 1"):
        build(sft.SFTParams, {"num_processes": 0}, "p.yaml:sft")
    with pytest.raises(ConfigError, match="device must be auto, cuda or cpu"):
        build(grpo.GRPOParams, {"num_processes": 2, "device": "cuda:1"}, "p.yaml:grpo")


PROMPT_STAGES = ("bootstrap", "filter", "warmup_data", "sft", "grpo", "evaluate")


def test_paper_preset_turns_qwen3_thinking_off_everywhere_it_formats_prompts():
    config = load(ROOT / "presets" / "paper-gpu.yaml")
    for stage in PROMPT_STAGES:
        params = build(params_class(stage), config[stage], f"paper-gpu.yaml:{stage}")
        if stage == "evaluate":  # null: as the relay model was trained (grpo's, in relay.json)
            assert params.chat_template is None and params.chat_template_kwargs is None
            continue
        assert params.chat_template and params.chat_template_kwargs == {"enable_thinking": False}, (
            stage
        )


def test_paper_preset_trains_on_a_hub_math_set_its_later_stages_fit_in():
    config = load(ROOT / "presets" / "paper-gpu.yaml")
    prepare = build(PrepareParams, config["prepare"], "paper-gpu.yaml:prepare")
    source = prepare.train_source
    assert source is not None and source.source == "DigitalLearningGmbH/MATH-lighteval"
    assert source.split == "train" and source.question_column == "problem"
    assert source.answer_column == source.solution_column == "solution"  # \boxed{} answers
    assert prepare.n_eval + prepare.n_train <= 7500  # the MATH train split's rows
    pool, warm = config["filter"], config["warmup_data"]
    assert warm["offset"] == pool["n_problems"]  # warm-up problems follow the GRPO pool
    assert warm["offset"] + warm["n_problems"] <= prepare.n_train
    assert "max_length" not in config["sft"]["trainer"]  # fitted to the warm-up table
