"""``num_processes: 2``: the sft and grpo stages re-run their training under ``accelerate
launch`` in two CPU processes (gloo), with trl's real SFTTrainer and GRPOTrainer (our relay
rollout_func), on tiny models; only the main process writes the model, the curves and the
result the launching process records."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from relaypipe.stages import grpo, sft
from relaypipe.teacher import TeacherSpec
from relaypipe.train.launch import LAUNCHED_ENV, launch_command, train_in_processes
from tests.tiny_stage_inputs import make_inputs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("accel")
    return root, make_inputs(root)


def curve(out_dir: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(out_dir / "live" / "plots" / "metrics" / f"{name}.tsv", sep="\t")


def test_the_launch_command_runs_the_stage_module_in_n_processes(tmp_path):
    cmd = launch_command("relaypipe.stages.sft", tmp_path / "p.yaml", 4)
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--num_processes") + 1] == "4"
    assert cmd[-4:] == ["-m", "relaypipe.stages.sft", "--params", str(tmp_path / "p.yaml")]


def test_sft_trains_in_two_processes(inputs, monkeypatch):
    monkeypatch.delenv(LAUNCHED_ENV, raising=False)
    root, paths = inputs
    params = sft.SFTParams(
        trainer={
            "max_steps": 2,
            "per_device_train_batch_size": 2,
            "logging_steps": 1,
            "save_steps": 1,  # the checkpoint fingerprint and checkpoints: main process only
            "learning_rate": 1e-2,
        },
        num_processes=2,
        eval_n=2,
        max_new_tokens=8,
        device="cpu",
        threads=1,
        data=paths["warmup"],
        student=paths["student"],
        teacher=TeacherSpec(paths["teacher"]),
        eval_problems=paths["eval"],
        checkpoint_dir=str(root / "ckpt-sft"),
        out_model=str(root / "warmed"),
        out_dir=str(root / "sft"),
    )
    metrics = sft.run(params)
    assert metrics["warnings"] == []  # the main process's result, handed back: weights moved
    assert json.loads((root / "sft" / "metrics.json").read_text()) == metrics
    assert (root / "warmed" / "model.safetensors").is_file()
    assert not (root / "ckpt-sft").exists()  # removed once, after saving
    # 2 steps x 2 rows per process x 2 processes = 8 of the 24 rows (one process: 4)
    epoch = curve(root / "sft", "epoch")
    assert epoch.epoch.iloc[-1] == pytest.approx(8 / 24)
    loss = curve(root / "sft", "loss")
    assert list(loss.step) == [1, 2]  # one writer: each logged step once


def test_grpo_trains_in_two_processes_with_the_relay_rollouts(inputs, monkeypatch):
    monkeypatch.delenv(LAUNCHED_ENV, raising=False)
    root, paths = inputs
    params = grpo.GRPOParams(
        trainer={
            "max_steps": 2,
            "per_device_train_batch_size": 4,  # one whole group of 4 per process
            "num_generations": 4,
            "logging_steps": 1,
            "save_steps": 1,
            "learning_rate": 1e-2,
            "beta": 0.0,
        },
        num_processes=2,
        # random tiny models: no rollout is right and none calls, every reward is 0; the run
        # is kept, and the finding comes back from the launched processes as a warning
        allow_degenerate=True,
        eval_n=2,
        max_new_tokens=8,
        device="cpu",
        threads=1,
        problems=paths["kept"],
        eval_problems=paths["eval"],
        student=paths["student"],
        teacher=TeacherSpec(paths["teacher"]),
        bootstrap_metrics=paths["bootstrap_metrics"],
        checkpoint_dir=str(root / "ckpt-grpo"),
        out_model=str(root / "relay"),
        out_dir=str(root / "grpo"),
    )
    metrics = grpo.run(params)
    assert any("frac_reward_zero_std" in w for w in metrics["warnings"])
    assert (root / "relay" / "model.safetensors").is_file() and not (root / "ckpt-grpo").exists()
    assert {"relay", "teacher_free", "gap_recovered"} <= set(metrics)
    # the launched main process wrote relay.json into the staged folder, published with it
    assert json.loads((root / "relay" / "relay.json").read_text())["bounds"] == {
        "max_call_tokens": 16,
        "max_teacher_tokens": None,
        "max_calls": None,
        "max_turns": 16,
    }
    # 2 steps x 1 prompt (4 rollouts) per process x 2 processes = 4 of the 24 prompts
    assert curve(root / "grpo", "epoch").epoch.iloc[-1] == pytest.approx(4 / 24)
    assert list(curve(root / "grpo", "relay/teacher_share").step) == [1, 2]


def test_a_failing_launch_names_the_param_and_exit_code(inputs, monkeypatch):
    monkeypatch.delenv(LAUNCHED_ENV, raising=False)
    root, paths = inputs
    params = sft.SFTParams(
        num_processes=2,
        device="cpu",
        data=paths["warmup"],
        student=str(root / "no-such-student"),  # each launched process fails to load it
        checkpoint_dir=str(root / "ckpt-fail"),
        out_model=str(root / "never"),
    )
    with pytest.raises(RuntimeError, match=r"sft: training in 2 processes \(sft.num_processes\)"):
        train_in_processes("relaypipe.stages.sft", "sft", params, 2)
    assert not (root / "never").exists()
