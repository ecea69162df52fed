"""Stage evaluate end to end on tiny random models (every mode, per-request rows), its refusal
of a broken benchmark table, and the report stage on what it wrote."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from relaypipe.io import SchemaViolation, read_table, write_table
from relaypipe.schemas import EvalRequestSchema, ProblemSchema, problems_to_frame
from relaypipe.stages import evaluate, report
from relaypipe.tasks.arith import ArithSpec, generate


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tiny_models, tokenizer):
    root = tmp_path_factory.mktemp("models")
    student, teacher = tiny_models
    for name, model in (
        ("student", student),
        ("warmup", student),
        ("relay", student),
        ("teacher", teacher),
    ):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root


def write_benchmarks(folder, n=3):
    for terms in (3, 4):
        problems = generate(ArithSpec(difficulty=1, terms=terms), n, 0, "benchmark")
        frame = problems_to_frame(problems, "benchmark")
        write_table(frame, folder / f"arith-d1t{terms}.parquet", ProblemSchema)


def params(tmp_path, model_dirs, **overrides) -> evaluate.EvaluateParams:
    return evaluate.EvaluateParams(
        router_p=[0.5],
        max_new_tokens=10,
        batch_size=2,
        threads=1,
        device="cpu",
        benchmarks_dir=str(tmp_path / "benchmarks"),
        student=str(model_dirs / "student"),
        warmup=str(model_dirs / "warmup"),
        relay_model=str(model_dirs / "relay"),
        teacher=str(model_dirs / "teacher"),
        out_dir=str(tmp_path / "eval"),
        **overrides,
    )


def test_every_mode_on_every_benchmark_then_report(tmp_path, model_dirs):
    (tmp_path / "benchmarks").mkdir()
    write_benchmarks(tmp_path / "benchmarks")
    summary = evaluate.run(params(tmp_path, model_dirs))
    assert summary["requests"] == 2 * 3 * 6  # benchmarks x problems x (5 modes + 1 router p)
    df = read_table(tmp_path / "eval" / "requests.parquet", EvalRequestSchema)
    assert set(df.benchmark) == {"arith-d1t3", "arith-d1t4"}
    assert set(df["mode"]) == set(evaluate.EVAL_MODES)
    teacher = df[df["mode"] == "teacher"]
    assert (teacher.student_tokens == 0).all() and (teacher.teacher_tokens > 0).all()
    # the teacher alone reads the prompt once: cached prefill == full context
    assert (teacher.teacher_prefill_tokens == teacher.teacher_context_tokens).all()
    alone = df[df["mode"].isin(["student", "warmup", "teacher_free"])]
    assert (alone.teacher_tokens == 0).all() and (alone.calls == 0).all()
    router = df[df["mode"] == "random_router"]
    assert set(router.router_p) == {0.5} and router.teacher_tokens.sum() > 0
    assert (df[df["mode"] != "random_router"].router_p == -1.0).all()
    models = json.loads((tmp_path / "eval" / "models.json").read_text())
    assert models["teacher"]["params"] > models["students"]["student"]["params"]
    assert models["modes"]["teacher_free"] == "relay"

    report.run(
        report.ReportParams(
            requests=str(tmp_path / "eval" / "requests.parquet"),
            models=str(tmp_path / "eval" / "models.json"),
            out_dir=str(tmp_path / "eval"),
        )
    )
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(metrics["benchmarks"]) == {"arith-d1t3", "arith-d1t4"}
    assert metrics["modes"]["teacher"]["call_ratio"] == 1.0


def test_evaluate_refuses_a_broken_benchmark_before_loading_models(tmp_path):
    folder = tmp_path / "benchmarks"
    folder.mkdir()
    write_benchmarks(folder)
    bad = pd.read_parquet(folder / "arith-d1t4.parquet")
    bad.loc[1, "answer"] = "  "
    bad.to_parquet(folder / "arith-d1t4.parquet")
    p = params(tmp_path, tmp_path / "no-models")  # never reached: the table fails first
    with pytest.raises(SchemaViolation, match=r"arith-d1t4\.parquet"):
        evaluate.run(p)
    assert not (tmp_path / "eval").exists()


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="unknown mode"):
        evaluate.EvaluateParams(modes=["relay", "oracle"])
