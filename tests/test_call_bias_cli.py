"""The call bias on every command line and in the evaluate stage: ``--call-bias`` on decode,
serve (operator default, ``relay.call_bias`` per request over real HTTP) and bench; ``relaypipe
calibrate`` writing call_bias.json that decode then uses by default; the evaluate stage
calibrating the relay mode's bias on held-out problems (``evaluate.calibrate``), and the report
setting the realised teacher share against the target.

The tiny random student rarely writes a valid command body, so (as in tests/test_call_bias.py)
its bodies are scripted: :class:`Bodies` wraps the student's backend and answers every request
resumed right after ``<call>`` with ``6</call>``; the model itself decides *when* to call, under
the bias. The commands build their backends themselves, so the tests swap the backend class
they import for one that wraps the student's (the teacher's is left as it is).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
from pathlib import Path

import httpx
import pandas as pd
import pytest

from relaypipe import bench, cli, cli_bench
from relaypipe.bounds import (
    PromptFormat,
    RelayBounds,
    RelayRecord,
    call_bias_arg,
    join_negative_values,
    write_relay_record,
)
from relaypipe.calibrate import CALIBRATION_FILE, read_calibration
from relaypipe.cli_serve import add_parser, build_app
from relaypipe.config import ConfigError, build
from relaypipe.io import write_table
from relaypipe.relay import transformers_backend
from relaypipe.relay.trace import Source
from relaypipe.schemas import ProblemSchema, problems_to_frame
from relaypipe.serve import ServerThread
from relaypipe.stages import evaluate, report
from relaypipe.stages.inputs import MissingInputError
from relaypipe.tasks.arith import ArithSpec, generate
from relaypipe.teacher import TeacherSpec
from tests.test_call_bias import CommandBodies

STUDENT_WIDTH = 32  # the tiny student's hidden size (the teacher's is 48): whose backend to wrap
QUESTIONS = ["1+2", "33+4", "5+6+7", "8+1"]


class Bodies(CommandBodies):
    """The student's real backend with scripted command bodies (everything else delegated)."""

    def __getattr__(self, name: str):
        return getattr(self.backend, name)


@pytest.fixture
def scripted(monkeypatch, tokenizer):
    """Every TransformersBackend the commands and the stage build around the tiny student
    scripts its command bodies."""
    real = transformers_backend.TransformersBackend

    def make(model, *args, **kwargs):
        backend = real(model, *args, **kwargs)
        if model.config.hidden_size == STUDENT_WIDTH:
            return Bodies(backend, tokenizer)
        return backend

    for module in (transformers_backend, bench, evaluate):
        monkeypatch.setattr(module, "TransformersBackend", make)


def write_problems(path: Path, n: int, terms: int = 3, split: str = "eval") -> str:
    problems = generate(ArithSpec(difficulty=1, terms=terms), n, 0, split)
    write_table(problems_to_frame(problems, split), path, ProblemSchema)
    return str(path)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tiny_models, tokenizer):
    """The tiny pair saved as model folders (no relay.json), and held-out problems."""
    root = tmp_path_factory.mktemp("call-bias")
    for name, model in zip(("student", "teacher"), tiny_models, strict=True):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    write_problems(root / "eval.parquet", 16)
    return root


def fresh_student(dirs: Path, tmp_path: Path) -> Path:
    """A copy of the student folder a test may write call_bias.json into."""
    return Path(shutil.copytree(dirs / "student", tmp_path / "student"))


def share(sources: list[list[int]]) -> float:
    tokens = [s for row in sources for s in row]
    return sum(s == Source.TEACHER for s in tokens) / len(tokens)


def decode(capsys, student: Path, teacher: Path, *flags: str) -> tuple[float, str]:
    """Teacher share of ``relaypipe decode --json`` over QUESTIONS, and its stderr."""
    argv = ["decode", "--student", str(student), "--teacher", str(teacher), "--json"]
    for q in QUESTIONS:
        argv += ["--prompt", q]
    argv += ["--max-new-tokens", "24", "--device", "cpu", *flags]
    assert cli.main(argv) == 0
    out = capsys.readouterr()
    rows = [json.loads(line) for line in out.out.splitlines()]
    assert len(rows) == len(QUESTIONS)
    return share([r["sources"] for r in rows]), out.err


