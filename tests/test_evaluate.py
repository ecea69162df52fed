"""Stage evaluate end to end on tiny random models (every mode, per-request rows), its refusal
of a broken benchmark table, and the report stage on what it wrote."""

from __future__ import annotations

import copy
import dataclasses
import json

import pandas as pd
import pytest
import torch

from relaypipe.bounds import PromptFormat, RelayBounds, RelayRecord, write_relay_record
from relaypipe.io import SchemaViolation, read_table, write_table
from relaypipe.schemas import EvalRequestSchema, ProblemSchema, problems_to_frame
from relaypipe.stages import evaluate, report
from relaypipe.tasks.arith import ArithSpec, generate
from relaypipe.teacher import HTTPOptions, TeacherServer, TeacherSpec
from tests.test_call_bias import CommandBodies

# what grpo would have recorded beside the relay model (relaypipe/bounds.py)
TRAINED = RelayBounds(max_call_tokens=4, max_teacher_tokens=6, max_calls=2, max_turns=8)


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
    write_relay_record(root / "relay", RelayRecord("grpo", PromptFormat(), TRAINED, 10))
    return root


def write_benchmarks(folder, n=3):
    for terms in (3, 4):
        problems = generate(ArithSpec(difficulty=1, terms=terms), n, 0, "benchmark")
        frame = problems_to_frame(problems, "benchmark")
        write_table(frame, folder / f"arith-d1t{terms}.parquet", ProblemSchema)


def params(tmp_path, model_dirs, **overrides) -> evaluate.EvaluateParams:
    return evaluate.EvaluateParams(
        router_p=[0.5],
        call_bias_sweep=overrides.pop("call_bias_sweep", [-50.0, 50.0]),
        max_new_tokens=10,
        batch_size=2,
        threads=1,
        device="cpu",
        benchmarks_dir=str(tmp_path / "benchmarks"),
        student=str(model_dirs / "student"),
        warmup=str(model_dirs / "warmup"),
        relay_model=str(model_dirs / "relay"),
        teacher=TeacherSpec(str(model_dirs / "teacher")),
        out_dir=str(tmp_path / "eval"),
        **overrides,
    )


def test_every_mode_on_every_benchmark_then_report(tmp_path, model_dirs):
    (tmp_path / "benchmarks").mkdir()
    write_benchmarks(tmp_path / "benchmarks")
    summary = evaluate.run(params(tmp_path, model_dirs))
    # benchmarks x problems x (5 modes + 1 router p + 2 sweep biases)
    assert summary["requests"] == 2 * 3 * 8
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
    # the bias in effect: the sweep's for relay_sweep, the relay's own (0 here) and 0 elsewhere
    assert set(df[df["mode"] == "relay_sweep"].call_bias) == {-50.0, 50.0}
    assert (df[df["mode"] != "relay_sweep"].call_bias == 0.0).all()
    models = json.loads((tmp_path / "eval" / "models.json").read_text())
    assert models["teacher"]["params"] > models["students"]["student"]["params"]
    assert models["modes"]["teacher_free"] == "relay"
    # bounds: null decoded every mode under the relay model's recorded bounds and prompt
    decoding = models["decoding"]
    assert decoding["bounds"] == decoding["trained_bounds"] == TRAINED.relay_kwargs()
    assert decoding["bounds_from"] == str(model_dirs / "relay" / "relay.json")
    assert decoding["chat_template"] is False and decoding["prompt_from"].endswith("relay.json")
    # the per-request budgets are the relay's; the baselines decode without them, so the
    # teacher alone writes its whole answer (10 tokens here, over the budget of 6)
    relay_rows = df[df["mode"] == "relay"]
    assert (relay_rows.teacher_tokens <= TRAINED.max_teacher_tokens).all()
    assert (relay_rows.calls <= TRAINED.max_calls).all()
    assert teacher.teacher_tokens.max() > TRAINED.max_teacher_tokens

    report.run(
        report.ReportParams(
            requests=str(tmp_path / "eval" / "requests.parquet"),
            models=str(tmp_path / "eval" / "models.json"),
            out_dir=str(tmp_path / "eval"),
        )
    )
    metrics = json.loads((tmp_path / "eval" / "summary.json").read_text())
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


