"""``relaypipe serve`` on loopback: the relay over HTTP equals the in-process relay, the
OpenAI response shape, the relay-mode provenance, and clear 4xx answers to bad requests."""

from __future__ import annotations

import argparse
import json
import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from relaypipe.cli_serve import add_parser, build_app
from relaypipe.relay.backends import GenRequest, TransformersBackend
from relaypipe.relay.decoder import RelayConfig, RelayDecoder
from relaypipe.relay.http_backend import HTTPBackend
from relaypipe.serve import ModelEngine, RelayEngine, ServeLimits, ServerThread, make_app

PROMPTS = ["Q: 1+2\nA: ", "Q: 33+4+5\nA: ", "Q: 5\nA: ", "Q: 12+1\nA: "]
KEY = "sekret"


@pytest.fixture(scope="module")
def teacher_server(tiny_models, tokenizer):
    engine = ModelEngine(TransformersBackend(tiny_models[1]), tokenizer, "teacher")
    with ServerThread(make_app(engine)) as srv:
        yield srv


@pytest.fixture(scope="module")
def guarded_server(tiny_models, tokenizer):
    """Model mode with an API key and small limits, for the bad-request tests."""
    engine = ModelEngine(TransformersBackend(tiny_models[1]), tokenizer, "teacher")
    limits = ServeLimits(max_body_bytes=2000, max_prompt_tokens=50, max_tokens=64)
    with ServerThread(make_app(engine, api_key=KEY, limits=limits)) as srv:
        yield srv


@pytest.fixture(scope="module")
def relay_server(tiny_models, tokenizer):
    student, teacher = tiny_models
    dec = RelayDecoder(TransformersBackend(student), TransformersBackend(teacher), tokenizer)
    cfg = RelayConfig(mode="random_router", router_p=0.3, seed=4)
    with ServerThread(make_app(RelayEngine(dec, "relay", cfg))) as srv:
        yield srv