# ------------------------------------------------------------------------------ the flag itself


@pytest.mark.parametrize(
    ("text", "value"),
    [("0", 0.0), ("2.5", 2.5), ("-3", -3.0), ("inf", math.inf), ("-inf", -math.inf), ("1e3", 1e3)],
)
def test_the_flag_takes_numbers_and_infinities(text, value):
    assert call_bias_arg(text) == value


@pytest.mark.parametrize("text", ["nan", "NaN", "lots", "", "true"])
def test_the_flag_refuses_nan_and_words(text):
    with pytest.raises(argparse.ArgumentTypeError):
        call_bias_arg(text)


def test_a_negative_value_after_a_space_is_the_flags():
    flags = ("--call-bias", "--lo")
    argv = ["decode", "--call-bias", "-inf", "--lo", "-1e3", "--hi", "-inf", "--call-bias", "-x"]
    assert join_negative_values(argv, flags) == [
        *("decode", "--call-bias=-inf", "--lo=-1e3", "--hi", "-inf", "--call-bias", "-x")
    ]


@pytest.mark.parametrize("bad", ["nan", "many"])
def test_decode_refuses_a_bad_bias_with_status_2(dirs, bad, capsys):
    argv = ["decode", "--student", str(dirs / "student"), "--teacher", str(dirs / "teacher")]
    with pytest.raises(SystemExit) as info:
        cli.main([*argv, "--prompt", "1", "--call-bias", bad])
    assert info.value.code == 2
    assert "--call-bias" in capsys.readouterr().err


# ------------------------------------------------------------------------------ decode


def test_decode_call_bias_moves_the_teacher_share(dirs, scripted, capsys):
    student, teacher = dirs / "student", dirs / "teacher"
    never, err = decode(capsys, student, teacher, "--call-bias", "-inf")
    assert "call bias -inf (--call-bias)" in err
    as_trained, err = decode(capsys, student, teacher)
    assert "relaypipe decode:" not in err  # nothing from the folder, no flag: nothing said
    some, _ = decode(capsys, student, teacher, "--call-bias", "2")
    always, err = decode(capsys, student, teacher, "--call-bias", "inf")
    assert "call bias +inf (--call-bias)" in err
    assert never == 0.0
    assert never <= as_trained <= some <= always
    assert always > as_trained + 0.3  # the knob really moves the share
    # fixed_help honours it too; student mode ignores it
    fixed, _ = decode(capsys, student, teacher, "--call-bias", "inf", "--mode", "fixed_help")
    assert fixed > 0.3
    alone, _ = decode(capsys, student, teacher, "--call-bias", "inf", "--mode", "student")
    assert alone == 0.0


# ------------------------------------------------------------------------------ calibrate


def calibrate(capsys, student: Path, teacher: Path, *flags: str) -> tuple[int, dict, str]:
    argv = [
        *("calibrate", "--student", str(student), "--teacher", str(teacher)),
        *("--max-new-tokens", "24", "--temperature", "1", "--device", "cpu"),
        *flags,
    ]
    code = cli.main(argv)
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert len(lines) == 1, out.out
    return code, json.loads(lines[0]), out.err


