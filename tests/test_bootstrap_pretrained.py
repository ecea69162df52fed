"""Stage bootstrap, kind pretrained: import a local model directory as student and teacher,
fine-tune the teacher, measure both; and the same with the teacher behind a real loopback
``relaypipe serve``."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from safetensors.torch import load_file

from relaypipe.cli_serve import add_parser, build_app
from relaypipe.config import ConfigError, build
from relaypipe.importing import IMPORT_RECORD
from relaypipe.micro.train_lm import TrainSpec
from relaypipe.serve import ServerThread
from relaypipe.stages import bootstrap, prepare
from relaypipe.teacher import REMOTE_TEACHER_RECORD, HTTPOptions, TeacherServer, build_teacher


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_models, tokenizer):
    """Problems (prepare stage) and a pretrained-looking model directory to import."""
    root = tmp_path_factory.mktemp("boot")
    prepare.run(
        prepare.PrepareParams(
            difficulty=1, terms=3, n_train=64, n_eval=6, out_dir=str(root / "problems")
        )
    )
    tiny_models[1].save_pretrained(root / "pretrained")
    tokenizer.save_pretrained(root / "pretrained")
    return root


def params(root, out, **kw) -> bootstrap.BootstrapParams:
    return bootstrap.BootstrapParams(
        kind="pretrained",
        student_source=str(root / "pretrained"),
        max_new_tokens=12,
        eval_batch_size=3,
        device="cpu",
        threads=2,
        problems_dir=str(root / "problems"),
        out_dir=str(out),
        allow_degenerate=True,  # random tiny models never answer: warn, do not fail
        **kw,
    )


def weights(folder):
    return load_file(folder / "model.safetensors")


def test_pretrained_import_fine_tune_and_measure(workdir, tmp_path):
    train = TrainSpec(steps=6, batch_size=8, lr=3e-3, warmup_steps=1, seed=0)
    metrics = bootstrap.run(
        params(workdir, tmp_path, teacher_source=str(workdir / "pretrained"), teacher_train=train)
    )
    for role in ("student", "teacher"):
        folder = tmp_path / role
        assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
        assert json.loads((folder / IMPORT_RECORD).read_text())["source"].endswith("pretrained")
    # the student is the source as imported; the teacher was fine-tuned away from it
    source, student, teacher = (
        weights(workdir / "pretrained"),
        weights(tmp_path / "student"),
        weights(tmp_path / "teacher"),
    )
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(student[name], source[name]) and not torch.equal(teacher[name], source[name])
    assert json.loads((tmp_path / "bootstrap.json").read_text()) == metrics
    assert metrics["n_eval"] == 6 and metrics["student_params"] == metrics["teacher_params"]
    assert 0.0 <= metrics["student_accuracy"] <= 1.0 and 0.0 <= metrics["teacher_accuracy"] <= 1.0
    # seconds are rounded to 0.1: six tiny steps on a fast machine round to 0.0
    assert metrics["teacher_train_seconds"] >= 0 and metrics["teacher_final_loss"] > 0
    assert "student_train_seconds" not in metrics  # no student_train: the student is untouched
    # the saved teacher is an ordinary teacher for the later stages
    with build_teacher(str(tmp_path / "teacher"), device="cpu") as t:
        assert not t.remote


def serve(path):
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["serve", "--model", str(path), "--name", "served", "--device", "cpu", "--api-key-env", ""]
    )
    return ServerThread(build_app(args))


def test_pretrained_with_a_served_teacher(workdir, tmp_path):
    same = str(workdir / "pretrained")
    local = bootstrap.run(params(workdir, tmp_path / "local", teacher_source=same))
    with serve(workdir / "pretrained") as srv:
        remote = bootstrap.run(
            params(
                workdir,
                tmp_path / "remote",
                teacher_server=TeacherServer(
                    srv.url, "served", HTTPOptions(timeout_s=30), params=123_456
                ),
            )
        )
        # the teacher directory stands for the server: tokenizer and record, no weights
        teacher_dir = tmp_path / "remote" / "teacher"
        assert json.loads((teacher_dir / REMOTE_TEACHER_RECORD).read_text()) == {
            "url": srv.url,
            "model": "served",
        }
        assert not (teacher_dir / "model.safetensors").exists()
        with pytest.raises(ValueError, match=r"set teacher\.server \(url and model\)"):
            build_teacher(str(teacher_dir))
        with build_teacher(str(teacher_dir), url=srv.url, model_name="served") as t:
            assert t.remote
    assert remote["teacher_params"] == 123_456  # behind the server: as teacher_server.params
    # same weights, greedy: the served teacher scores exactly what the in-process one did
    for key in ("student_accuracy", "teacher_accuracy", "n_eval"):
        assert remote[key] == local[key], key


@pytest.mark.parametrize(
    ("section", "words"),
    [
        ({"kind": "pretrained"}, "needs student_source"),
        ({"kind": "pretrained", "student_source": "s"}, "exactly one of teacher_source"),
        (
            {
                "kind": "pretrained",
                "student_source": "s",
                "teacher_source": "t",
                "teacher_server": {"url": "u", "model": "m"},
            },
            "exactly one of teacher_source and teacher_server",
        ),
        (
            {"kind": "pretrained", "student_source": "s", "teacher_server": {"url": "u"}},
            r"bootstrap\.teacher_server: missing required key 'model'",
        ),
        (
            {"kind": "pretrained", "student_source": "s", "teacher_url": "u"},
            r"bootstrap\.teacher_url moved to bootstrap\.teacher_server\.url",
        ),
        (
            {
                "kind": "pretrained",
                "student_source": "s",
                "teacher_server": {"url": "http://x", "model": "m"},
                "teacher_train": {"steps": 1},
            },
            "cannot fine-tune a served teacher",
        ),
        (
            {
                "kind": "pretrained",
                "student_source": "s",
                "teacher_source": "t",
                "student": {"hidden_size": 8, "layers": 1, "heads": 1, "intermediate_size": 8},
            },
            "belong",
        ),
        ({"kind": "imported"}, "kind must be one of"),
    ],
)
def test_bad_pretrained_sections_fail_clearly(section, words):
    with pytest.raises(ConfigError, match=words):
        build(bootstrap.BootstrapParams, section, "params.yaml:bootstrap")


def test_an_unreachable_served_teacher_fails_before_anything_is_written(workdir, tmp_path):
    import socket

    from relaypipe.relay.http_backend import TeacherUnavailable

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        with pytest.raises(TeacherUnavailable, match="cannot list models"):
            server = TeacherServer(url, "m")
            bootstrap.run(params(workdir, tmp_path / "out", teacher_server=server))
    finally:
        sock.close()
    assert not (tmp_path / "out").exists()