def test_plan_runs_expands_the_relay_sweep_per_bias():
    from relaypipe.evaluate.suite import plan_runs

    runs = plan_runs(["relay", "relay_sweep", "random_router"], [0.2], [2.0, -1.0, 2.0])
    assert [(r.mode, r.call_bias, r.router_p) for r in runs] == [
        ("relay", None, -1.0),
        ("relay_sweep", -1.0, -1.0),
        ("relay_sweep", 2.0, -1.0),
        ("random_router", None, 0.2),
    ]
    assert {r.student_role for r in runs[1:3]} == {"relay"}
    assert {r.decoder_mode for r in runs[:3]} == {"relay"}
    assert [r.label for r in runs[1:3]] == ["relay_sweep bias=-1", "relay_sweep bias=+2"]
    # the bias each run writes in its rows: the sweep's, the relay's (capped), 0
    assert runs[1].row_bias(3.0) == -1.0 and runs[0].row_bias(3.0) == 3.0
    assert runs[0].row_bias(float("-inf")) == -1e6 and runs[3].row_bias(3.0) == 0.0
    with pytest.raises(ValueError, match="relay_sweep needs at least one call bias"):
        plan_runs(["relay_sweep"], [], [])
    with pytest.raises(ValueError, match="finite"):
        plan_runs(["relay_sweep"], [], [float("inf")])


@pytest.mark.parametrize(
    ("section", "words"),
    [
        ({"modes": ["relay", "relay_sweep"], "call_bias_sweep": []}, "call_bias_sweep"),
        ({"call_bias_sweep": [1.0, float("inf")]}, "call_bias_sweep values must be finite"),
        ({"call_bias_sweep": [float("nan")]}, "call_bias_sweep values must be finite"),
    ],
)
def test_a_relay_sweep_without_finite_biases_is_a_params_error(section, words):
    from relaypipe.config import ConfigError, build

    with pytest.raises(ConfigError, match=words):
        build(evaluate.EvaluateParams, section, "params.yaml:evaluate")
    # without relay_sweep in modes an empty sweep is fine
    build(evaluate.EvaluateParams, {"modes": ["relay"], "call_bias_sweep": []}, "e")


class ScriptedBodies(CommandBodies):
    """The relay student's real backend, its command bodies scripted (the tiny random model
    rarely writes a valid one; tests/test_call_bias.py): the model decides when to call."""

    def __getattr__(self, name: str):
        return getattr(self.backend, name)


def test_relay_sweep_rows_carry_their_bias_and_a_higher_bias_calls_more(
    tmp_path, model_dirs, monkeypatch, tokenizer
):
    real = evaluate.TransformersBackend

    def make(model, *args, **kwargs):
        backend = real(model, *args, **kwargs)
        return ScriptedBodies(backend, tokenizer) if kwargs.get("name") == "relay" else backend

    monkeypatch.setattr(evaluate, "TransformersBackend", make)
    (tmp_path / "benchmarks").mkdir()
    write_benchmarks(tmp_path / "benchmarks")
    p = params(
        tmp_path, model_dirs, modes=["relay", "relay_sweep"], call_bias_sweep=[50.0, -50.0, 0.0]
    )
    summary = evaluate.run(dataclasses.replace(p, call_bias=1.5))
    assert summary["runs"] == [
        "relay",
        "relay_sweep bias=-50",
        "relay_sweep bias=+0",
        "relay_sweep bias=+50",
    ]
    df = read_table(tmp_path / "eval" / "requests.parquet", EvalRequestSchema)
    assert (df[df["mode"] == "relay"].call_bias == 1.5).all()  # the relay's own bias
    sweep = df[df["mode"] == "relay_sweep"]
    assert sorted(set(sweep.call_bias)) == [-50.0, 0.0, 50.0]
    assert (sweep.groupby("call_bias").size() == 2 * 3).all()  # every problem, each bias
    assert (sweep.router_p == -1.0).all()
    share = sweep.groupby("call_bias").apply(
        lambda r: r.teacher_tokens.sum() / (r.teacher_tokens.sum() + r.student_tokens.sum())
    )
    assert share[-50.0] == 0.0  # the open tag is as good as banned: no calls
    assert share[50.0] > share[-50.0] and share[50.0] >= share[0.0]
    # under the relay's budgets (6 teacher tokens, 2 calls per request), as the relay
    assert (sweep.teacher_tokens <= TRAINED.max_teacher_tokens).all()
    assert (sweep.calls <= TRAINED.max_calls).all()
    models = json.loads((tmp_path / "eval" / "models.json").read_text())
    assert models["modes"]["relay_sweep"] == "relay"

    report.run(
        report.ReportParams(
            requests=str(tmp_path / "eval" / "requests.parquet"),
            models=str(tmp_path / "eval" / "models.json"),
            out_dir=str(tmp_path / "eval"),
        )
    )
    metrics = json.loads((tmp_path / "eval" / "summary.json").read_text())
    curve = metrics["relay_curve"]["average"]
    assert sorted(p["call_bias"] for p in curve) == [-50.0, 0.0, 1.5, 50.0]
    assert [p["call_ratio"] for p in curve] == sorted(p["call_ratio"] for p in curve)
    assert "## Pareto: relay vs random router" in (tmp_path / "eval" / "report.md").read_text()


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="unknown mode"):
        evaluate.EvaluateParams(modes=["relay", "oracular"])


