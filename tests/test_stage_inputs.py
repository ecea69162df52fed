"""Every stage reads and checks all of its inputs before it writes anything, and publishes its
outputs together (relaypipe/stages/inputs.py, relaypipe/publish.py).

One tiny good pipeline is run once (module fixture): every stage's outputs exist from a good
run. Then each input of each stage is broken in several ways (missing, empty, a wrong-typed or
missing column, a truncated file, a model folder without config, tokenizer or whole weights, a
JSON file cut short or of the wrong shape), the stage is run over a copy of its good outputs, and
it must fail with a message naming the file and the param or upstream stage that makes it, and
leave every file under its outputs byte-identical (no staging folder left behind either).
A second group fails each stage after everything was computed, at its last write, and checks
that nothing was published: outputs land together or not at all.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

import relaypipe.publish
from relaypipe.bounds import PromptFormat, RelayBounds, RelayRecord, write_relay_record
from relaypipe.io import SchemaViolation, write_json
from relaypipe.micro.models import ModelSize
from relaypipe.micro.train_lm import TrainSpec
from relaypipe.publish import together
from relaypipe.stages import (
    bootstrap,
    evaluate,
    grpo,
    prepare,
    report,
    sft,
    warmup_data,
)
from relaypipe.stages import filter as filter_stage
from relaypipe.stages.inputs import StageInputError
from relaypipe.teacher import TeacherSpec
from relaypipe.train.warmup import InsertSpec
from tests.tiny_stage_inputs import make_inputs

QA_ROWS = [
    {"question": "What is six times seven?", "answer": "42"},
    {"question": "Half of ten?", "answer": "5"},
]


# ------------------------------------------------------------------------------ stages, tiny


def _tiny_size() -> ModelSize:
    return ModelSize(16, 1, 2, 32)


def _one_step() -> TrainSpec:
    return TrainSpec(steps=1, batch_size=4, warmup_steps=1)


def prepare_params(i: dict[str, str], out: Path) -> prepare.PrepareParams:
    return prepare.PrepareParams(
        terms=3,
        n_train=24,
        n_eval=4,
        benchmarks=[
            prepare.BenchmarkSpec(name="arith-d1t3", terms=3, n=2),
            prepare.BenchmarkSpec(name="qa", source=i["qa_source"]),
        ],
        train_source=(
            prepare.TrainSourceSpec(source=i["train_source"]) if "train_source" in i else None
        ),
        out_dir=str(out / "problems"),
    )


def bootstrap_params(i: dict[str, str], out: Path) -> bootstrap.BootstrapParams:
    common = {
        "max_new_tokens": 6,
        "eval_batch_size": 4,
        "eval_limit": 2,
        "threads": 1,
        "allow_degenerate": True,
        "problems_dir": i["problems"],
        "out_dir": str(out / "models"),
    }
    if "student_source" in i:  # kind pretrained: import these folders
        return bootstrap.BootstrapParams(
            kind="pretrained",
            student_source=i["student_source"],
            teacher_source=i["teacher"],
            device="cpu",
            **common,
        )
    return bootstrap.BootstrapParams(
        student=_tiny_size(),
        teacher=_tiny_size(),
        student_train=_one_step(),
        teacher_train=_one_step(),
        **common,
    )


def filter_params(i: dict[str, str], out: Path) -> filter_stage.FilterParams:
    return filter_stage.FilterParams(
        k=1,
        n_problems=2,
        max_new_tokens=6,
        batch_size=4,
        device="cpu",
        threads=1,
        problems=i["train"],
        teacher=TeacherSpec(i["teacher"]),
        out_dir=str(out / "filter"),
        allow_degenerate=True,  # the tiny teacher solves nothing
    )


def warmup_params(i: dict[str, str], out: Path) -> warmup_data.WarmupDataParams:
    return warmup_data.WarmupDataParams(
        insert=InsertSpec(policy=i.get("policy", "random")),
        n_problems=2,
        offset=0,
        samples_per_problem=1,
        max_new_tokens=6,
        batch_size=4,
        min_examples=2,
        top_up_with_reference=True,
        allow_degenerate=True,
        device="cpu",
        threads=1,
        problems=i["train"],
        student=i["student"],
        teacher=i["teacher"],
        out_dir=str(out / "warmup"),
    )


def sft_params(i: dict[str, str], out: Path) -> sft.SFTParams:
    return sft.SFTParams(
        trainer={"max_steps": 1, "per_device_train_batch_size": 2, "save_steps": 1},
        allow_degenerate=True,
        eval_n=1,
        max_new_tokens=6,
        eval_batch_size=2,
        device="cpu",
        threads=1,
        data=i["warmup"],
        student=i["student"],
        teacher=TeacherSpec(i["teacher"]),
        eval_problems=i["eval"],
        checkpoint_dir=str(out / "ckpt-sft"),
        out_model=str(out / "models" / "warmup"),
        out_dir=str(out / "sft"),
    )


def grpo_params(i: dict[str, str], out: Path) -> grpo.GRPOParams:
    return grpo.GRPOParams(
        trainer={
            "max_steps": 1,
            "per_device_train_batch_size": 4,
            "num_generations": 2,
            "save_steps": 1,
        },
        allow_degenerate=True,
        eval_n=1,
        max_new_tokens=6,
        eval_batch_size=2,
        device="cpu",
        threads=1,
        problems=i["kept"],
        eval_problems=i["eval"],
        student=i["student"],
        teacher=TeacherSpec(i["teacher"]),
        bootstrap_metrics=i["bootstrap_metrics"],
        checkpoint_dir=str(out / "ckpt-grpo"),
        out_model=str(out / "models" / "relay"),
        out_dir=str(out / "grpo"),
    )


def evaluate_params(i: dict[str, str], out: Path) -> evaluate.EvaluateParams:
    return evaluate.EvaluateParams(
        router_p=[0.5],
        limit=1,
        max_new_tokens=6,
        batch_size=4,
        device="cpu",
        threads=1,
        benchmarks_dir=i["benchmarks"],
        student=i["student"],
        warmup=i["warmup_model"],
        relay_model=i["relay_model"],
        teacher=TeacherSpec(i["teacher"]),
        # held-out problems: read only when calibrating the relay call bias
        calibrate=evaluate.CalibrateParams(
            target_share=float(i["calibrate_target"]) if "calibrate_target" in i else None
        ),
        eval_problems=i["eval"],
        out_dir=str(out / "eval"),
    )


def report_params(i: dict[str, str], out: Path) -> report.ReportParams:
    return report.ReportParams(
        requests=i["requests"],
        models=i["models_json"],
        stage_metrics=[i["bootstrap_metrics"]],
        out_dir=str(out / "report"),
    )


@dataclass(frozen=True)
class Stage:
    run: Callable[[Any], Any]
    params: Callable[[dict[str, str], Path], Any]
    outputs: tuple[str, ...]  # under the output root


STAGES: dict[str, Stage] = {
    "prepare": Stage(prepare.run, prepare_params, ("problems",)),
    "bootstrap": Stage(bootstrap.run, bootstrap_params, ("models",)),
    "filter": Stage(filter_stage.run, filter_params, ("filter",)),
    "warmup_data": Stage(warmup_data.run, warmup_params, ("warmup",)),
    "sft": Stage(sft.run, sft_params, ("models", "sft")),
    "grpo": Stage(grpo.run, grpo_params, ("models", "grpo")),
    "evaluate": Stage(evaluate.run, evaluate_params, ("eval",)),
    "report": Stage(report.run, report_params, ("report",)),
}


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> tuple[dict[str, str], Path]:
    """Every stage's inputs, and a folder per stage holding the outputs of a good run."""
    root = tmp_path_factory.mktemp("stage-inputs")
    i = make_inputs(root / "in")
    models = Path(i["student"]).parent
    for name in ("warmup", "relay"):  # the later students: the student's copy will do
        shutil.copytree(i["student"], models / name)
    i["warmup_model"], i["relay_model"] = str(models / "warmup"), str(models / "relay")
    # what grpo records beside its model: evaluate's bounds: null decodes under it
    write_relay_record(models / "relay", RelayRecord("grpo", PromptFormat(), RelayBounds(), 6))
    qa = root / "in" / "qa.jsonl"
    qa.write_text("".join(json.dumps(r) + "\n" for r in QA_ROWS))
    i["qa_source"] = str(qa)
    outs = root / "good"
    for name, stage in STAGES.items():
        if name == "report":  # reads what the good evaluate run wrote
            i["requests"] = str(outs / "evaluate" / "eval" / "requests.parquet")
            i["models_json"] = str(outs / "evaluate" / "eval" / "models.json")
        stage.run(stage.params(i, outs / name))
    return i, outs


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root``, hidden ones included: file -> sha256, folder -> "dir"."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def copy_outputs(good_root: Path, stage: str, dest: Path) -> Path:
    for name in STAGES[stage].outputs:
        src = good_root / stage / name
        assert src.exists(), f"the good {stage} run wrote no {name}"
        shutil.copytree(src, dest / name)
    return dest


