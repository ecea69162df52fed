"""relaypipe.teacher.build_teacher: one factory for in-process weights and a served teacher.

The served teacher is a real ``relaypipe serve --model <dir>`` (the CLI's own app) on a
loopback port; the relay through it must equal the relay with the same weights in-process.
"""

from __future__ import annotations

import argparse
import socket

import pytest

from relaypipe.cli_serve import add_parser, build_app
from relaypipe.micro.models import ModelSize, build_model
from relaypipe.micro.tokenizer import build_char_tokenizer
from relaypipe.models import load_model
from relaypipe.relay.decoder import RelayConfig, RelayDecoder
from relaypipe.relay.http_backend import HTTPBackend, TeacherUnavailable
from relaypipe.relay.trace import Source
from relaypipe.relay.transformers_backend import TransformersBackend
from relaypipe.serve import ServerThread
from relaypipe.teacher import (
    REMOTE_TEACHER_RECORD,
    HTTPOptions,
    build_teacher,
    validate_teacher_options,
    write_remote_teacher_dir,
)

PROMPTS = ["Q: 1+2\nA: ", "Q: 33+4+5\nA: ", "Q: 5\nA: ", "Q: 12+1\nA: "]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tiny_models, tokenizer):
    root = tmp_path_factory.mktemp("teacher-models")
    for name, model in zip(("student", "teacher"), tiny_models, strict=True):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root


def serve(path, name="teacher", *extra):
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "serve",
            "--model",
            str(path),
            "--name",
            name,
            "--device",
            "cpu",
            "--api-key-env",
            "",
            *extra,
        ]
    )
    return ServerThread(build_app(args))


@pytest.fixture(scope="module")
def server(model_dirs):
    with serve(model_dirs / "teacher") as srv:
        yield srv


def decode_with(teacher, model_dirs, cfg):
    student, tok = load_model(str(model_dirs / "student"), device="cpu")
    decoder = RelayDecoder(TransformersBackend(student), teacher.backend, tok)
    return decoder.decode_text(PROMPTS, cfg)


@pytest.mark.parametrize("prompt_format", ["tokens", "text"])
def test_served_teacher_relays_exactly_like_the_in_process_one(model_dirs, server, prompt_format):
    cfg = RelayConfig(mode="random_router", router_p=0.3, max_new_tokens=24, seed=3)
    _, tok = load_model(str(model_dirs / "student"), device="cpu")
    with build_teacher(str(model_dirs / "teacher"), tok, device="cpu") as local:
        assert not local.remote and local.model is not None
        want = decode_with(local, model_dirs, cfg)
    http = HTTPOptions(prompt_format=prompt_format, timeout_s=30)
    with build_teacher(None, tok, url=server.url, model_name="teacher", http=http) as remote:
        assert remote.remote and isinstance(remote.backend, HTTPBackend)
        assert remote.where == f"teacher at {server.url}"
        got = decode_with(remote, model_dirs, cfg)
    assert sum(len(t.handoffs) for t in want) > 4  # the teacher really took turns
    for w, g in zip(want, got, strict=True):
        assert g.token_ids == w.token_ids and g.sources == w.sources and not g.events


def test_url_teacher_reads_its_tokenizer_from_a_remote_teacher_dir(model_dirs, server, tmp_path):
    _, tok = load_model(str(model_dirs / "teacher"), device="cpu")
    write_remote_teacher_dir(tmp_path / "teacher", tok, server.url, "teacher")
    assert (tmp_path / "teacher" / REMOTE_TEACHER_RECORD).is_file()
    with build_teacher(str(tmp_path / "teacher"), url=server.url, model_name="teacher") as t:
        assert t.tokenizer.get_vocab() == tok.get_vocab()
        cfg = RelayConfig(mode="teacher", max_new_tokens=8)
        (trace,) = RelayDecoder(t.backend, t.backend, t.tokenizer).decode_text(PROMPTS[:1], cfg)
        assert trace.n_teacher > 0 and not trace.events