def contrary_student(folder, tiny_models, tokenizer):
    """The tiny student with its final norm negated: random tied-embedding models predict the
    token they read last, so both tiny models agree everywhere; this one never does."""
    student = copy.deepcopy(tiny_models[0])
    with torch.no_grad():
        student.model.norm.weight.neg_()
    student.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_the_oracle_caller_decodes_beside_the_modes_then_the_report_draws_it(
    tmp_path, model_dirs, tiny_models, tokenizer
):
    (tmp_path / "benchmarks").mkdir()
    write_benchmarks(tmp_path / "benchmarks")
    p = params(tmp_path, model_dirs, modes=["student", "relay", "teacher"])
    p = dataclasses.replace(
        p, student=contrary_student(tmp_path / "contrary", tiny_models, tokenizer)
    )
    summary = evaluate.run(dataclasses.replace(p, oracle_sweep=[1.0, 0.0, 0.3]))
    assert summary["runs"] == [
        "student",
        "relay",
        "teacher",
        "oracle tau=0",
        "oracle tau=0.3",
        "oracle tau=1",
    ]
    assert summary["oracle_seconds"] >= 0
    df = read_table(tmp_path / "eval" / "requests.parquet", EvalRequestSchema)
    oracle = df[df["mode"] == "oracle"]
    assert sorted(set(oracle.oracle_tau)) == [0.0, 0.3, 1.0]
    assert (oracle.groupby("oracle_tau").size() == 2 * 3).all()  # every problem, each tau
    assert (df[df["mode"] != "oracle"].oracle_tau == -1.0).all()
    assert (oracle.router_p == -1.0).all() and (oracle.command_tokens == 0).all()
    # tau = 0 never calls: the bootstrap student alone, token for token
    never = oracle[oracle.oracle_tau == 0.0].set_index(["benchmark", "problem_id"])
    alone = df[df["mode"] == "student"].set_index(["benchmark", "problem_id"])
    assert (never.teacher_tokens == 0).all() and (never.calls == 0).all()
    assert (never.student_tokens == alone.student_tokens.loc[never.index]).all()
    assert (never.correct == alone.correct.loc[never.index]).all()
    # the relay's budgets hold (6 teacher tokens and 2 calls per request, 4 per call)
    assert (oracle.teacher_tokens <= TRAINED.max_teacher_tokens).all()
    assert (oracle.calls <= TRAINED.max_calls).all()
    assert oracle[oracle.oracle_tau == 1.0].teacher_tokens.sum() > 0  # random models disagree
    models = json.loads((tmp_path / "eval" / "models.json").read_text())
    assert models["modes"]["oracle"] == "student"

    report.run(
        report.ReportParams(
            requests=str(tmp_path / "eval" / "requests.parquet"),
            models=str(tmp_path / "eval" / "models.json"),
            out_dir=str(tmp_path / "eval"),
        )
    )
    metrics = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert "oracle" not in metrics["modes"] and "oracle" not in metrics["benchmarks"]["arith-d1t3"]
    for panel in ("average", "arith-d1t3", "arith-d1t4"):
        curve = metrics["oracle_curve"][panel]
        assert sorted(p["oracle_tau"] for p in curve) == [0.0, 0.3, 1.0]
        assert [p["call_ratio"] for p in curve] == sorted(p["call_ratio"] for p in curve)
        assert set(metrics["relay_vs_oracle"][panel]) == {
            "call_ratio",
            "accuracy",
            "oracle_accuracy",
            "ratio",
            "read",
        }
    headline = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert "relay_vs_oracle" in headline
    assert headline["relay_vs_oracle"] == metrics["relay_vs_oracle"]["average"]["ratio"]
    assert (
        "Oracle caller (teacher share → accuracy)" in (tmp_path / "eval" / "report.md").read_text()
    )
    rows = json.loads((tmp_path / "eval" / "plots" / "tradeoff.json").read_text())
    assert sorted(r["name"] for r in rows if r["mode"] == "oracle") == [
        "oracle tau=0",
        "oracle tau=0.3",
        "oracle tau=1",
    ]