def post(srv, body, key: str | None = None, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{srv.url}/v1/completions", json=body, headers=headers, timeout=30, **kw)


def test_relay_with_teacher_over_http_equals_in_process(teacher_server, tiny_models, tokenizer):
    student, teacher = tiny_models
    cfg = RelayConfig(mode="random_router", router_p=0.3, max_new_tokens=24, seed=3)
    local = RelayDecoder(TransformersBackend(student), TransformersBackend(teacher), tokenizer)
    with HTTPBackend(teacher_server.url, "teacher", tokenizer, timeout_s=30) as remote_teacher:
        remote = RelayDecoder(TransformersBackend(student), remote_teacher, tokenizer)
        want, got = local.decode_text(PROMPTS, cfg), remote.decode_text(PROMPTS, cfg)
    assert sum(len(t.handoffs) for t in want) > 4  # hand-offs really happened
    for w, g in zip(want, got, strict=True):
        assert g.token_ids == w.token_ids and g.sources == w.sources
        assert g.stop_reason == w.stop_reason and not g.events
        assert [h.delivered for h in g.handoffs] == [h.delivered for h in w.handoffs]
    # the server's prefix cache saves the same prefill as the in-process KV cache
    assert [t.teacher_prefill_tokens for t in got] == [t.teacher_prefill_tokens for t in want]


def test_completion_shape_and_greedy_tokens(teacher_server, tiny_models, tokenizer):
    prompt = tokenizer("Q: 7+8\nA: ", add_special_tokens=False).input_ids
    want = TransformersBackend(tiny_models[1]).generate([GenRequest("x", prompt, 6)])[0]
    r = post(
        teacher_server,
        {
            "model": "teacher",
            "prompt": prompt,
            "max_tokens": 6,
            "temperature": 0,
            "return_token_ids": True,
        },
    )
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["object"] == "text_completion" and data["model"] == "teacher"
    assert data["id"].startswith("cmpl-") and isinstance(data["created"], int)
    (choice,) = data["choices"]
    assert choice["index"] == 0 and choice["token_ids"] == want.tokens
    assert choice["text"] == tokenizer.decode(want.tokens, skip_special_tokens=True)
    assert choice["finish_reason"] == {"eos": "stop", "length": "length"}[want.finish]
    usage = data["usage"]
    assert usage["prompt_tokens"] == len(prompt)
    assert usage["completion_tokens"] == len(want.tokens)
    assert usage["total_tokens"] == len(prompt) + len(want.tokens)

    # a string prompt and a list of prompts; the second extends the first, so it hits the cache
    r = post(
        teacher_server,
        {
            "model": "teacher",
            "prompt": ["Q: 7+8\nA: ", "Q: 7+8\nA: 1"],
            "max_tokens": 3,
            "temperature": 0,
        },
    )
    texts = [c["text"] for c in r.json()["choices"]]
    assert len(texts) == 2 and texts[0] == tokenizer.decode(
        want.tokens[:3], skip_special_tokens=True
    )
    r = post(
        teacher_server, {"prompt": "Q: 7+8\nA: 1" + texts[1], "max_tokens": 2, "temperature": 0}
    )
    assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


def test_seeded_sampling_is_reproducible_under_concurrency(teacher_server):
    bodies = [
        {"prompt": f"Q: {i}\nA: ", "max_tokens": 8, "temperature": 1.0, "seed": i} for i in range(6)
    ]
    one_by_one = [post(teacher_server, b).json()["choices"][0]["token_ids"] for b in bodies]
    with ThreadPoolExecutor(6) as pool:  # these get micro-batched together
        together = [
            r.json()["choices"][0]["token_ids"]
            for r in pool.map(lambda b: post(teacher_server, b), bodies)
        ]
    assert together == one_by_one


def test_relay_mode_carries_provenance(relay_server, tiny_models, tokenizer):
    r = post(
        relay_server, {"model": "relay", "prompt": PROMPTS[:2], "max_tokens": 20, "temperature": 0}
    )
    assert r.status_code == 200, r.text
    student, teacher = tiny_models
    dec = RelayDecoder(TransformersBackend(student), TransformersBackend(teacher), tokenizer)
    cfg = RelayConfig(mode="random_router", router_p=0.3, seed=4, max_new_tokens=20)
    want = dec.decode_text(PROMPTS[:2], cfg)
    for choice, tr in zip(r.json()["choices"], want, strict=True):
        relay = choice["relay"]
        assert choice["token_ids"] == tr.token_ids
        assert relay["sources"] == [["student", "teacher", "command"][s] for s in tr.sources]
        assert relay["calls"] == tr.calls > 0 and relay["teacher_tokens"] == tr.n_teacher
        assert relay["stop_reason"] == tr.stop_reason and relay["events"] == []
    # per-request relay options: the teacher alone
    r = post(
        relay_server,
        {"prompt": PROMPTS[0], "max_tokens": 5, "temperature": 0, "relay": {"mode": "teacher"}},
    )
    assert set(r.json()["choices"][0]["relay"]["sources"]) == {"teacher"}


def test_models_and_health(guarded_server):
    assert httpx.get(f"{guarded_server.url}/health").json()["status"] == "ok"
    assert httpx.get(f"{guarded_server.url}/v1/models").status_code == 401
    r = httpx.get(f"{guarded_server.url}/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert [m["id"] for m in r.json()["data"]] == ["teacher"]


OK = {"model": "teacher", "prompt": "Q: 1\nA: ", "max_tokens": 4}


@pytest.mark.parametrize(
    ("body", "status", "param", "words"),
    [
        ({"model": "teacher", "max_tokens": 4}, 400, "prompt", "missing required field 'prompt'"),
        ({**OK, "prompt": 5}, 400, "prompt", "must be a string"),
        ({**OK, "prompt": [1, "a"]}, 400, "prompt", "must be a string"),
        ({**OK, "prompt": []}, 400, "prompt", "empty list"),
        ({**OK, "prompt": ""}, 400, "prompt", "empty"),
        ({**OK, "prompt": [1, 99999]}, 400, "prompt", "outside the vocabulary"),
        ({**OK, "prompt": "x" * 60}, 400, "prompt", "at most 50"),
        ({**OK, "max_tokens": "4"}, 400, "max_tokens", "must be an integer"),
        ({**OK, "max_tokens": 0}, 400, "max_tokens", ">= 1"),
        ({**OK, "max_tokens": 65}, 400, "max_tokens", "cap of 64"),
        ({**OK, "temperature": -1}, 400, "temperature", "must be in"),
        ({**OK, "temperature": "hot"}, 400, "temperature", "must be a number"),
        ({**OK, "top_p": 0}, 400, "top_p", "must be in"),
        ({**OK, "seed": 1.5}, 400, "seed", "integer"),
        ({**OK, "stream": True}, 400, "stream", "not supported"),
        ({**OK, "n": 2}, 400, "n", "not supported"),
        ({**OK, "stop": ["\n"]}, 400, "stop", "not supported"),
        ({**OK, "relay": {"mode": "teacher"}}, 400, "relay", "relay-mode server"),
        ({**OK, "model": "gpt-4"}, 404, "model", "does not exist"),
        ({**OK, "model": 3}, 400, "model", "must be a string"),
        ({**OK, "prompt": "x" * 3000}, 413, None, "over 2000 bytes"),
    ],
)
def test_bad_requests_get_clear_errors(guarded_server, body, status, param, words):
    r = post(guarded_server, body, key=KEY)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words in err["message"] and err["param"] == param and err["type"]


@pytest.mark.parametrize(
    ("kw", "status", "words"),
    [
        ({"content": b"{not json", "headers": {"Authorization": f"Bearer {KEY}"}}, 400, "JSON"),
        ({"content": b"[1, 2]", "headers": {"Authorization": f"Bearer {KEY}"}}, 400, "object"),
        ({"json": OK}, 401, "missing API key"),
        ({"json": OK, "headers": {"Authorization": "Bearer wrong"}}, 401, "invalid API key"),
    ],
)
def test_bad_bodies_and_keys(guarded_server, kw, status, words):
    r = httpx.post(f"{guarded_server.url}/v1/completions", timeout=30, **kw)
    assert r.status_code == status and words in r.json()["error"]["message"]
    assert post(guarded_server, OK, key=KEY).status_code == 200  # the server is still fine


def test_unknown_route_is_a_json_404(guarded_server):
    r = httpx.get(f"{guarded_server.url}/v1/chat/nope")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_relay_mode_rejects_bad_relay_options(relay_server):
    r = post(relay_server, {"prompt": "Q: 1\nA: ", "relay": {"router_p": 3}})
    assert r.status_code == 400 and "router_p" in r.json()["error"]["message"]
    r = post(relay_server, {"prompt": "Q: 1\nA: ", "relay": {"bogus": 1}})
    assert r.status_code == 400 and "bogus" in r.json()["error"]["message"]


def test_cli_builds_and_serves_a_saved_model(tmp_path, tiny_models, tokenizer, monkeypatch):
    tiny_models[1].save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    monkeypatch.setenv("MY_KEY", KEY)
    args = parser.parse_args(
        [
            "serve",
            "--model",
            str(tmp_path / "teacher"),
            "--name",
            "t",
            "--api-key-env",
            "MY_KEY",
            "--device",
            "cpu",
        ]
    )
    with ServerThread(build_app(args)) as srv:
        r = post(srv, {"model": "t", "prompt": "Q: 1\nA: ", "max_tokens": 3}, key=KEY)
        assert r.status_code == 200 and len(r.json()["choices"][0]["token_ids"]) <= 3
        assert json.loads(httpx.get(f"{srv.url}/health").text)["model"] == "t"


def test_relay_server_with_an_unreachable_teacher_answers_502(tiny_models, tokenizer):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with HTTPBackend(dead, "t", tokenizer, max_retries=1, backoff_s=0.01) as teacher:
        dec = RelayDecoder(TransformersBackend(tiny_models[0]), teacher, tokenizer)
        with ServerThread(make_app(RelayEngine(dec, "relay", RelayConfig(mode="teacher")))) as srv:
            r = post(srv, {"prompt": "Q: 1\nA: ", "max_tokens": 4})
    sock.close()
    assert r.status_code == 502
    assert dead in r.json()["error"]["message"] and "ConnectError" in r.json()["error"]["message"]