def test_remote_teacher_dir_without_weights_says_to_set_the_url(model_dirs, server, tmp_path):
    _, tok = load_model(str(model_dirs / "teacher"), device="cpu")
    write_remote_teacher_dir(tmp_path / "teacher", tok, server.url, "qwen-8b")
    with pytest.raises(ValueError, match=r"qwen-8b at http://127\.0\.0\.1.*teacher\.server"):
        build_teacher(str(tmp_path / "teacher"))


def test_a_teacher_with_another_tokenizer_is_refused(model_dirs, tmp_path, tokenizer):
    other = build_char_tokenizer()
    other.add_tokens(["<extra>"])
    model = build_model(ModelSize(32, 1, 2, 64), other, seed=5)
    model.save_pretrained(tmp_path / "other")
    other.save_pretrained(tmp_path / "other")
    _, tok = load_model(str(model_dirs / "student"), device="cpu")
    with pytest.raises(ValueError, match=r"tokenizers differ \(\d+ vs \d+ tokens\)"):
        build_teacher(str(tmp_path / "other"), tok, device="cpu")
    # without a tokenizer to match, the teacher simply brings its own
    with build_teacher(str(tmp_path / "other"), device="cpu") as t:
        assert len(t.tokenizer) == len(tok) + 1


def test_wrong_model_name_or_dead_server_fails_fast(server, tokenizer):
    with pytest.raises(TeacherUnavailable, match=r"'nope' is not served .*\['teacher'\]"):
        build_teacher(None, tokenizer, url=server.url, model_name="nope")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        with pytest.raises(TeacherUnavailable, match="cannot list models"):
            build_teacher(None, tokenizer, url=dead, model_name="t")
        # check: false skips the start-up probe (the first hand-off would fail instead)
        with build_teacher(
            None, tokenizer, url=dead, model_name="t", http=HTTPOptions(check=False)
        ) as t:
            assert t.remote
    finally:
        sock.close()


@pytest.mark.parametrize(
    ("kw", "words"),
    [
        ({"url": "http://x"}, "needs teacher_model"),
        ({"model_name": "m"}, "only used with teacher_url"),
    ],
)
def test_url_and_model_name_go_together(kw, words, tokenizer):
    with pytest.raises(ValueError, match=words):
        validate_teacher_options(kw.get("url"), kw.get("model_name"))
    with pytest.raises(ValueError, match=words):
        build_teacher("somewhere", tokenizer, **kw)


def test_nothing_to_build_from():
    with pytest.raises(ValueError, match="no teacher"):
        build_teacher(None)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        build_teacher(None, url="http://127.0.0.1:9", model_name="m")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_teacher("/no/such/teacher")


@pytest.mark.parametrize(
    ("kw", "words"),
    [
        ({"prompt_format": "json"}, "prompt_format"),
        ({"on_failure": "retry"}, "on_failure"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"max_retries": -1}, "max_retries"),
        ({"concurrency": 0}, "concurrency"),
    ],
)
def test_http_options_are_validated(kw, words):
    with pytest.raises(ValueError, match=words):
        HTTPOptions(**kw)


def test_cli_decode_uses_the_same_factory(model_dirs, server, tmp_path, capsys):
    import json

    from relaypipe.cli import main

    common = ["decode", "--student", str(model_dirs / "student"), "--device", "cpu"]
    common += ["--prompt", "1+2+3", "--mode", "teacher", "--max-new-tokens", "8", "--json"]
    assert main([*common, "--teacher", str(model_dirs / "teacher")]) == 0
    local = json.loads(capsys.readouterr().out)
    url = ["--teacher-url", server.url, "--teacher-model", "teacher"]
    assert main([*common, *url]) == 0
    remote = json.loads(capsys.readouterr().out)
    assert remote["token_ids"] == local["token_ids"] and set(remote["sources"]) == {Source.TEACHER}
    # a directory standing for a served teacher is refused with a pointer to the URL options
    _, tok = load_model(str(model_dirs / "teacher"), device="cpu")
    write_remote_teacher_dir(tmp_path / "t", tok, server.url, "teacher")
    with pytest.raises(SystemExit, match="--teacher-url and --teacher-model"):
        main([*common, "--teacher", str(tmp_path / "t")])
    with pytest.raises(SystemExit, match="only used with --teacher-url"):
        main([*common, "--teacher", str(model_dirs / "teacher"), "--teacher-model", "x"])