def test_calibrate_writes_call_bias_json_that_decode_then_uses(dirs, scripted, tmp_path, capsys):
    student = fresh_student(dirs, tmp_path)
    problems = str(dirs / "eval.parquet")
    code, line, err = calibrate(
        capsys, student, dirs / "teacher", "--problems", problems, "--n", "12",
        "--target-share", "0.3", "--tol", "0.1",
    )  # fmt: skip
    assert code == 0, err
    assert line["reached"] is True and abs(line["share"] - 0.3) <= 0.1
    assert line["target_share"] == 0.3 and line["n_problems"] == 12
    assert line["written"] == str(student / CALIBRATION_FILE)
    assert line["points"][0]["bias"] == 0.0  # the student as trained first
    assert {"bias", "share", "accuracy", "teacher_tokens", "calls"} <= set(line["points"][-1])
    assert line["bias"] in [p["bias"] for p in line["points"]]
    stored = read_calibration(student)
    assert stored is not None and stored.bias == line["bias"] and stored.reached
    assert "wrote" in err

    # decode picks it up by default, says so, and decodes with it; a flag overrides it
    default, err = decode(capsys, student, dirs / "teacher", "--temperature", "1")
    assert f"call bias {line['bias']:+.4g} ({student / CALIBRATION_FILE}" in err
    assert "calibrated to teacher share" in err
    assert default > 0.0
    never, err = decode(capsys, student, dirs / "teacher", "--temperature", "1", "--call-bias=-inf")
    assert never == 0.0 and "(--call-bias)" in err
    # the same student without the file: no bias
    plain, _ = decode(capsys, dirs / "student", dirs / "teacher", "--temperature", "1")
    assert plain < default


def test_calibrate_out_of_reach_exits_1_and_writes_nothing_unless_told(
    dirs, scripted, tmp_path, capsys
):
    student = fresh_student(dirs, tmp_path)
    flags = [
        *("--problems", str(dirs / "eval.parquet"), "--n", "6", "--target-share", "0.95"),
        *("--tol", "0.01", "--max-iters", "2"),
    ]
    code, line, err = calibrate(capsys, student, dirs / "teacher", *flags)
    assert code == 1
    assert line["reached"] is False and line["written"] is None
    assert "not reached" in err and "out of reach" in err and "not written" in err
    assert not (student / CALIBRATION_FILE).exists()
    out = tmp_path / "elsewhere"
    code, line, err = calibrate(
        capsys, student, dirs / "teacher", *flags, "--write-unreached", "--out", str(out)
    )
    assert code == 1 and line["written"] == str(out / CALIBRATION_FILE)
    assert not (student / CALIBRATION_FILE).exists()
    stored = read_calibration(out)
    assert stored is not None and not stored.reached
    # decode with that folder as the student says the target was not reached
    shutil.copytree(dirs / "student", out, dirs_exist_ok=True)
    _, err = decode(capsys, out, dirs / "teacher")
    assert "target not reached" in err


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--target-share", "1.5"], "--target-share: must be in [0, 1]"),
        (["--target-share", "nan"], "--target-share: must be in [0, 1]"),
        (["--target-share", "0.1", "--tol", "0"], "--tol must be in (0, 1)"),
        (["--target-share", "0.1", "--lo", "3", "--hi", "1"], "--lo 3 must be below --hi 1"),
        (["--target-share", "0.1", "--hi", "inf"], "--hi: must be a finite number"),
        (["--target-share", "0.1", "--problems", "/nonexistent.parquet"], "not found"),
        (["--target-share", "0.1", "--mode", "student"], "invalid choice: 'student'"),
    ],
)
def test_calibrate_refuses_bad_input_with_status_2(dirs, flags, words, capsys):
    argv = ["calibrate", "--student", str(dirs / "student"), "--teacher", str(dirs / "teacher")]
    try:
        code = cli.main([*argv, "--device", "cpu", *flags])
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    assert code == 2
    assert words in capsys.readouterr().err
    assert not (dirs / "student" / CALIBRATION_FILE).exists()


def test_a_broken_call_bias_json_is_bad_input_unless_the_flag_is_given(dirs, tmp_path, capsys):
    student = fresh_student(dirs, tmp_path)
    (student / CALIBRATION_FILE).write_text('{"format": 1, "bias": 2}')
    argv = ["decode", "--student", str(student), "--teacher", str(dirs / "teacher")]
    argv += ["--prompt", "1+2", "--max-new-tokens", "4", "--device", "cpu"]
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert "call_bias.json: not a valid calibration" in capsys.readouterr().err
    assert cli.main([*argv, "--call-bias", "0"]) == 0  # the flag wins: the file is not read


