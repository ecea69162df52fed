"""One teacher spec and one bounds type in every stage's params, strict, the old flat keys refused
with where they moved; and ``relay.json``: grpo (and sft) record the bounds and prompt format a
model was trained with, and ``relaypipe decode``, ``relaypipe serve``, ``relaypipe bench`` and
the evaluate stage decode under them by default, flags and params overriding each part."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

import httpx
import pandas as pd
import pytest

from flows.stages import params_class
from relaypipe import cli, cli_bench
from relaypipe.bounds import (
    BOUND_NAMES,
    DECODER_DEFAULTS,
    RELAY_RECORD,
    PromptFormat,
    RelayBounds,
    RelayRecord,
    pick_bounds,
    pick_prompt,
    read_relay_record,
    write_relay_record,
)
from relaypipe.cli_serve import add_parser, build_app
from relaypipe.config import ConfigError, build
from relaypipe.models import load_tokenizer
from relaypipe.relay.decoder import RelayConfig
from relaypipe.relay.trace import Source
from relaypipe.serve import ServerThread
from relaypipe.stages import evaluate, grpo, sft
from relaypipe.stages.inputs import StageInputError
from relaypipe.tasks.base import CHAT_INSTRUCTION, PROMPT_TEMPLATE, format_prompt
from relaypipe.teacher import TeacherSpec
from tests.tiny_stage_inputs import QWEN3_STYLE_TEMPLATE, THINK_OFF, make_inputs

KWARGS = {"enable_thinking": False}
# the bounds the fixture trains under: all four differ from the decoder's defaults
TRAINED = RelayBounds(max_call_tokens=3, max_teacher_tokens=5, max_calls=2, max_turns=7)
QUESTION = "1+2"


# ----------------------------------------------------------------------- relaypipe/bounds.py


def test_the_decoder_defaults_are_relayconfigs_and_the_names_its_fields():
    config = RelayConfig()
    assert DECODER_DEFAULTS.relay_kwargs() == {name: getattr(config, name) for name in BOUND_NAMES}
    assert RelayConfig(**TRAINED.relay_kwargs()).max_turns == 7


@pytest.mark.parametrize(
    ("kw", "words"),
    [
        ({"max_call_tokens": 0}, "max_call_tokens must be >= 1"),
        ({"max_turns": 0}, "max_turns must be >= 1"),
        ({"max_teacher_tokens": -1}, "max_teacher_tokens must be >= 0 or null"),
        ({"max_calls": -2}, "max_calls must be >= 0 or null"),
    ],
)
def test_bounds_refuse_what_the_decoder_would(kw, words):
    with pytest.raises(ValueError, match=words):
        RelayBounds(**kw)


def test_flags_override_the_record_part_by_part():
    record = RelayRecord("grpo", PromptFormat(True, KWARGS), TRAINED, 40)
    assert pick_bounds(record, {}) == (TRAINED, RELAY_RECORD)
    bounds, source = pick_bounds(record, {"max_turns": 3, "max_teacher_tokens": "none"})
    assert bounds == dataclasses.replace(TRAINED, max_turns=3, max_teacher_tokens=None)
    assert source == "relay.json, overridden by --max-teacher-tokens, --max-turns"
    assert pick_bounds(None, {}) == (DECODER_DEFAULTS, "defaults")
    warm = RelayRecord("sft", PromptFormat(True, KWARGS))  # no bounds: the defaults
    assert pick_bounds(warm, {"max_calls": 1})[0] == dataclasses.replace(
        DECODER_DEFAULTS, max_calls=1
    )

    assert pick_prompt(record, None, None) == (record.prompt, RELAY_RECORD)
    plain, _ = pick_prompt(record, False, None)
    assert not plain.chat_template and plain.chat_template_kwargs == {}
    assert pick_prompt(record, True, None)[0].chat_template_kwargs == KWARGS  # kept
    other, _ = pick_prompt(record, None, {"x": 1})
    assert other.chat_template and other.chat_template_kwargs == {"x": 1}
    assert pick_prompt(None, None, None) == (PromptFormat(), "defaults")
    with pytest.raises(ValueError, match="need chat_template: true"):
        pick_prompt(None, None, KWARGS)


def test_the_record_reads_back_and_is_strict(tmp_path):
    assert read_relay_record(tmp_path) is None  # no file: a model no stage trained
    record = RelayRecord("grpo", PromptFormat(True, KWARGS), TRAINED, 40)
    path = write_relay_record(tmp_path, record)
    assert path == tmp_path / RELAY_RECORD and read_relay_record(tmp_path) == record
    data = json.loads(path.read_text())
    for change, words in (
        ({"extra": 1}, r"relay\.json: unknown key\(s\) extra"),
        ({"bounds": {**data["bounds"], "max_calls": "2"}}, r"relay\.json\.bounds\.max_calls: exp"),
        ({"stage": "evaluate"}, r"relay\.json: stage must be one of grpo, sft"),
        ({"version": 99}, r"version 99 is not this code's 1: re-run the stage"),
    ):
        path.write_text(json.dumps({**data, **change}))
        with pytest.raises(ConfigError, match=words):
            read_relay_record(tmp_path)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match=r"relay\.json: not readable JSON"):
        read_relay_record(tmp_path)


# ------------------------------------------------------------------------ the params' shape

PRETRAINED = {"kind": "pretrained", "student_source": "s"}
MOVED = [
    ("bootstrap", {**PRETRAINED, "teacher_url": "u"}, "teacher_url", "teacher_server.url"),
    ("bootstrap", {**PRETRAINED, "teacher_http": {}}, "teacher_http", "teacher_server.http"),
    ("filter", {"teacher_url": "http://x"}, "teacher_url", "teacher.server.url"),
    ("sft", {"teacher_model": "m"}, "teacher_model", "teacher.server.model"),
    ("grpo", {"teacher_http": {"timeout_s": 3}}, "teacher_http", "teacher.server.http"),
    ("grpo", {"relay": {"max_calls": 2}}, "relay", "bounds"),
    ("evaluate", {"teacher_params": 8}, "teacher_params", "teacher.server.params"),
    ("evaluate", {"relay": {"max_turns": 4}}, "relay", "bounds"),
]


@pytest.mark.parametrize(("stage", "section", "old", "new"), MOVED, ids=[m[2] for m in MOVED])
def test_an_old_flat_key_says_where_it_moved(stage, section, old, new):
    with pytest.raises(ConfigError) as info:
        build(params_class(stage), section, f"params.yaml:{stage}")
    assert str(info.value).startswith(f"params.yaml:{stage}.{old} moved to {stage}.{new}")


SERVER = {"url": "http://x:8000/v1", "model": "m"}
NESTED = [
    ("grpo", {"bounds": {"max_calls": "two"}}, r"grpo\.bounds\.max_calls: expected int"),
    ("grpo", {"bounds": {"max_call": 3}}, r"grpo\.bounds: unknown key\(s\) max_call; allowed"),
    ("grpo", {"bounds": {"max_turns": 0}}, r"grpo\.bounds: max_turns must be >= 1"),
    (
        "evaluate",
        {"bounds": {"max_teacher_tokens": True}},
        r"evaluate\.bounds\.max_teacher_tokens: expected int, got a boolean",
    ),
    ("evaluate", {"bounds": [8]}, r"evaluate\.bounds: expected a mapping of RelayBounds"),
    ("filter", {"teacher": {"paths": "x"}}, r"filter\.teacher: unknown key\(s\) paths; allowed"),
    (
        "filter",
        {"teacher": "data/models/teacher"},
        r"filter\.teacher: expected a mapping.*moved to filter\.teacher\.path",
    ),
    (
        "sft",
        {"teacher": {"server": {**SERVER, "http": {"timeout": 1}}}},
        r"sft\.teacher\.server\.http: unknown key\(s\) timeout",
    ),
    ("grpo", {"teacher": {"server": {**SERVER, "url": 5}}}, r"grpo\.teacher\.server\.url: exp"),
    ("grpo", {"teacher": {"server": {"url": "u"}}}, r"grpo\.teacher\.server: missing required"),
    (
        "evaluate",
        {"teacher": {"server": {**SERVER, "params": "big"}}},
        r"evaluate\.teacher\.server\.params: expected int",
    ),
    ("evaluate", {"teacher": {"server": SERVER}}, r"evaluate: teacher\.server needs params"),
    (
        "bootstrap",
        {**PRETRAINED, "teacher_server": {**SERVER, "extra": 1}},
        r"bootstrap\.teacher_server: unknown key\(s\) extra",
    ),
]


@pytest.mark.parametrize(("stage", "section", "words"), NESTED)
def test_the_nested_sections_are_strict(stage, section, words):
    with pytest.raises(ConfigError, match=rf"^params\.yaml:{words}"):
        build(params_class(stage), section, f"params.yaml:{stage}")


def test_the_nested_sections_build():
    section = {"teacher": {"path": "t", "server": {**SERVER, "params": 9}}, "bounds": None}
    params = build(evaluate.EvaluateParams, section, "params.yaml:evaluate")
    assert params.teacher.path == "t" and params.teacher.server.params == 9
    assert params.teacher.remote and params.bounds is None
    bounds = {"max_call_tokens": 3, "max_teacher_tokens": 5, "max_calls": 2, "max_turns": 7}
    assert build(grpo.GRPOParams, {"bounds": bounds}, "g").bounds == TRAINED
    assert build(sft.SFTParams, {}, "s").teacher == TeacherSpec()  # in-process by default


# --------------------------------------------------- what grpo and sft record, who reads it


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """sft, then grpo from its model, on tiny inputs whose tokenizer has a Qwen3-style chat
    template (thinking off), grpo under TRAINED. The root folder and the inputs."""
    root = tmp_path_factory.mktemp("record")
    i = make_inputs(root / "in", chat_template=QWEN3_STYLE_TEMPLATE)
    common = {
        "chat_template": True,
        "chat_template_kwargs": KWARGS,
        "device": "cpu",
        "threads": 1,
        "allow_degenerate": True,
        "eval_n": 1,
        "eval_batch_size": 2,
        "max_new_tokens": 6,
        "teacher": TeacherSpec(i["teacher"]),
        "eval_problems": i["eval"],
    }
    sft.run(
        sft.SFTParams(
            trainer={"max_steps": 1, "per_device_train_batch_size": 2, "save_strategy": "no"},
            data=i["warmup"],
            student=i["student"],
            checkpoint_dir=str(root / "ckpt-sft"),
            out_model=str(root / "warmup"),
            out_dir=str(root / "sft"),
            **common,
        )
    )
    params = grpo.GRPOParams(
        trainer={
            "max_steps": 1,
            "per_device_train_batch_size": 2,
            "num_generations": 2,
            "save_strategy": "no",
        },
        bounds=TRAINED,
        problems=i["kept"],
        student=str(root / "warmup"),
        bootstrap_metrics=i["bootstrap_metrics"],
        checkpoint_dir=str(root / "ckpt-grpo"),
        out_model=str(root / "relay"),
        out_dir=str(root / "grpo"),
        **common,
    )
    grpo.run(params)
    return root, i, params


def test_grpo_and_sft_publish_the_record_with_their_models(trained):
    root, _, _ = trained
    record = json.loads((root / "relay" / RELAY_RECORD).read_text())
    assert record == {
        "stage": "grpo",
        "bounds": TRAINED.relay_kwargs(),
        "prompt": {
            "chat_template": True,
            "chat_template_kwargs": KWARGS,
            "template": PROMPT_TEMPLATE,
            "chat_instruction": CHAT_INSTRUCTION,
        },
        "max_new_tokens": 6,
        "version": 1,
    }
    warm = read_relay_record(root / "warmup")
    assert warm is not None and warm.stage == "sft" and warm.bounds is None
    assert warm.prompt == PromptFormat(True, KWARGS)
    # published with the weights, from the staged folder: nothing left beside them
    assert (root / "relay" / "model.safetensors").is_file()
    assert not [p for p in root.iterdir() if p.name.startswith(".")]


def test_grpo_warns_when_its_prompt_is_not_the_warmed_up_models(trained, caplog):
    _, _, params = trained
    caplog.set_level(logging.WARNING, logger="relaypipe.stages.grpo")
    grpo.read_inputs(params)  # the same format: quiet
    assert "warmed up with prompts" not in caplog.text
    grpo.read_inputs(dataclasses.replace(params, chat_template=False, chat_template_kwargs={}))
    assert "warmed up with prompts framed as the tokenizer's chat template" in caplog.text


def _framed(tok, chat: bool) -> list[int]:
    kwargs = KWARGS if chat else {}
    text = format_prompt(QUESTION, tok, chat_template=chat, chat_template_kwargs=kwargs)
    return tok(text, add_special_tokens=False).input_ids


def _decode(capsys, student, teacher, *flags: str) -> tuple[dict, str]:
    argv = ["decode", "--student", str(student), "--teacher", teacher, "--prompt", QUESTION]
    argv += ["--mode", "teacher", "--max-new-tokens", "20", "--device", "cpu", "--json"]
    assert cli.main([*argv, *flags]) == 0
    out = capsys.readouterr()
    return json.loads(out.out), out.err


def test_decode_defaults_to_the_recorded_bounds_and_prompt(trained, capsys):
    root, i, _ = trained
    relay = root / "relay"
    tok = load_tokenizer(str(relay))
    trace, err = _decode(capsys, relay, i["teacher"])
    assert trace["prompt_ids"] == _framed(tok, chat=True)
    assert tok.decode(trace["prompt_ids"]).endswith(THINK_OFF)
    # teacher mode under the recorded budget of 5 teacher tokens
    assert trace["sources"].count(Source.TEACHER) == 5
    assert trace["stop_reason"] == "max_teacher_tokens"
    assert "max_teacher_tokens 5" in err and "(recorded)" in err and str(relay) in err
    # each flag overrides its part
    trace, err = _decode(
        capsys, relay, i["teacher"], "--max-teacher-tokens", "2", "--no-chat-template"
    )
    assert trace["prompt_ids"] == _framed(tok, chat=False)
    assert trace["sources"].count(Source.TEACHER) == 2
    assert "overridden by --max-teacher-tokens" in err
    trace, _ = _decode(capsys, relay, i["teacher"], "--max-teacher-tokens", "none")
    assert trace["sources"].count(Source.TEACHER) > 5


def test_decode_of_a_warmed_up_or_unrecorded_student(trained, capsys):
    root, i, _ = trained
    tok = load_tokenizer(str(root / "warmup"))
    # sft's record: its prompt format, and the decoder's default bounds (no budget)
    trace, err = _decode(capsys, root / "warmup", i["teacher"])
    assert trace["prompt_ids"] == _framed(tok, chat=True)
    assert trace["sources"].count(Source.TEACHER) > 5
    assert "(defaults)" in err
    # no relay.json: the plain prompt, the defaults, and nothing said
    trace, err = _decode(capsys, i["student"], i["teacher"])
    assert trace["prompt_ids"] == _framed(tok, chat=False)
    assert "relaypipe decode:" not in err


def _serve(*argv: str) -> ServerThread:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--device", "cpu", "--api-key-env", "", *argv])
    return ServerThread(build_app(args))


def _complete(srv: ServerThread, **relay: object) -> httpx.Response:
    body = {"prompt": QUESTION, "max_tokens": 20, "temperature": 0, "relay": relay}
    return httpx.post(f"{srv.url}/v1/completions", json=body, timeout=60)


def test_serve_caps_and_frames_as_recorded_and_flags_override(trained):
    root, i, _ = trained
    tok = load_tokenizer(str(root / "relay"))
    base = ["--student", str(root / "relay"), "--teacher", i["teacher"]]
    with _serve(*base) as srv:
        (card,) = httpx.get(f"{srv.url}/v1/models").json()["data"]
        assert card["relay"]["bounds"] == TRAINED.relay_kwargs()
        assert card["relay"]["bounds_from"] == "recorded"
        assert card["relay"]["frame_prompts"] is True
        assert card["relay"]["chat_template_kwargs"] == KWARGS
        r = _complete(srv, mode="teacher")
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == len(_framed(tok, chat=True))
        assert r.json()["choices"][0]["relay"]["teacher_tokens"] == 5  # the recorded cap
        r = _complete(srv, mode="teacher", max_teacher_tokens=6)
        assert r.status_code == 400 and "over this server's cap of 5" in r.text
    flags = ["--max-teacher-tokens", "none", "--max-turns", "3", "--no-frame-prompts"]
    with _serve(*base, *flags) as srv:
        (card,) = httpx.get(f"{srv.url}/v1/models").json()["data"]
        want = dataclasses.replace(TRAINED, max_teacher_tokens=None, max_turns=3)
        assert card["relay"]["bounds"] == want.relay_kwargs()
        assert card["relay"]["frame_prompts"] is False
        r = _complete(srv, mode="teacher", max_teacher_tokens=6)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == len(QUESTION)  # as sent
        assert r.json()["choices"][0]["relay"]["teacher_tokens"] == 6


def test_serve_model_mode_cards_carry_no_relay_field(trained):
    _, i, _ = trained
    with _serve("--model", i["teacher"], "--name", "teacher") as srv:
        (card,) = httpx.get(f"{srv.url}/v1/models").json()["data"]
        assert "relay" not in card


def _bench(tmp_path: Path, student: Path, teacher: str, problems: str, *flags: str) -> dict:
    parser = argparse.ArgumentParser(prog="relaypipe")
    cli_bench.add_parser(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "bench.json"
    args = parser.parse_args(
        [
            *("bench", "--student", str(student), "--teacher", teacher, "--problems", problems),
            *("--batch-sizes", "1", "--router-ps", "0.5", "--n-prompts", "1"),
            *("--max-new-tokens", "3", "--repeats", "1", "--threads", "1", "--out", str(out)),
            *flags,
        ]
    )
    assert cli_bench.run(args) == 0
    return json.loads(out.read_text())["config"]


def test_bench_decodes_under_the_record_unless_told(trained, tmp_path, capsys):
    root, i, _ = trained
    config = _bench(tmp_path, root / "relay", i["teacher"], i["eval"])
    assert config["bounds"] == TRAINED.relay_kwargs()
    assert config["chat_template"] is True and config["chat_template_kwargs"] == KWARGS
    assert config["decoding_from"] == {"bounds": "recorded", "prompt": "recorded"}
    assert "relaypipe bench: bounds max_call_tokens 3" in capsys.readouterr().err
    config = _bench(
        tmp_path, root / "relay", i["teacher"], i["eval"], "--max-turns", "3", "--no-chat-template"
    )
    assert config["bounds"] == dataclasses.replace(TRAINED, max_turns=3).relay_kwargs()
    assert config["chat_template"] is False and config["chat_template_kwargs"] == {}
    assert config["decoding_from"]["bounds"] == "recorded, overridden by --max-turns"


def _evaluate(root: Path, i: dict[str, str], out: Path, **kw) -> evaluate.EvaluateParams:
    return evaluate.EvaluateParams(
        modes=["relay", "teacher"],
        limit=1,
        max_new_tokens=12,
        batch_size=2,
        device="cpu",
        threads=1,
        benchmarks_dir=i["benchmarks"],
        student=i["student"],
        warmup=str(root / "warmup"),
        relay_model=str(root / "relay"),
        teacher=TeacherSpec(i["teacher"]),
        out_dir=str(out),
        **kw,
    )


def test_evaluate_null_means_the_relay_models_record(trained, tmp_path, caplog):
    root, i, _ = trained
    evaluate.run(_evaluate(root, i, tmp_path / "eval"))
    models = json.loads((tmp_path / "eval" / "models.json").read_text())
    path = str(root / "relay" / RELAY_RECORD)
    assert models["decoding"] == {
        "bounds": TRAINED.relay_kwargs(),
        "bounds_from": path,
        "chat_template": True,
        "chat_template_kwargs": KWARGS,
        "prompt_from": path,
        "trained_bounds": TRAINED.relay_kwargs(),
        "call_bias": 0.0,  # evaluate.call_bias's default; no calibration
        "call_bias_from": "evaluate.call_bias",
        "calibration": None,
        "calibration_by_benchmark": None,
        "call_bias_by_benchmark": None,
    }
    rows = pd.read_parquet(tmp_path / "eval" / "requests.parquet")
    # the recorded budget binds the relay; the teacher alone, a baseline, is not cut off by it
    assert (rows[rows["mode"] == "relay"].teacher_tokens <= 5).all()
    assert (rows[rows["mode"] == "teacher"].teacher_tokens > 5).all()
    # explicit params override, and the difference from the record is logged
    caplog.set_level(logging.WARNING, logger="relaypipe.stages.evaluate")
    other = RelayBounds(max_teacher_tokens=1)
    evaluate.run(_evaluate(root, i, tmp_path / "own", bounds=other, chat_template=False))
    models = json.loads((tmp_path / "own" / "models.json").read_text())
    assert models["decoding"]["bounds"] == other.relay_kwargs()
    assert models["decoding"]["bounds_from"] == "evaluate.bounds"
    assert models["decoding"]["trained_bounds"] == TRAINED.relay_kwargs()
    assert models["decoding"]["prompt_from"] == "evaluate.chat_template"
    assert "not those" in caplog.text and "not as" in caplog.text
    rows = pd.read_parquet(tmp_path / "own" / "requests.parquet")
    assert (rows[rows["mode"] == "relay"].teacher_tokens <= 1).all()


def test_evaluate_null_without_a_record_fails_before_decoding(trained, tmp_path):
    root, i, _ = trained
    params = dataclasses.replace(_evaluate(root, i, tmp_path / "eval"), relay_model=i["student"])
    with pytest.raises(StageInputError, match=r"evaluate\.bounds and evaluate\.chat_template null"):
        evaluate.run(params)
    assert not (tmp_path / "eval").exists()
    # an explicit prompt format still needs bounds from somewhere
    with pytest.raises(StageInputError, match=r"^evaluate\.bounds null: .*no such file"):
        evaluate.run(dataclasses.replace(params, chat_template=False))
