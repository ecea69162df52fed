"""Training curves through transformers' DVCLive callback (relaypipe.train.checkpoints), with
real tiny trl trainers: one file per metric under ``<out_dir>/live/plots/metrics`` on the
trainer's global step, a resumed run continuing its curves, the end-of-training summary in
``metrics.json`` only, and two identical runs writing identical files (no wall-clock anywhere:
transformers' ``train_runtime`` / ``*_per_second`` and trl's ``step_time`` are left out)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml
from datasets import Dataset
from transformers import TrainerCallback
from transformers.integrations import DVCLiveCallback
from transformers.trainer_utils import get_last_checkpoint

from relaypipe.micro.models import ModelSize, build_model
from relaypipe.train.checkpoints import LiveCallback, drop_points_after, training_live

SFT_CURVES = {
    "entropy",
    "epoch",
    "grad_norm",
    "learning_rate",
    "loss",
    "mean_token_accuracy",
    "num_tokens",
}


class Crash(Exception):
    pass


class CrashAt(TrainerCallback):
    """Stops training with an exception once step ``step`` is logged (after the curves)."""

    def __init__(self, step: int):
        self.step = step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.global_step == self.step:
            raise Crash(f"crash at step {self.step}")


def live_dir(out: Path) -> Path:
    return out / "live"


def curves(out: Path) -> dict[str, pd.DataFrame]:
    """Every curve file, by its name relative to plots/metrics without .tsv."""
    base = live_dir(out) / "plots" / "metrics"
    return {
        p.relative_to(base).with_suffix("").as_posix(): pd.read_csv(p, sep="\t")
        for p in sorted(base.rglob("*.tsv"))
    }


def files(out: Path) -> dict[str, bytes]:
    base = live_dir(out)
    return {p.relative_to(base).as_posix(): p.read_bytes() for p in base.rglob("*") if p.is_file()}


def train_sft(tokenizer, root: Path, *, crash_at: int | None = None, **overrides):
    """A tiny real SFT run logging through LiveCallback into ``root/out/live``; resumes from
    ``root/ckpt`` when a checkpoint is there, as the stage does."""
    from trl import SFTConfig, SFTTrainer

    settings = {
        "max_steps": 6,
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-2,
        "logging_steps": 2,
        "save_strategy": "steps",
        "save_steps": 2,
        **overrides,
    }
    args = SFTConfig(
        output_dir=str(root / "ckpt"),
        report_to=[],
        use_cpu=True,
        bf16=False,
        disable_tqdm=True,
        **settings,
    )
    model = build_model(ModelSize(32, 1, 2, 64), tokenizer, seed=5)
    data = Dataset.from_dict(
        {
            "prompt": [f"Q: {i}+5+9\nA: " for i in range(8)],
            "completion": [f"{i}+5<call>4</call>={i + 5}\nAnswer: {i + 14}" for i in range(8)],
        }
    )
    resume = get_last_checkpoint(str(root / "ckpt")) if (root / "ckpt").is_dir() else None
    live = training_live(str(root / "out"), resume)
    callbacks = [LiveCallback(live)] + ([CrashAt(crash_at)] if crash_at else [])
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=data, processing_class=tokenizer, callbacks=callbacks
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.fixture(scope="module")
def two_runs(tokenizer, tmp_path_factory):
    """The same tiny SFT run twice, in two directories (logging_steps=2, max_steps=6)."""
    roots = [tmp_path_factory.mktemp(name) for name in ("run_a", "run_b")]
    trainers = [train_sft(tokenizer, root) for root in roots]
    return roots, trainers


@pytest.mark.slow
def test_curves_are_one_file_per_metric_on_the_global_step(two_runs):
    (root, _), (trainer, _) = two_runs
    got = curves(root / "out")
    assert set(got) == SFT_CURVES  # trl's step metrics only: no one-point summary "curves"
    for name, frame in got.items():
        assert list(frame.columns) == ["step", name.rsplit("/", 1)[-1]]
        assert list(frame.step) == [2, 4, 6], name  # global steps, logging_steps=2
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert list(got["loss"].loss) == pytest.approx([h["loss"] for h in logged])
    assert list(got["epoch"].epoch) == pytest.approx([0.5, 1.0, 1.5])


@pytest.mark.slow
def test_the_end_of_training_summary_is_in_metrics_json_only(two_runs):
    (root, _), (trainer, _) = two_runs
    summary = json.loads((live_dir(root / "out") / "metrics.json").read_text())
    final = trainer.state.log_history[-1]
    assert "train_runtime" in final  # the Trainer's summary log ...
    assert summary["train"] == {"loss": pytest.approx(final["train_loss"])}  # ... standardized
    assert summary["total_flos"] == final["total_flos"] and summary["epoch"] == 1.5
    assert summary["step"] == 6 and summary["loss"] == curves(root / "out")["loss"].loss.iloc[-1]
    text = json.dumps(summary)
    assert "runtime" not in text and "per_second" not in text  # no wall-clock
    params = yaml.safe_load((live_dir(root / "out") / "params.yaml").read_text())
    assert params["logging_steps"] == 2 and params["seed"] == 42  # the trainer's arguments ...
    assert "output_dir" not in params  # ... less where this run happened to write
    assert str(root) not in (live_dir(root / "out") / "params.yaml").read_text()
    assert not (live_dir(root / "out") / "dvc.yaml").exists()  # DVC records the experiment


@pytest.mark.slow
def test_two_identical_runs_write_byte_identical_files(two_runs):
    (a, b), _ = two_runs
    first, second = files(a / "out"), files(b / "out")
    assert set(first) == {"metrics.json", "params.yaml"} | {
        f"plots/metrics/{name}.tsv" for name in SFT_CURVES
    }
    assert first == second  # curves, summary and params: nothing wall-clock is written


@pytest.mark.slow
def test_a_resumed_run_continues_its_curves(tokenizer, tmp_path):
    # logged steps 1..5, then a crash; the last checkpoint is at step 3
    with pytest.raises(Crash):
        train_sft(tokenizer, tmp_path, crash_at=5, logging_steps=1, save_steps=3)
    crashed = curves(tmp_path / "out")
    assert list(crashed["loss"].step) == [1, 2, 3, 4, 5]
    assert Path(get_last_checkpoint(str(tmp_path / "ckpt"))).name == "checkpoint-3"

    train_sft(tokenizer, tmp_path, logging_steps=1, save_steps=3)
    resumed = curves(tmp_path / "out")
    assert set(resumed) == SFT_CURVES
    for name, frame in resumed.items():
        # steps 4 and 5 logged again from the checkpoint: each step once, none from 0 again
        assert list(frame.step) == [1, 2, 3, 4, 5, 6], name
    # the points before the checkpoint are those the crashed run logged
    assert resumed["loss"].iloc[:3].equals(crashed["loss"].iloc[:3])
    assert json.loads((live_dir(tmp_path / "out") / "metrics.json").read_text())["step"] == 6


@pytest.mark.slow
def test_grpo_curves_keep_the_relay_metrics(tokenizer, tiny_models, tmp_path):
    """trl's GRPO metrics and ours from the relay rollout (relay/*) arrive as curves, on the
    global step; trl's wall-clock step_time does not."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl import GRPOConfig, GRPOTrainer

    from relaypipe.relay.decoder import RelayConfig
    from relaypipe.relay.transformers_backend import TransformersBackend
    from relaypipe.train.rewards import difficulty_aware_reward
    from relaypipe.train.rollout import make_relay_rollout

    _, teacher = tiny_models
    cfg = RelayConfig(mode="random_router", router_p=0.3, max_new_tokens=12, seed=0)
    args = GRPOConfig(
        output_dir=str(tmp_path / "ckpt"),
        max_steps=2,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=12,
        learning_rate=1e-2,
        beta=0.0,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        temperature=1.0,
        disable_tqdm=True,
    )
    trainer = GRPOTrainer(
        model=build_model(ModelSize(32, 1, 2, 64), tokenizer, seed=6),
        reward_funcs=[difficulty_aware_reward],
        args=args,
        train_dataset=Dataset.from_dict(
            {
                "prompt": ["Q: 1+2\nA: ", "Q: 3+4\nA: "] * 2,
                "answer": ["3", "7"] * 2,
                "problem_id": ["a", "b"] * 2,
            }
        ),
        processing_class=tokenizer,
        rollout_func=make_relay_rollout(TransformersBackend(teacher), tokenizer, cfg),
        callbacks=[LiveCallback(training_live(str(tmp_path / "out"), None))],
    )
    trainer.train()
    got = curves(tmp_path / "out")
    relay = {"relay/call_rate", "relay/calls_per_request", "relay/teacher_share", "relay/malformed"}
    assert relay | {"reward", "loss", "completions/mean_length"} <= set(got)
    assert "step_time" in trainer.state.log_history[0]  # logged by trl, a wall-clock time ...
    assert not any("step_time" in name or "runtime" in name for name in got)  # ... left out
    for name, frame in got.items():
        assert list(frame.step) == [1, 2], name
    assert list(got["relay/teacher_share"].teacher_share) == pytest.approx(
        [h["relay/teacher_share"] for h in trainer.state.log_history[:2]]
    )


