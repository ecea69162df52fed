"""``chat_template_kwargs``: variables for the chat template (Qwen3's ``enable_thinking``) reach
every place a prompt is rendered: format_prompt, each stage's formatting path, ``relaypipe
decode``. The tokenizer carries a small Qwen3-style Jinja template that reads the variable."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from transformers import PreTrainedTokenizerBase

from relaypipe import cli
from relaypipe.bounds import RelayBounds
from relaypipe.config import ConfigError, build
from relaypipe.micro.tokenizer import build_char_tokenizer
from relaypipe.micro.train_lm import TrainSpec
from relaypipe.stages import bootstrap, evaluate, filter, grpo, sft, warmup_data
from relaypipe.tasks.base import CHAT_INSTRUCTION, format_prompt
from relaypipe.teacher import TeacherSpec
from relaypipe.train.warmup import InsertSpec
from tests.tiny_stage_inputs import QWEN3_STYLE_TEMPLATE, THINK_OFF, make_inputs

KWARGS = {"enable_thinking": False}


@pytest.fixture(scope="module")
def qwen_tok():
    tok = build_char_tokenizer()
    tok.chat_template = QWEN3_STYLE_TEMPLATE
    return tok


def test_format_prompt_passes_the_kwargs_to_the_template(qwen_tok):
    thinking = format_prompt("1+2", qwen_tok, chat_template=True)
    plain_chat = (
        "<|im_start|>user\n1+2\n" + CHAT_INSTRUCTION + "<|im_end|>\n<|im_start|>assistant\n"
    )
    assert thinking == plain_chat  # Qwen3's default: thinking on, no think block
    assert format_prompt("1+2", qwen_tok, chat_template=True, chat_template_kwargs=KWARGS) == (
        plain_chat + THINK_OFF
    )
    with pytest.raises(ValueError, match="need chat_template: true"):
        format_prompt("1+2", qwen_tok, chat_template_kwargs=KWARGS)


BUILDABLE = {  # the least each stage's params need besides the prompt options
    "bootstrap": (
        bootstrap.BootstrapParams,
        {"kind": "pretrained", "student_source": "s", "teacher_source": "t"},
    ),
    "filter": (filter.FilterParams, {}),
    "warmup_data": (warmup_data.WarmupDataParams, {"insert": {}}),
    "sft": (sft.SFTParams, {}),
    "grpo": (grpo.GRPOParams, {}),
    "evaluate": (evaluate.EvaluateParams, {}),
}


@pytest.mark.parametrize("stage", sorted(BUILDABLE))
def test_every_stage_takes_the_kwargs_and_refuses_them_without_a_template(stage):
    cls, base = BUILDABLE[stage]
    params = build(cls, {**base, "chat_template": True, "chat_template_kwargs": KWARGS}, stage)
    assert params.chat_template_kwargs == KWARGS
    # default: none; evaluate's null takes the relay model's recorded format (relay.json)
    assert build(cls, base, stage).chat_template_kwargs == (None if stage == "evaluate" else {})
    with pytest.raises(ConfigError, match=rf"{stage}: chat_template_kwargs .* need chat_templ"):
        build(cls, {**base, "chat_template_kwargs": KWARGS}, stage)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    return root, make_inputs(root, chat_template=QWEN3_STYLE_TEMPLATE)


def test_cli_decode_renders_the_kwargs(inputs, capsys):
    _, paths = inputs
    base = ["decode", "--student", paths["student"], "--teacher", paths["teacher"]]
    base += ["--prompt", "1+2", "--max-new-tokens", "2", "--device", "cpu"]
    assert cli.main([*base, "--chat-template", "--chat-template-kwargs", json.dumps(KWARGS)]) == 0
    shown = capsys.readouterr().out
    assert "<|im_start|>assistant\n" + THINK_OFF in shown
    assert cli.main([*base, "--chat-template"]) == 0
    assert "<think>" not in capsys.readouterr().out
    with pytest.raises(SystemExit, match="needs --chat-template"):
        cli.main([*base, "--chat-template-kwargs", json.dumps(KWARGS)])
    with pytest.raises(SystemExit):  # argparse: not a JSON object
        cli.main([*base, "--chat-template", "--chat-template-kwargs", "[1]"])
    assert "expected a JSON object" in capsys.readouterr().err


def test_every_stage_renders_its_prompts_with_the_kwargs(inputs, monkeypatch):
    """Each stage run on tiny models with a spy on apply_chat_template (it calls through):
    every prompt a stage renders carries the think block the kwarg switches on."""
    root, paths = inputs
    seen: dict[str, list[str]] = {}
    stage = [""]
    original = PreTrainedTokenizerBase.apply_chat_template

    def spy(self, conversation, *args, **kwargs):
        text = original(self, conversation, *args, **kwargs)
        if CHAT_INSTRUCTION in str(conversation[-1]["content"]):  # format_prompt's user turn
            seen.setdefault(stage[0], []).append(text)
        return text

    monkeypatch.setattr(PreTrainedTokenizerBase, "apply_chat_template", spy)
    common = {"chat_template": True, "chat_template_kwargs": KWARGS, "device": "cpu"}
    runs = {
        "bootstrap": bootstrap.BootstrapParams(
            kind="pretrained",
            student_source=paths["student"],
            teacher_source=paths["teacher"],
            student_train=TrainSpec(steps=2, batch_size=4),
            max_new_tokens=4,
            eval_limit=2,
            allow_degenerate=True,  # random tiny models: nothing to relay, and that is fine here
            problems_dir=paths["problems"],
            out_dir=str(root / "boot"),
            **common,
        ),
        "filter": filter.FilterParams(
            k=1,
            n_problems=2,
            max_new_tokens=4,
            problems=paths["train"],
            teacher=TeacherSpec(paths["teacher"]),
            out_dir=str(root / "filtered"),
            allow_degenerate=True,  # a random tiny teacher solves nothing
            **common,
        ),
        "warmup_data": warmup_data.WarmupDataParams(
            insert=InsertSpec(max_commands=1, n_values=(2,)),
            n_problems=2,
            offset=0,
            samples_per_problem=1,
            max_new_tokens=4,
            min_examples=2,
            top_up_with_reference=True,
            allow_degenerate=True,
            problems=paths["train"],
            student=paths["student"],
            out_dir=str(root / "warm"),
            **common,
        ),
        "sft": sft.SFTParams(
            trainer={"max_steps": 1, "per_device_train_batch_size": 2, "save_strategy": "no"},
            eval_n=2,
            max_new_tokens=4,
            allow_degenerate=True,
            data=paths["warmup"],
            student=paths["student"],
            teacher=TeacherSpec(paths["teacher"]),
            eval_problems=paths["eval"],
            checkpoint_dir=str(root / "ckpt-sft"),
            out_model=str(root / "warmed"),
            out_dir=str(root / "sft"),
            **common,
        ),
        "grpo": grpo.GRPOParams(
            trainer={
                "max_steps": 1,
                "per_device_train_batch_size": 2,
                "num_generations": 2,
                "save_strategy": "no",
            },
            eval_n=2,
            max_new_tokens=4,
            allow_degenerate=True,
            problems=paths["kept"],
            eval_problems=paths["eval"],
            student=paths["student"],
            teacher=TeacherSpec(paths["teacher"]),
            bootstrap_metrics=paths["bootstrap_metrics"],
            checkpoint_dir=str(root / "ckpt-grpo"),
            out_model=str(root / "relay"),
            out_dir=str(root / "grpo"),
            **common,
        ),
        "evaluate": evaluate.EvaluateParams(
            modes=["student", "relay", "teacher"],
            limit=2,
            max_new_tokens=4,
            benchmarks_dir=paths["benchmarks"],
            student=paths["student"],
            warmup=paths["student"],
            relay_model=paths["student"],  # no relay.json: the bounds are given
            bounds=RelayBounds(),
            teacher=TeacherSpec(paths["teacher"]),
            out_dir=str(root / "eval"),
            **common,
        ),
    }
    modules = {"bootstrap": bootstrap, "filter": filter, "warmup_data": warmup_data}
    modules |= {"sft": sft, "grpo": grpo, "evaluate": evaluate}
    for name, params in runs.items():
        stage[0] = name
        modules[name].run(params)
    assert set(seen) == set(runs)  # every stage rendered prompts through the template
    for name, texts in seen.items():
        assert all(t.endswith("<|im_start|>assistant\n" + THINK_OFF) for t in texts), name
    # and what warmup_data wrote for sft to train on carries it too
    table = pd.read_parquet(root / "warm" / "sft.parquet")
    assert table.prompt.str.endswith(THINK_OFF).all()