# ------------------------------------------------------------------------------ serve


def serve(*argv: str) -> ServerThread:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--device", "cpu", "--api-key-env", "", *argv])
    return ServerThread(build_app(args))


def complete(srv: ServerThread, body: dict | bytes) -> httpx.Response:
    """POST a body; a dict is encoded by Python's json, whose ``Infinity`` (not standard JSON,
    which httpx refuses to write) the server reads, as Python's json does."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        f"{srv.url}/v1/completions",
        content=raw,
        headers={"content-type": "application/json"},
        timeout=60,
    )


def teacher_tokens(srv: ServerThread, **relay: object) -> int:
    body = {"prompt": [f"Q: {q}\nA: " for q in QUESTIONS], "max_tokens": 24, "temperature": 0}
    if relay:
        body["relay"] = relay
    r = complete(srv, body)
    assert r.status_code == 200, r.text
    return sum(c["relay"]["teacher_tokens"] for c in r.json()["choices"])


def test_serve_call_bias_default_and_request_override_over_http(dirs, scripted, tmp_path):
    base = ["--student", str(dirs / "student"), "--teacher", str(dirs / "teacher")]
    with serve(*base) as srv:
        (card,) = httpx.get(f"{srv.url}/v1/models").json()["data"]
        assert card["relay"]["call_bias"] == 0.0
        assert card["relay"]["call_bias_from"] == "default"
        assert teacher_tokens(srv) == 0  # the untrained student, greedy, never calls
        assert teacher_tokens(srv, call_bias=math.inf) > 0  # a request asks for calls
        assert teacher_tokens(srv, call_bias=3) > 0
    with serve(*base, "--call-bias", "inf") as srv:
        (card,) = httpx.get(f"{srv.url}/v1/models").json()["data"]
        assert card["relay"]["call_bias"] == "inf"
        assert card["relay"]["call_bias_from"] == "--call-bias"
        assert teacher_tokens(srv) > 0  # the operator's default
        assert teacher_tokens(srv, call_bias=-math.inf) == 0  # a request overrides it
        assert teacher_tokens(srv, call_bias=0) == 0
        # 1e999 is how a strict JSON client writes infinity
        raw = b'{"prompt": "Q: 1+2\\nA: ", "max_tokens": 24, "relay": {"call_bias": -1e999}}'
        r = complete(srv, raw)
        assert r.status_code == 200 and r.json()["choices"][0]["relay"]["teacher_tokens"] == 0
    # a calibrated student: its call_bias.json is the operator default
    student = fresh_student(dirs, tmp_path)
    write_calibration_for(student, bias=5.0)
    with serve("--student", str(student), "--teacher", str(dirs / "teacher")) as srv:
        (card,) = httpx.get(f"{srv.url}/v1/models").json()["data"]
        assert card["relay"]["call_bias"] == 5.0
        assert CALIBRATION_FILE in card["relay"]["call_bias_from"]
        assert teacher_tokens(srv) > 0


BAD_BIASES = [
    (b'{"prompt": "1", "relay": {"call_bias": NaN}}', "got NaN"),
    (b'{"prompt": "1", "relay": {"call_bias": "1.5"}}', "must be a number, got '1.5'"),
    (b'{"prompt": "1", "relay": {"call_bias": "inf"}}', "must be a number, got 'inf'"),
    (b'{"prompt": "1", "relay": {"call_bias": true}}', "must be a number, got true"),
    (b'{"prompt": "1", "relay": {"call_bias": [1]}}', "must be a number"),
]


def test_serve_refuses_nan_strings_and_bools_as_call_bias(dirs):
    with serve("--student", str(dirs / "student"), "--teacher", str(dirs / "teacher")) as srv:
        for body, words in BAD_BIASES:
            r = complete(srv, body)
            assert r.status_code == 400, (body, r.text)
            error = r.json()["error"]
            assert error["param"] == "relay.call_bias", (body, error)
            assert words in error["message"], (body, error)
            assert error["type"] == "invalid_request_error"


def write_calibration_for(student: Path, bias: float) -> None:
    """A call_bias.json as `relaypipe calibrate` writes it, without decoding anything."""
    from relaypipe.calibrate import CalibrationPoint, CalibrationResult, write_calibration
    from relaypipe.relay.decoder import RelayConfig

    point = CalibrationPoint(bias, 0.3, 0.0, 3, 10, 1)
    config = dataclasses.asdict(RelayConfig())
    config.pop("call_bias")
    result = CalibrationResult(
        0.3, 0.05, bias, 0.3, 0.0, True, "hand-made", (point,), 4, -20.0, 20.0, config
    )
    write_calibration(student, result)


# ------------------------------------------------------------------------------ bench


def run_bench(tmp_path: Path, student: Path, teacher: Path, problems: str, *flags: str) -> dict:
    parser = argparse.ArgumentParser(prog="relaypipe")
    cli_bench.add_parser(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "bench.json"
    args = parser.parse_args(
        [
            *("bench", "--student", str(student), "--teacher", str(teacher)),
            *("--problems", problems, "--batch-sizes", "2", "--router-ps", "0.5"),
            *("--n-prompts", "4", "--max-new-tokens", "12", "--repeats", "1", "--threads", "1"),
            *("--out", str(out), *flags),
        ]
    )
    assert cli_bench.run(args) == 0
    return json.loads(out.read_text())


def test_bench_call_bias_moves_the_calls_share(dirs, scripted, tmp_path, capsys):
    problems = str(dirs / "eval.parquet")
    student, teacher = dirs / "student", dirs / "teacher"
    never = run_bench(tmp_path, student, teacher, problems, "--call-bias=-inf")
    always = run_bench(tmp_path, student, teacher, problems, "--call-bias", "inf")
    assert never["config"]["call_bias"] == "-inf" and always["config"]["call_bias"] == "inf"
    assert always["config"]["call_bias_from"] == "--call-bias"
    (n_row,), (a_row,) = never["results"], always["results"]
    assert n_row["calls"]["call_ratio"] == 0.0 and n_row["calls"]["handoffs"] == 0
    assert a_row["calls"]["call_ratio"] > 0.3 and a_row["calls"]["handoffs"] > 0
    assert a_row["calls"]["call_bias"] == "inf"
    assert math.isfinite(a_row["calls"]["relay_over_floor"])
    # the router runs do not move with the bias
    assert n_row["relay"][0]["call_ratio"] == a_row["relay"][0]["call_ratio"]
    out = capsys.readouterr()
    assert "calls" in out.out and "call bias +inf (--call-bias)" in out.err
    # default: the student's call_bias.json
    calibrated = fresh_student(dirs, tmp_path)
    write_calibration_for(calibrated, bias=6.0)
    res = run_bench(tmp_path, calibrated, teacher, problems)
    assert res["config"]["call_bias"] == 6.0
    assert CALIBRATION_FILE in res["config"]["call_bias_from"]


# ------------------------------------------------------------------------------ evaluate + report

TRAINED = RelayBounds(max_call_tokens=8, max_teacher_tokens=None, max_calls=None, max_turns=16)


@pytest.fixture(scope="module")
def stage_dirs(dirs, tmp_path_factory):
    """evaluate's inputs: the four model folders (the relay one with relay.json), two
    benchmarks and held-out problems."""
    root = tmp_path_factory.mktemp("eval-inputs")
    for name in ("student", "warmup", "relay"):
        shutil.copytree(dirs / "student", root / name)
    write_relay_record(root / "relay", RelayRecord("grpo", PromptFormat(), TRAINED, 24))
    (root / "benchmarks").mkdir()
    for terms in (3, 4):
        write_problems(
            root / "benchmarks" / f"arith-d1t{terms}.parquet", 8, terms=terms, split="benchmark"
        )
    write_problems(root / "eval.parquet", 16)
    return root


def eval_params(dirs: Path, root: Path, out: Path, **kw) -> evaluate.EvaluateParams:
    return evaluate.EvaluateParams(
        modes=["student", "relay", "teacher"],
        max_new_tokens=24,
        temperature=1.0,  # sampled: the share moves smoothly with the bias
        batch_size=8,
        threads=1,
        device="cpu",
        benchmarks_dir=str(root / "benchmarks"),
        student=str(root / "student"),
        warmup=str(root / "warmup"),
        relay_model=str(root / "relay"),
        teacher=TeacherSpec(str(dirs / "teacher")),
        eval_problems=str(root / "eval.parquet"),
        out_dir=str(out / "eval"),
        **kw,
    )


def run_report(out: Path) -> tuple[dict, str]:
    """summary.json (the full report) and report.md; metrics.json is checked against them."""
    headline = report.run(
        report.ReportParams(
            requests=str(out / "eval" / "requests.parquet"),
            models=str(out / "eval" / "models.json"),
            stage_metrics=[],
            out_dir=str(out / "eval"),
        )
    )
    metrics = json.loads((out / "eval" / "summary.json").read_text())
    assert json.loads((out / "eval" / "metrics.json").read_text()) == headline
    calibration = metrics["calibration"]
    if calibration is None:
        assert "calibration" not in headline
    else:
        assert headline["calibration"] == {
            "target_share": calibration["target_share"],
            "realised_share": calibration["average"]["share"],
        }
        differences = [b["difference"] for b in calibration["benchmarks"].values()]
        assert calibration["max_difference"] == max(differences)
    return metrics, (out / "eval" / "report.md").read_text()


def test_evaluate_calibrates_records_and_the_report_sets_target_against_realised(
    dirs, stage_dirs, scripted, tmp_path
):
    target = evaluate.CalibrateParams(target_share=0.3, n_problems=12, tol=0.1)
    evaluate.run(eval_params(dirs, stage_dirs, tmp_path, calibrate=target))
    models = json.loads((tmp_path / "eval" / "models.json").read_text())
    decoding = models["decoding"]
    cal = decoding["calibration"]
    assert cal["target_share"] == 0.3 and cal["n_problems"] == 12 and cal["tol"] == 0.1
    assert cal["reached"] is True and abs(cal["share"] - 0.3) <= 0.1
    assert decoding["call_bias"] == cal["bias"] != 0
    assert decoding["call_bias_from"] == "evaluate.calibrate"
    assert len(cal["points"]) >= 2 and cal["points"][0]["bias"] == 0.0
    assert cal["config"]["mode"] == "relay" and cal["config"]["max_new_tokens"] == 24

    metrics, md = run_report(tmp_path)
    m = metrics["calibration"]
    assert m["target_share"] == 0.3 and m["bias"] == pytest.approx(cal["bias"], rel=1e-5)
    assert m["held_out"]["share"] == pytest.approx(cal["share"], abs=1e-6)
    for name in ("arith-d1t3", "arith-d1t4"):
        realised = metrics["benchmarks"][name]["relay"]["call_ratio"]
        assert m["benchmarks"][name]["share"] == pytest.approx(realised, abs=1e-6)
        assert m["benchmarks"][name]["difference"] == pytest.approx(abs(realised - 0.3), abs=1e-6)
    assert m["average"]["share"] == pytest.approx(metrics["modes"]["relay"]["call_ratio"])
    assert m["average"]["share"] > 0  # the calibrated relay did call on the benchmarks
    assert "Call bias calibrated to a teacher share of 30.00 % (± 10.00)" in md
    assert "on 12 held-out problems" in md and "(reached)" in md
    assert "| teacher share % (target 30.00) |" in md
    assert f"| {100 * m['average']['share']:.2f} |" in md
    assert "| abs(share − target), points |" in md


def test_evaluate_without_calibration_uses_call_bias_and_reports_no_calibration(
    dirs, stage_dirs, scripted, tmp_path
):
    evaluate.run(eval_params(dirs, stage_dirs, tmp_path / "never", call_bias=-math.inf))
    models = json.loads((tmp_path / "never" / "eval" / "models.json").read_text())
    assert models["decoding"]["call_bias"] == "-inf"
    assert models["decoding"]["call_bias_from"] == "evaluate.call_bias"
    assert models["decoding"]["calibration"] is None
    metrics, md = run_report(tmp_path / "never")
    assert metrics["calibration"] is None and metrics["call_bias"] == "-inf"
    assert metrics["modes"]["relay"]["call_ratio"] == 0.0
    assert "The relay mode decoded with call bias -inf (evaluate.call_bias)." in md
    evaluate.run(eval_params(dirs, stage_dirs, tmp_path / "always", call_bias=math.inf))
    metrics, _ = run_report(tmp_path / "always")
    assert metrics["modes"]["relay"]["call_ratio"] > 0.3
    # the default: 0, and nothing said about it
    evaluate.run(eval_params(dirs, stage_dirs, tmp_path / "plain"))
    metrics, md = run_report(tmp_path / "plain")
    assert metrics["call_bias"] == 0.0 and metrics["calibration"] is None
    assert "call bias" not in md.lower()


def test_evaluate_refuses_missing_held_out_problems_before_loading_models(
    dirs, stage_dirs, tmp_path
):
    params = eval_params(
        dirs,
        stage_dirs,
        tmp_path,
        calibrate=evaluate.CalibrateParams(target_share=0.1),
    )
    params = dataclasses.replace(params, eval_problems=str(tmp_path / "none.parquet"))
    with pytest.raises(MissingInputError, match=r"none\.parquet \(evaluate\.eval_problems\)"):
        evaluate.run(params)
    assert not (tmp_path / "eval").exists()
    # off: the table is not even read
    _, _, held_out = evaluate.read_inputs(
        dataclasses.replace(params, calibrate=evaluate.CalibrateParams())
    )
    assert held_out == evaluate.HeldOut()


def test_evaluate_calibrates_per_benchmark_on_each_calibration_set(
    dirs, stage_dirs, scripted, tmp_path
):
    """calibrate.per_benchmark: one bisection per benchmark, on that benchmark's calibration
    set; its relay rows decode with its own bias, and the report gives each bias, where it
    landed on its set and on the benchmark."""
    sets = tmp_path / "calibration"
    sets.mkdir()
    for terms in (3, 4):
        write_problems(sets / f"arith-d1t{terms}.parquet", 12, terms=terms, split="calibration")
    target = evaluate.CalibrateParams(target_share=0.3, n_problems=12, tol=0.1, per_benchmark=True)
    params = eval_params(dirs, stage_dirs, tmp_path, calibrate=target, calibration_dir=str(sets))
    # eval_problems is not read: calibration comes from the per-benchmark sets only
    params = dataclasses.replace(params, eval_problems=str(tmp_path / "none.parquet"))
    summary = evaluate.run(params)
    decoding = json.loads((tmp_path / "eval" / "models.json").read_text())["decoding"]
    assert decoding["calibration"] is None
    assert decoding["call_bias_from"] == "evaluate.calibrate.per_benchmark"
    each = decoding["calibration_by_benchmark"]
    assert sorted(each) == ["arith-d1t3", "arith-d1t4"]
    for name, cal in each.items():
        assert cal["n_problems"] == 12 and cal["target_share"] == 0.3
        assert cal["reached"] and abs(cal["share"] - 0.3) <= 0.1
        assert decoding["call_bias_by_benchmark"][name] == cal["bias"]
    assert summary["call_bias_by_benchmark"] == decoding["call_bias_by_benchmark"]
    # each benchmark's relay rows carry (and decoded with) that benchmark's bias
    rows = pd.read_parquet(tmp_path / "eval" / "requests.parquet")
    relay = rows[rows["mode"] == "relay"]
    for name, cal in each.items():
        biases = relay.loc[relay["benchmark"] == name, "call_bias"]
        assert len(biases) == 8 and biases.tolist() == pytest.approx([cal["bias"]] * 8, rel=1e-6)
    # two searches on two sets (the shares seen differ), not one result copied
    t3, t4 = ([pt["share"] for pt in each[n]["points"]] for n in ("arith-d1t3", "arith-d1t4"))
    assert t3 != t4
    assert set(rows.loc[rows["mode"] != "relay", "call_bias"]) == {0.0}

    metrics, md = run_report(tmp_path)
    m = metrics["calibration"]
    assert m["per_benchmark"] is True and m["bias"] is None and m["held_out"] is None
    assert m["reached"] is True
    for name, cal in each.items():
        entry = m["benchmarks"][name]
        assert entry["bias"] == pytest.approx(cal["bias"], rel=1e-5)
        assert entry["held_out"]["share"] == pytest.approx(cal["share"], abs=1e-6)
        realised = metrics["benchmarks"][name]["relay"]["call_ratio"]
        assert entry["share"] == pytest.approx(realised, abs=1e-6)
    assert "Call bias calibrated per benchmark to a teacher share of 30.00 % (± 10.00)" in md
    assert "| call bias |" in md and "| share on its calibration set % |" in md
    assert "| teacher share % (target 30.00) |" in md


def test_per_benchmark_calibration_without_a_calibration_set_says_which_and_how(
    dirs, stage_dirs, tmp_path
):
    target = evaluate.CalibrateParams(target_share=0.1, per_benchmark=True)
    params = eval_params(
        dirs, stage_dirs, tmp_path, calibrate=target, calibration_dir=str(tmp_path / "none")
    )
    with pytest.raises(MissingInputError, match=r"arith-d1t3\.parquet.*calibration_n"):
        evaluate.run(params)
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize(
    ("section", "words"),
    [
        ({"calibrate": {"target": 0.1}}, r"evaluate\.calibrate: unknown key\(s\) target"),
        ({"calibrate": {"target_share": 1.5}}, r"evaluate\.calibrate: target_share must be in"),
        ({"calibrate": {"target_share": "5%"}}, r"evaluate\.calibrate\.target_share: expected"),
        (
            {"calibrate": {"target_share": 0.1, "tol": 0}},
            r"evaluate\.calibrate: tol must be in \(0, 1\)",
        ),
        ({"calibrate": {"lo": 3.0, "hi": 1.0}}, r"evaluate\.calibrate: need finite lo < hi"),
        ({"calibrate": {"n_problems": 0}}, r"evaluate\.calibrate: n_problems must be >= 1"),
        ({"calibrate": 0.05}, r"evaluate\.calibrate: expected a mapping of CalibrateParams"),
        ({"call_bias": "high"}, r"evaluate\.call_bias: expected float"),
        ({"call_bias": True}, r"evaluate\.call_bias: expected float, got a boolean"),
        ({"call_bias": float("nan")}, r"evaluate: call_bias must be a number"),
        (
            {"call_bias": 2.0, "calibrate": {"target_share": 0.1}},
            r"evaluate: call_bias 2\.0 and calibrate\.target_share 0\.1 are both set",
        ),
        (
            {"modes": ["student"], "calibrate": {"target_share": 0.1}},
            r"evaluate: calibrate\.target_share calibrates the relay mode's call bias, but "
            "modes has no relay",
        ),
    ],
)
def test_the_calibrate_params_are_strict(section, words):
    with pytest.raises(ConfigError, match=rf"^params\.yaml:{words}"):
        build(evaluate.EvaluateParams, section, "params.yaml:evaluate")


def test_the_params_build_with_infinite_biases_and_off_by_default():
    params = build(evaluate.EvaluateParams, {}, "params.yaml:evaluate")
    assert params.call_bias == 0.0 and not params.calibrate.on
    assert params.eval_problems == "data/problems/eval.parquet"
    params = build(evaluate.EvaluateParams, {"call_bias": -math.inf}, "e")
    assert params.call_bias == -math.inf
    on = build(evaluate.EvaluateParams, {"calibrate": {"target_share": 0}}, "e")
    assert on.calibrate.on and on.calibrate.target_share == 0.0
