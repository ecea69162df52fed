"""A student behind a URL (relaypipe/student.py, HTTPBackend in the student role).

Two real ``relaypipe serve --model`` processes on loopback, one serving a tiny student that
was taught to call (a few hundred milliseconds of training: it writes ``<call>2</call>``), one
the teacher. The relay through both servers must equal the relay with the same weights
in-process, token for token and event for event; the command line, the relay server (a
stateless proxy when both are remote) and the evaluate stage take a served student; and a
student server that is down, fails or answers garbage is retried and then reported as the
student's failure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pandas as pd
import pytest
import torch

from relaypipe import cli
from relaypipe.bounds import RelayBounds
from relaypipe.cli_serve import add_parser, build_app
from relaypipe.io import read_table
from relaypipe.micro.models import ModelSize, build_model
from relaypipe.models import load_model
from relaypipe.relay.backends import GenRequest
from relaypipe.relay.decoder import RelayConfig, RelayDecoder
from relaypipe.relay.http_backend import HTTPBackend, TeacherUnavailable
from relaypipe.relay.trace import StopReason
from relaypipe.relay.transformers_backend import TransformersBackend
from relaypipe.schemas import EvalRequestSchema
from relaypipe.serve import RelayEngine, ServerThread, make_app
from relaypipe.stages import evaluate
from relaypipe.student import StudentServer, build_student, student_http
from relaypipe.teacher import TeacherServer, TeacherSpec
from tests.test_evaluate import write_benchmarks
from tests.test_http_backend import FaultServer

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["Q: 1+2\nA: ", "Q: 33+4+5\nA: ", "Q: 5\nA: ", "Q: 12+1\nA: "]


# ---------------------------------------------------------------------------- the models
def calling_student(tokenizer) -> torch.nn.Module:
    """A tiny student that answers with ``<call>2</call>`` and two more characters, three
    times (trained for 150 small steps: deterministic, well under a second)."""
    rng = random.Random(0)
    torch.manual_seed(0)
    model = build_model(ModelSize(32, 1, 2, 64), tokenizer, seed=1)

    def example() -> list[int]:
        calls = "".join("<call>2</call>" + "".join(rng.choices("0123456789+=", k=2)) for _ in "abc")
        text = f"Q: {rng.randint(1, 99)}+{rng.randint(1, 9)}\nA: {calls}"
        return [*tokenizer(text, add_special_tokens=False).input_ids, tokenizer.eos_token_id]

    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(150):
        batch = [example() for _ in range(16)]
        n = max(map(len, batch))
        ids = torch.tensor([b + [tokenizer.pad_token_id] * (n - len(b)) for b in batch])
        labels = ids.masked_fill(ids == tokenizer.pad_token_id, -100)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tiny_models, tokenizer):
    root = tmp_path_factory.mktemp("student-url")
    for name, model in (("student", calling_student(tokenizer)), ("teacher", tiny_models[1])):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def servers(model_dirs):
    """``relaypipe serve --model`` for the student and the teacher: two processes."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    procs, urls = [], {}
    for name in ("student", "teacher"):
        port = free_port()
        cmd = [sys.executable, "-m", "relaypipe.cli", "serve", "--model", str(model_dirs / name)]
        cmd += ["--name", name, "--port", str(port), "--device", "cpu", "--api-key-env", ""]
        log = open(model_dirs / f"{name}-server.log", "w")  # noqa: SIM115 (closed below)
        procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=log), log))
        urls[name] = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        for name, url in urls.items():
            while True:
                try:
                    httpx.get(f"{url}/health", timeout=1).raise_for_status()
                    break
                except httpx.HTTPError:
                    if time.monotonic() > deadline:
                        text = (model_dirs / f"{name}-server.log").read_text()
                        raise RuntimeError(f"{name} server did not start:\n{text}") from None
                    time.sleep(0.2)
        yield urls
    finally:
        for proc, log in procs:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()


@pytest.fixture(scope="module")
def local(model_dirs):
    student, tok = load_model(str(model_dirs / "student"), device="cpu")
    teacher, _ = load_model(str(model_dirs / "teacher"), device="cpu")
    return RelayDecoder(TransformersBackend(student), TransformersBackend(teacher), tok), tok