@pytest.mark.parametrize(
    ("section", "words"),
    [
        ({"modes": ["relay", "oracle"]}, "no decoder mode; it runs at each threshold"),
        ({"oracle_sweep": [0.1, 1.5]}, r"oracle_sweep values must be numbers in \[0, 1\]"),
        ({"oracle_sweep": [float("nan")]}, "oracle_sweep values must be numbers"),
        ({"oracle_sweep": [True]}, "oracle_sweep"),
        ({"oracle_sweep": [0.1], "temperature": 0.7}, "oracle_sweep needs temperature 0"),
        (
            {
                "oracle_sweep": [0.1],
                "teacher": {"server": {"url": "http://x", "model": "t", "params": 9}},
            },
            "needs the teacher in-process",
        ),
    ],
)
def test_oracle_params_are_checked(section, words):
    from relaypipe.config import ConfigError, build

    with pytest.raises(ConfigError, match=words):
        build(evaluate.EvaluateParams, section, "params.yaml:evaluate")
    # empty: off, with a served teacher or sampling alike
    build(evaluate.EvaluateParams, {"oracle_sweep": [], "temperature": 0.7}, "e")


def serve_model_dir(path, name="teacher"):
    """A real ``relaypipe serve --model <dir>`` (the CLI's app) on a loopback port."""
    import argparse

    from relaypipe.cli_serve import add_parser, build_app
    from relaypipe.serve import ServerThread

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["serve", "--model", str(path), "--name", name, "--device", "cpu", "--api-key-env", ""]
    )
    return ServerThread(build_app(args))


def test_evaluate_with_the_teacher_behind_a_url_equals_in_process(tmp_path, model_dirs):
    (tmp_path / "benchmarks").mkdir()
    write_benchmarks(tmp_path / "benchmarks")
    modes = ["student", "teacher", "random_router"]
    local = params(tmp_path, model_dirs, modes=modes)
    evaluate.run(dataclasses.replace(local, out_dir=str(tmp_path / "local")))
    with serve_model_dir(model_dirs / "teacher") as srv:
        served = dataclasses.replace(
            local,
            # with a server the teacher's weights are never read
            teacher=TeacherSpec("/nonexistent", TeacherServer(srv.url, "teacher", params=123_456)),
        )
        evaluate.run(served)
    want = read_table(tmp_path / "local" / "requests.parquet", EvalRequestSchema)
    got = read_table(tmp_path / "eval" / "requests.parquet", EvalRequestSchema)
    keys = ["benchmark", "mode", "router_p", "problem_id"]
    cols = ["correct", "student_tokens", "teacher_tokens", "command_tokens", "calls"]
    pd.testing.assert_frame_equal(
        got.sort_values(keys)[keys + cols].reset_index(drop=True),
        want.sort_values(keys)[keys + cols].reset_index(drop=True),
    )
    # the teacher really answered over HTTP: every teacher-alone row has teacher tokens
    assert (got[got["mode"] == "teacher"].teacher_tokens > 0).all()
    assert got[got["mode"] == "random_router"].teacher_tokens.sum() > 0
    models = json.loads((tmp_path / "eval" / "models.json").read_text())
    assert models["teacher"] == {"path": f"teacher at {srv.url}", "params": 123_456}


@pytest.mark.parametrize(
    ("kw", "words"),
    [
        ({"server": {"url": "http://x"}}, r"teacher\.server: missing required key 'model'"),
        ({"server": {"model": "t"}}, r"teacher\.server: missing required key 'url'"),
        ({"server": {"url": "http://127.0.0.1:9", "model": "t"}}, "needs params"),
        ({"server": {"url": "u", "model": "t", "params": 0}}, r"server: params must be >= 1"),
        ({"params": 10}, r"evaluate\.teacher: unknown key\(s\) params"),
    ],
)
def test_served_teacher_options_are_checked(kw, words):
    from relaypipe.config import ConfigError, build

    with pytest.raises(ConfigError, match=words):
        build(evaluate.EvaluateParams, {"teacher": kw}, "params.yaml:evaluate")


def test_evaluate_with_an_unreachable_teacher_fails_before_decoding(tmp_path, model_dirs):
    import socket

    (tmp_path / "benchmarks").mkdir()
    write_benchmarks(tmp_path / "benchmarks")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    http = HTTPOptions(max_retries=0, timeout_s=5)
    server = TeacherServer(url, "t", http, params=9)
    p = params(tmp_path, model_dirs)
    p = dataclasses.replace(p, teacher=TeacherSpec(p.teacher.path, server))
    try:
        with pytest.raises(Exception, match=url.split("//")[1]):
            evaluate.run(p)
    finally:
        sock.close()
    assert not (tmp_path / "eval").exists()