def fake(step: int):
    args = SimpleNamespace(to_dict=lambda: {"output_dir": "/somewhere", "seed": 1})
    return args, SimpleNamespace(global_step=step, is_world_process_zero=True), SimpleNamespace()


def test_log_names_and_what_is_left_out(tmp_path):
    """Without a trainer: the names transformers' callback gives, on our x axis."""
    callback = LiveCallback(training_live(str(tmp_path), None))
    assert isinstance(callback, DVCLiveCallback) and callback._log_model is False
    callback.on_log(*fake(3), logs={"loss": 1.0, "relay/call_rate": 0.5, "step_time": 0.1})
    evaluation = {"eval_loss": 2.0, "eval_runtime": 1.2, "eval_samples_per_second": 9.0}
    callback.on_log(*fake(3), logs={**evaluation, "epoch": 1.0})
    callback.on_log(*fake(4), logs={"loss": 0.5, "flag": True, "reward": None, "note": "x"})
    # the Trainer's summary, with trl's averages over the step after the last logging step
    summary = {"train_runtime": 3.0, "train_steps_per_second": 1.3, "train_loss": 0.7}
    callback.on_log(*fake(5), logs={**summary, "total_flos": 10.0, "epoch": 2.0, "reward": 0.2})
    callback.on_train_end(*fake(5))
    got = curves(tmp_path)
    assert set(got) == {"loss", "relay/call_rate", "eval/loss", "epoch", "reward"}
    assert list(got["loss"].step) == [3, 4] and list(got["eval/loss"].step) == [3]
    assert list(got["epoch"].step) == [3]  # the summary's epoch is not a curve point
    assert list(got["reward"].step) == [5]
    summary = json.loads((tmp_path / "live" / "metrics.json").read_text())
    assert summary["train"] == {"loss": 0.7} and summary["total_flos"] == 10.0
    assert summary["epoch"] == 2.0 and summary["step"] == 5 and "eval" in summary
    assert not {"train_runtime", "step_time", "runtime"} & set(summary["train"] | summary)
    assert yaml.safe_load((tmp_path / "live" / "params.yaml").read_text()) == {"seed": 1}


def test_drop_points_after_keeps_each_curve_up_to_the_step(tmp_path):
    nested = tmp_path / "relay" / "call_rate.tsv"
    nested.parent.mkdir()
    nested.write_text(f"step\tcall_rate{os.linesep}1\t0.5{os.linesep}4\t0.2{os.linesep}")
    (tmp_path / "loss.tsv").write_text(f"step\tloss{os.linesep}2\t1.0{os.linesep}")
    (tmp_path / "empty.tsv").write_text("")
    drop_points_after(tmp_path, 3)
    assert nested.read_text() == f"step\tcall_rate{os.linesep}1\t0.5{os.linesep}"
    assert (tmp_path / "loss.tsv").read_text() == f"step\tloss{os.linesep}2\t1.0{os.linesep}"
    assert (tmp_path / "empty.tsv").read_text() == ""