def http_pair(servers, tok) -> tuple[HTTPBackend, HTTPBackend]:
    student = HTTPBackend(servers["student"], "student", tok, timeout_s=30, role="student")
    teacher = HTTPBackend(servers["teacher"], "teacher", tok, timeout_s=30)
    return student, teacher


def same(trace) -> dict:
    """A trace without its wall times and prefill counts; everything else must be equal. (A
    server's prefix cache outlives a decode, like vLLM's: a prompt seen in an earlier test
    prefills less than in-process, where every decode starts cold.)"""
    row = dataclasses.asdict(trace)
    row.pop("seconds")
    row.pop("student_prefill_tokens")
    for h in row["handoffs"]:
        h.pop("seconds")
        h.pop("prefill_tokens")
    return row


# ---------------------------------------------------------------------------- equality
CONFIGS = {
    "relay": RelayConfig(max_new_tokens=24),
    "relay, budgets": RelayConfig(max_new_tokens=24, max_calls=2, max_call_tokens=1),
    "student": RelayConfig(mode="student", max_new_tokens=16),
    "teacher": RelayConfig(mode="teacher", max_new_tokens=12),
    "relay, call bias 3": RelayConfig(max_new_tokens=24, call_bias=3.0),
    "relay, call bias -inf": RelayConfig(max_new_tokens=20, call_bias=-math.inf),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_both_over_http_decode_exactly_as_in_process(servers, local, name):
    decoder, tok = local
    cfg = CONFIGS[name]
    want = decoder.decode_text(PROMPTS, cfg)
    student, teacher = http_pair(servers, tok)
    with student, teacher:
        got = RelayDecoder(student, teacher, tok).decode_text(PROMPTS, cfg)
    assert [same(t) for t in got] == [same(t) for t in want]
    calls = sum(t.calls for t in want)
    if cfg.mode == "relay" and cfg.call_bias != -math.inf:
        assert calls > 0 and sum(t.n_teacher for t in want) > 0  # the student really called
    if cfg.call_bias == -math.inf:
        assert calls == 0  # sent as -100: still never a call
    if cfg.mode == "teacher":
        assert all(t.n_student == 0 and t.n_teacher > 0 for t in got)


def test_one_request_calls_from_many_threads_are_answered_right(servers, local):
    """The continuous scheduler's way: generate([one request]) from several threads at once."""
    _, tok = local
    close = tok.convert_tokens_to_ids("</call>")
    reqs = [
        GenRequest((9, i), tok(p, add_special_tokens=False).input_ids, 10)
        for i, p in enumerate(PROMPTS * 3)
    ]
    student, _ = http_pair(servers, tok)
    with student:
        one = [student.generate([r], stop_token_ids=frozenset({close}))[0] for r in reqs]
        with ThreadPoolExecutor(6) as pool:
            many = list(
                pool.map(
                    lambda r: student.generate([r], stop_token_ids=frozenset({close}))[0], reqs
                )
            )
    assert [(r.tokens, r.finish) for r in many] == [(r.tokens, r.finish) for r in one]
    assert {r.finish for r in one} == {"stop"} and all(r.tokens[-1] == close for r in one)


# ---------------------------------------------------------------------------- command line
def decode_json(capsys, *args: str) -> list[dict]:
    common = ["--prompt", "1+2", "--prompt", "33+4", "--max-new-tokens", "20", "--device", "cpu"]
    assert cli.main(["decode", *args, *common, "--json"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_decode_command_with_both_urls(servers, model_dirs, capsys):
    urls = ["--student-url", servers["student"], "--student-model", "student"]
    urls += ["--student-tokenizer", str(model_dirs / "student")]
    urls += ["--teacher-url", servers["teacher"], "--teacher-model", "teacher"]
    got = decode_json(capsys, *urls)
    dirs = ["--student", str(model_dirs / "student"), "--teacher", str(model_dirs / "teacher")]
    want = decode_json(capsys, *dirs)
    assert [(r["token_ids"], r["sources"], r["text"]) for r in got] == [
        (r["token_ids"], r["sources"], r["text"]) for r in want
    ]
    assert sum(r["handoffs"] != [] for r in got) == 2


def test_decode_command_with_a_dead_student_server_says_so(model_dirs, capsys):
    with socket.socket() as sock:  # bound, never listening: connections are refused
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        args = ["decode", "--student-url", url, "--student-model", "s", "--prompt", "1"]
        args += ["--student-tokenizer", str(model_dirs / "student")]
        args += ["--teacher", str(model_dirs / "teacher"), "--device", "cpu"]
        assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "relaypipe decode: error: student server: cannot list models" in err and url in err


def run_cli(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.main(list(args))
    assert exc.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--student-url", "http://h"], "--student-url needs --student-model"),
        (["--student", "d", "--student-model", "m"], "--student-model is only used with"),
        (["--student-url", "http://h", "--student-model", "m"], "needs --student-tokenizer DIR"),
        (["--student", "d", "--student-url", "http://h"], "not allowed with argument --student"),
        (["--student", "d", "--student-tokenizer", "t"], "only used with --student-url"),
    ],
)
def test_decode_student_flags_that_do_not_fit(capsys, args, words):
    assert words in run_cli(capsys, "decode", *args, "--teacher", "t", "--prompt", "1")


def test_a_tokenizer_without_the_call_tokens_is_refused(tmp_path, capsys):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(WordLevel({"a": 0, "<unk>": 1, "</s>": 2}, unk_token="<unk>"))
    raw.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"no <call>/</call> token: a served student writes"):
        build_student(str(tmp_path), url="http://127.0.0.1:9", model_name="s")
    args = ["decode", "--student-url", "http://127.0.0.1:9", "--student-model", "s"]
    args += ["--student-tokenizer", str(tmp_path), "--teacher", "t", "--prompt", "1"]
    assert "--student-tokenizer" in run_cli(capsys, *args)


def test_serve_model_mode_refuses_student_url_options(capsys):
    err = run_cli(capsys, "serve", "--model", "m", "--student-model", "s")
    assert "--student-model/--student-tokenizer belong to relay mode" in err


# ---------------------------------------------------------------------------- relay server
def serve_args(*args: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve", *args, "--device", "cpu", "--api-key-env", ""])


def test_relay_server_over_two_urls_is_a_stateless_proxy(servers, model_dirs, local):
    decoder, tok = local
    args = serve_args(
        *("--student-url", servers["student"], "--student-model", "student"),
        *("--student-tokenizer", str(model_dirs / "student")),
        *("--teacher-url", servers["teacher"], "--teacher-model", "teacher"),
    )
    prompt = tok(PROMPTS[1], add_special_tokens=False).input_ids
    (want,) = decoder.decode([prompt], RelayConfig(max_new_tokens=20))
    with ServerThread(build_app(args)) as srv:
        engine = srv.app.state.api.engine
        assert engine.decoder.student.role == "student"  # no model was loaded
        body = {"prompt": prompt, "max_tokens": 20, "temperature": 0}
        r = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    (choice,) = r.json()["choices"]
    assert choice["token_ids"] == want.token_ids and choice["relay"]["calls"] == want.calls > 0


# ---------------------------------------------------------------------------- faults
FAST = {"timeout_s": 2.0, "backoff_s": 0.01, "max_retries": 2}


@pytest.fixture
def fault(tokenizer):
    srv = FaultServer(tokenizer)
    yield srv
    srv.close()


def relay_with_faulty_student(fault, tokenizer, tiny_models) -> RelayDecoder:
    student = HTTPBackend(fault.url, "s", tokenizer, role="student", **FAST)
    return RelayDecoder(student, TransformersBackend(tiny_models[1]), tokenizer)


@pytest.mark.parametrize(
    ("script", "words"),
    [(["500"] * 3, "HTTP 500"), (["malformed"] * 3, "malformed JSON"), (["close"] * 3, "Error")],
)
def test_a_failing_student_server_is_retried_then_named(
    fault, tokenizer, tiny_models, script, words
):
    fault.script["a"].extend(script)
    dec = relay_with_faulty_student(fault, tokenizer, tiny_models)
    with pytest.raises(TeacherUnavailable, match=r"^student server 's' at .*3 attempt") as exc:
        dec.decode_text(["a Q"], RelayConfig(max_new_tokens=6))
    assert exc.value.role == "student" and words in exc.value.last_error
    assert fault.counts()["a"] == 3
    dec.student.close()


def test_a_student_server_that_recovers_loses_nothing(fault, tokenizer, tiny_models):
    fault.script["a"].extend(["500", "malformed"])
    dec = relay_with_faulty_student(fault, tokenizer, tiny_models)
    (trace,) = dec.decode_text(["a Q"], RelayConfig(max_new_tokens=6))
    dec.student.close()
    assert tokenizer.decode(trace.token_ids) == "tttttt" and fault.counts()["a"] == 3
    assert trace.stop_reason == StopReason.MAX_NEW_TOKENS


def test_relay_server_answers_502_naming_the_student(fault, tokenizer, tiny_models):
    fault.script["a"].extend(["503"] * 3)
    dec = relay_with_faulty_student(fault, tokenizer, tiny_models)
    with ServerThread(make_app(RelayEngine(dec, "relay"))) as srv:
        r = httpx.post(f"{srv.url}/v1/completions", json={"prompt": "a Q", "max_tokens": 4})
    assert r.status_code == 502
    assert r.json()["error"]["message"].startswith("student unavailable: student server 's'")
    dec.student.close()


# ---------------------------------------------------------------------------- evaluate
def eval_params(tmp_path, model_dirs, **kw) -> evaluate.EvaluateParams:
    return evaluate.EvaluateParams(
        modes=["relay", "teacher_free"],
        max_new_tokens=16,
        batch_size=2,
        threads=1,
        device="cpu",
        benchmarks_dir=str(tmp_path / "benchmarks"),
        relay_model=str(model_dirs / "student"),
        teacher=TeacherSpec(str(model_dirs / "teacher")),
        bounds=RelayBounds(max_call_tokens=4, max_teacher_tokens=8, max_calls=3, max_turns=8),
        chat_template=False,
        out_dir=str(tmp_path / "local"),
        **kw,
    )


def test_evaluate_with_a_served_student_equals_in_process(tmp_path, model_dirs, servers):
    (tmp_path / "benchmarks").mkdir()
    write_benchmarks(tmp_path / "benchmarks", n=2)
    local = eval_params(tmp_path, model_dirs)
    evaluate.run(local)
    served = dataclasses.replace(
        local,
        student_servers=evaluate.StudentServers(
            relay=StudentServer(servers["student"], "student", student_http(), params=777)
        ),
        teacher=TeacherSpec(
            local.teacher.path, TeacherServer(servers["teacher"], "teacher", params=9)
        ),
        out_dir=str(tmp_path / "served"),
    )
    evaluate.run(served)
    keys = ["benchmark", "mode", "problem_id"]
    cols = ["correct", "student_tokens", "teacher_tokens", "command_tokens", "calls"]
    want, got = (
        read_table(tmp_path / d / "requests.parquet", EvalRequestSchema)
        .sort_values(keys)[keys + cols]
        .reset_index(drop=True)
        for d in ("local", "served")
    )
    pd.testing.assert_frame_equal(got, want)
    assert got[got["mode"] == "relay"].calls.sum() > 0
    models = json.loads((tmp_path / "served" / "models.json").read_text())
    assert models["students"]["relay"] == {
        "path": f"student at {servers['student']}",
        "params": 777,
    }


@pytest.mark.parametrize(
    ("server", "words"),
    [
        ({"url": "http://x", "model": "m"}, r"evaluate\.student_servers: relay needs params"),
        (
            {"url": "u", "model": "m", "params": 5, "http": {"on_failure": "skip"}},
            "on_failure must be fail for a student",
        ),
        (
            {"url": "u", "model": "m", "params": 5, "http": {"prompt_format": "text"}},
            "prompt_format must be tokens for a student",
        ),
    ],
)
def test_served_student_options_are_checked(server, words):
    from relaypipe.config import ConfigError, build

    with pytest.raises(ConfigError, match=words):
        build(
            evaluate.EvaluateParams, {"student_servers": {"relay": server}}, "params.yaml:evaluate"
        )