# ------------------------------------------------------------------------------ breaking inputs


def _write_parquet(df: pd.DataFrame, path: Path) -> None:
    df.to_parquet(path, index=False)  # raw pandas: no schema stands in the way


def _wrong_type(df: pd.DataFrame) -> pd.DataFrame:
    column = next(c for c in df.columns if df[c].dtype.kind in "iuf")
    return df.assign(**{column: ["not a number"] * len(df)})


def break_table(src: Path, dst: Path, how: str) -> None:
    if how == "missing":
        return
    if how == "truncated":
        data = src.read_bytes()
        dst.write_bytes(data[: len(data) // 2])
        return
    df = pd.read_parquet(src)
    broken = {
        "empty": lambda: df.iloc[:0],
        "wrong_type": lambda: _wrong_type(df),
        "missing_column": lambda: df.drop(columns=[df.columns[0]]),
    }[how]()
    _write_parquet(broken, dst)


def break_model(src: Path, dst: Path, how: str) -> None:
    if how == "missing":
        return
    shutil.copytree(src, dst)
    if how == "no_config":
        (dst / "config.json").unlink()
    elif how == "bad_config":
        text = (dst / "config.json").read_text()
        (dst / "config.json").write_text(text[: len(text) // 2])
    elif how == "cut_weights":
        data = (dst / "model.safetensors").read_bytes()
        (dst / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif how == "no_tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (dst / name).unlink()
    else:
        raise AssertionError(how)


def break_json(src: Path, dst: Path, how: str) -> None:
    if how == "missing":
        return
    if how == "truncated":
        text = src.read_text()
        dst.write_text(text[: len(text) // 2])
    elif how == "not_an_object":
        dst.write_text("[1, 2]\n")
    else:
        raise AssertionError(how)


def break_dataset(src: Path, dst: Path, how: str) -> None:
    if how == "missing":
        return
    if how == "empty":
        dst.write_text("")
    elif how == "truncated":
        text = src.read_text()
        dst.write_text(text[: len(text) // 2 + 3])  # a JSON line cut in the middle
    elif how == "missing_column":
        dst.write_text("".join(json.dumps({"question": r["question"]}) + "\n" for r in QA_ROWS))
    else:
        raise AssertionError(how)


TABLE = ("missing", "empty", "wrong_type", "missing_column", "truncated")
MODEL = ("missing", "no_config", "bad_config", "cut_weights", "no_tokenizer")
JSON = ("missing", "truncated", "not_an_object")
DATASET = ("missing", "empty", "missing_column", "truncated")
BREAK = {"table": break_table, "model": break_model, "json": break_json, "dataset": break_dataset}


@dataclass(frozen=True)
class Input:
    """One input of a stage: where it is in the inputs dict (``key``, and ``member`` when the
    param names the folder holding it), its kind, and what its errors must name."""

    stage: str
    key: str
    kind: str
    words: tuple[str, ...]  # the param and/or the upstream stage
    member: str | None = None
    ways: tuple[str, ...] = ()
    empty_words: tuple[str, ...] = ()  # what a 0-row table's message must also name
    extra: dict[str, str] = field(default_factory=dict)  # inputs added for this one

    def all_ways(self) -> tuple[str, ...]:
        default = {"table": TABLE, "model": MODEL, "json": JSON, "dataset": DATASET}
        return self.ways or default[self.kind]


INPUTS = [
    Input("prepare", "qa_source", "dataset", ("prepare.benchmarks[qa]",)),
    Input(
        "prepare",
        "train_source",
        "dataset",
        ("prepare.train_source",),
        ways=("missing", "missing_column"),
        extra={"train_source": "qa_source"},
    ),
    *(
        Input(
            "bootstrap",
            "problems",
            "table",
            ("bootstrap.problems_dir", "prepare stage"),
            member=f"{split}.parquet",
            empty_words=(f"prepare.n_{split}",),
        )
        for split in ("train", "eval")
    ),
    Input(
        "bootstrap",
        "student_source",
        "model",
        ("bootstrap.student_source",),
        extra={"student_source": "student"},
    ),
    Input(
        "filter", "train", "table", ("filter.problems", "prepare stage"), empty_words=("n_train",)
    ),
    Input("filter", "teacher", "model", ("filter.teacher", "bootstrap stage")),
    Input(
        "warmup_data",
        "train",
        "table",
        ("warmup_data.problems", "prepare stage"),
        empty_words=("prepare.n_train",),
    ),
    Input("warmup_data", "student", "model", ("warmup_data.student", "bootstrap stage")),
    Input(
        "warmup_data",
        "teacher",
        "model",
        ("warmup_data.teacher", "bootstrap stage"),
        ways=("missing", "cut_weights"),
        extra={"policy": "=disagreement"},  # the only policy that reads the teacher
    ),
    Input(
        "sft",
        "warmup",
        "table",
        ("sft.data", "warmup_data stage"),
        empty_words=("warmup_data.n_problems",),
    ),
    Input("sft", "student", "model", ("sft.student", "bootstrap stage")),
    Input("sft", "teacher", "model", ("sft.teacher", "bootstrap stage")),
    Input("sft", "eval", "table", ("sft.eval_problems", "prepare stage"), empty_words=("n_eval",)),
    Input(
        "grpo",
        "kept",
        "table",
        ("grpo.problems", "filter stage"),
        empty_words=("filter stage kept no problem", "filter.k"),
    ),
    Input("grpo", "student", "model", ("grpo.student", "sft stage")),
    Input("grpo", "teacher", "model", ("grpo.teacher", "bootstrap stage")),
    Input(
        "grpo", "eval", "table", ("grpo.eval_problems", "prepare stage"), empty_words=("n_eval",)
    ),
    Input("grpo", "bootstrap_metrics", "json", ("grpo.bootstrap_metrics", "bootstrap stage")),
    Input(
        "evaluate",
        "benchmarks",
        "table",
        ("evaluate.benchmarks_dir", "prepare"),
        member="arith-d1t3.parquet",
        empty_words=("empty benchmark", "prepare.benchmarks"),
    ),
    Input("evaluate", "student", "model", ("evaluate.student", "bootstrap stage")),
    Input("evaluate", "warmup_model", "model", ("evaluate.warmup", "sft stage")),
    Input("evaluate", "relay_model", "model", ("evaluate.relay_model", "grpo stage")),
    Input("evaluate", "teacher", "model", ("evaluate.teacher", "bootstrap stage")),
    Input(
        "evaluate",
        "eval",
        "table",
        ("evaluate.eval_problems", "prepare stage"),
        empty_words=("prepare.n_eval",),
        extra={"calibrate_target": "=0.1"},  # calibrating: the only time the stage reads it
    ),
    Input(
        "report",
        "requests",
        "table",
        ("report.requests", "evaluate stage"),
        empty_words=("evaluate.limit",),
    ),
    Input("report", "models_json", "json", ("report.models", "evaluate stage")),
    Input(
        "report",
        "bootstrap_metrics",
        "json",
        ("report.stage_metrics", "bootstrap stage"),
        ways=("truncated", "not_an_object"),  # a missing one is skipped: that stage never ran
    ),
]

CASES = [
    pytest.param(spec, how, id=f"{spec.stage}-{spec.member or spec.key}-{how}")
    for spec in INPUTS
    for how in spec.all_ways()
]


def _inputs_for(spec: Input, good_inputs: dict[str, str]) -> dict[str, str]:
    i = dict(good_inputs)
    for key, value in spec.extra.items():
        i[key] = value[1:] if value.startswith("=") else good_inputs[value]
    return i


@pytest.mark.parametrize(("spec", "how"), CASES)
def test_a_broken_input_fails_naming_it_and_leaves_every_output_as_it_was(
    spec, how, good, tmp_path
):
    good_inputs, good_outputs = good
    i = _inputs_for(spec, good_inputs)
    broken_root = tmp_path / "broken"
    broken_root.mkdir()
    src = Path(i[spec.key])
    if spec.member:  # the param names a folder: break one file in a copy of it
        folder = broken_root / src.name
        shutil.copytree(src, folder)
        target = folder / spec.member
        good_file = src / spec.member
        target.unlink()
        i[spec.key] = str(folder)
    else:
        target = broken_root / src.name
        good_file = src
        i[spec.key] = str(target)
    BREAK[spec.kind](good_file, target, how)

    out = copy_outputs(good_outputs, spec.stage, tmp_path / "out")
    before = snapshot(out)
    stage = STAGES[spec.stage]
    params = stage.params(i, out)
    with pytest.raises((StageInputError, SchemaViolation, FileNotFoundError)) as err:
        stage.run(params)
    message = str(err.value)
    named = str(target) in message or (
        # a folder of tables with its only table missing: the folder is named
        how == "missing" and spec.member and str(target.parent) in message
    )
    assert named, message
    for word in spec.words + (spec.empty_words if how == "empty" else ()):
        assert word in message, f"{word!r} not in:\n{message}"
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "out"]


def test_case_count():
    """How many broken inputs the test above tries (reported, and kept from shrinking)."""
    assert len(CASES) >= 100, len(CASES)


# ------------------------------------------------------------------------------ late failures


def _fail_on(names: set[str], real: Callable[..., Any]) -> Callable[..., Any]:
    def write(*args, **kwargs):
        paths = [Path(a) for a in args if isinstance(a, str | os.PathLike)]
        if any(p.name in names for p in paths):
            raise RuntimeError(f"simulated failure writing {paths[0]}")
        return real(*args, **kwargs)

    return write


# The last write of each stage (after every other output was staged): made to fail.
LAST_WRITE = {
    "prepare": ("relaypipe.stages.prepare.write_table", {"qa.parquet"}),
    "bootstrap": ("relaypipe.publish.write_json", {"bootstrap.json"}),
    "filter": ("relaypipe.publish.write_json", {"metrics.json"}),
    "warmup_data": ("relaypipe.publish.write_json", {"metrics.json"}),
    "sft": ("relaypipe.publish.write_json", {"metrics.json"}),
    "grpo": ("relaypipe.publish.write_json", {"metrics.json"}),
    "evaluate": ("relaypipe.publish.write_json", {"models.json"}),
    "report": ("relaypipe.publish.write_json", {"metrics.json"}),
}


@pytest.mark.parametrize("name", list(STAGES))
def test_a_failure_after_the_work_publishes_nothing(name, good, tmp_path, monkeypatch):
    """Every output computed and staged but the last: none of them replaces the old ones
    (a new model never lands beside stale metrics, a new table never beside old metrics)."""
    good_inputs, good_outputs = good
    out = copy_outputs(good_outputs, name, tmp_path / "out")
    stage = STAGES[name]
    params = stage.params(good_inputs, out)
    before = snapshot(out)
    target, names = LAST_WRITE[name]
    module, attr = target.rsplit(".", 1)
    real = getattr(importlib.import_module(module), attr)
    monkeypatch.setattr(target, _fail_on(names, real))
    with pytest.raises(RuntimeError, match="simulated failure"):
        stage.run(params)
    after = snapshot(out)
    # Training stages keep what a re-run resumes from (checkpoints) and the curves of every
    # run, the failed one too (as before: named in their docs and failure messages).
    kept = (f"{name}/live", f"ckpt-{name}")
    assert {k: v for k, v in after.items() if not k.startswith(kept)} == {
        k: v for k, v in before.items() if not k.startswith(kept)
    }
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# ------------------------------------------------------------------------------ publish itself


def test_publication_renames_everything_or_puts_the_old_outputs_back(tmp_path, monkeypatch):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "w.bin").write_bytes(b"old weights")
    write_json(tmp_path / "metrics.json", {"old": 1})
    before = snapshot(tmp_path)

    real = os.replace
    failed = []

    def flaky(src, dst):
        # once: the rename of the second output into place (the model is already there)
        staged = Path(src).parent.name.startswith(".metrics.json.publish-")
        if staged and Path(dst).parent == tmp_path and not failed:
            failed.append(dst)
            raise OSError("simulated rename failure")
        return real(src, dst)

    monkeypatch.setattr(relaypipe.publish.os, "replace", flaky)
    with pytest.raises(OSError, match="simulated"), together() as pub:
        (pub.directory(tmp_path / "model") / "w.bin").write_bytes(b"new weights")
        pub.json(tmp_path / "metrics.json", {"new": 2})
    assert failed and snapshot(tmp_path) == before  # old model back, no staging left

    monkeypatch.setattr(relaypipe.publish.os, "replace", real)
    with together() as pub:
        (pub.directory(tmp_path / "model") / "w.bin").write_bytes(b"new weights")
        pub.json(tmp_path / "metrics.json", {"new": 2})
        nested = pub.path(tmp_path / "plots" / "deep" / "p.json")
        nested.write_text("{}")
    assert (tmp_path / "model" / "w.bin").read_bytes() == b"new weights"
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"new": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "model", "plots"]


def test_a_failed_publication_removes_the_folders_it_made(tmp_path):
    with pytest.raises(RuntimeError), together() as pub:
        pub.json(tmp_path / "a" / "b" / "metrics.json", {"x": 1})
        raise RuntimeError("the stage failed")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="staged twice"), together() as pub:
        pub.path(tmp_path / "x.json")
        pub.path(tmp_path / "x.json")
    assert list(tmp_path.iterdir()) == []


def test_the_staged_bytes_equal_a_direct_write(tmp_path):
    """Publishing changes where a file is written first, not what is written (DVC hashes)."""
    write_json(tmp_path / "direct.json", {"b": 1, "a": [1.5, None]})
    with together() as pub:
        pub.json(tmp_path / "staged.json", {"b": 1, "a": [1.5, None]})
    assert (tmp_path / "direct.json").read_bytes() == (tmp_path / "staged.json").read_bytes()


def test_grpo_on_an_empty_kept_table_refuses_before_training(good, tmp_path):
    """The hole that started this: 0 kept problems used to train 0 steps and publish the
    warm-up weights as the relay model."""
    good_inputs, _ = good
    empty = tmp_path / "kept.parquet"
    _write_parquet(pd.read_parquet(good_inputs["kept"]).iloc[:0], empty)
    params = grpo_params({**good_inputs, "kept": str(empty)}, tmp_path / "out")
    with pytest.raises(StageInputError, match=r"has 0 rows: the filter stage kept no problem"):
        grpo.run(params)
    assert not (tmp_path / "out").exists()


def test_a_served_teacher_folder_is_refused_where_weights_are_needed(good, tmp_path):
    """A teacher folder written for a served teacher (tokenizer + remote_teacher.json) cannot
    give the disagreement policy its logits: said before any model is loaded."""
    from relaypipe.micro.tokenizer import build_char_tokenizer
    from relaypipe.teacher import write_remote_teacher_dir

    good_inputs, _ = good
    served = tmp_path / "teacher"
    write_remote_teacher_dir(served, build_char_tokenizer(), "http://127.0.0.1:9", "big")
    i = {**good_inputs, "teacher": str(served), "policy": "disagreement"}
    with pytest.raises(StageInputError, match=r"served teacher \(big at .*policy disagreement"):
        warmup_data.run(warmup_params(i, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_prepare_replaces_its_benchmark_folder_whole_keeping_other_files(good, tmp_path):
    good_inputs, _ = good
    params = prepare_params(good_inputs, tmp_path)
    prepare.run(params)
    bench = tmp_path / "problems" / "benchmarks"
    (bench / "README.txt").write_text("notes\n")
    (bench / "old.parquet").write_bytes((bench / "qa.parquet").read_bytes())
    prepare.run(params)
    assert sorted(p.name for p in bench.iterdir()) == [
        "README.txt",
        "arith-d1t3.parquet",
        "qa.parquet",
    ]
    assert sorted(p.name for p in (tmp_path / "problems").iterdir()) == [
        "benchmarks",
        "calibration",  # empty: no benchmark asks for calibration_n
        "eval.parquet",
        "train.parquet",
    ]
