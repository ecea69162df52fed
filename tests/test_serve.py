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
from relaypipe.relay.backends import GenRequest
from relaypipe.relay.decoder import RelayConfig, RelayDecoder
from relaypipe.relay.http_backend import HTTPBackend
from relaypipe.relay.transformers_backend import TransformersBackend
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
    """POST a body as Python's json writes it: NaN, Infinity and lone surrogates included."""
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    content = json.dumps(body).encode()
    return httpx.post(
        f"{srv.url}/v1/completions", content=content, headers=headers, timeout=30, **kw
    )


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


def test_stop_token_ids_keep_the_stop_token_and_name_it(teacher_server, tiny_models, tokenizer):
    """As vLLM: the stop id is the last of token_ids and the choice's stop_reason."""
    prompt = tokenizer("Q: 7+8\nA: ", add_special_tokens=False).input_ids
    free = TransformersBackend(tiny_models[1]).generate([GenRequest("x", prompt, 8)])[0]
    stop = free.tokens[2]  # a token the teacher writes third, greedily
    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0, "stop_token_ids": [stop]}
    (choice,) = post(teacher_server, body).json()["choices"]
    cut = free.tokens.index(stop) + 1
    assert choice["token_ids"] == free.tokens[:cut] and choice["stop_reason"] == stop
    assert choice["finish_reason"] == "stop"
    (plain,) = post(teacher_server, {**body, "stop_token_ids": None}).json()["choices"]
    assert plain["stop_reason"] is None


def test_logit_bias_acts_as_in_process(teacher_server, tiny_models, tokenizer):
    prompt = tokenizer("Q: 7+8\nA: ", add_special_tokens=False).input_ids
    backend = TransformersBackend(tiny_models[1])
    free = backend.generate([GenRequest("x", prompt, 6)])[0]
    bias = {free.tokens[0]: -100.0, 9: 7.5}  # ban its first pick, push another token
    want = backend.generate([GenRequest("y", prompt, 6, logit_bias=bias)])[0]
    assert want.tokens != free.tokens
    wire = {str(k): v for k, v in bias.items()}
    r = post(
        teacher_server, {"prompt": prompt, "max_tokens": 6, "temperature": 0, "logit_bias": wire}
    )
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["token_ids"] == want.tokens
    # batch-mates without a bias are untouched by one with it
    with ThreadPoolExecutor(4) as pool:
        bodies = [{"prompt": prompt, "max_tokens": 6, "temperature": 0}] * 3
        bodies.append({**bodies[0], "logit_bias": wire})
        got = [
            r.json()["choices"][0]["token_ids"]
            for r in pool.map(lambda b: post(teacher_server, b), bodies)
        ]
    assert got == [free.tokens] * 3 + [want.tokens]


def test_relay_mode_refuses_logit_bias(relay_server):
    r = post(relay_server, {"prompt": "Q: 1\nA: ", "max_tokens": 3, "logit_bias": {"5": 1}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias"
    assert "relay.call_bias" in r.json()["error"]["message"]


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
        ({**OK, "logit_bias": {"x": 1}}, 400, "logit_bias", "token ids (decimal strings)"),
        ({**OK, "logit_bias": {"-1": 1}}, 400, "logit_bias", "token ids (decimal strings)"),
        ({**OK, "logit_bias": {"99999": 1}}, 400, "logit_bias", "outside the vocabulary"),
        ({**OK, "logit_bias": {"5": 100.5}}, 400, "logit_bias", "in [-100, 100]"),
        ({**OK, "logit_bias": {"5": True}}, 400, "logit_bias", "in [-100, 100]"),
        ({**OK, "logit_bias": [5]}, 400, "logit_bias", "must be an object"),
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


# ---------------------------------------------------------------------------- limits and caps
def test_cli_modes_match_the_decoder():
    from relaypipe.cli_serve import MODES as CLI_MODES
    from relaypipe.relay.decoder import MODES

    assert CLI_MODES == MODES


def test_serve_cli_help_needs_no_torch():
    import subprocess
    import sys

    code = (
        "import argparse, sys\n"
        "from relaypipe import cli_serve\n"
        "p = argparse.ArgumentParser(); cli_serve.add_parser(p.add_subparsers())\n"
        "bad = [m for m in ('torch', 'transformers', 'relaypipe.serve') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({**OK, "seed": 2**63}, "seed", "<= 9223372036854775807"),
        ({**OK, "seed": 2**64}, "seed", "<="),
        ({**OK, "seed": -1}, "seed", ">= 0"),
        ({**OK, "seed": True}, "seed", "must be an integer"),
        ({**OK, "max_tokens": True}, "max_tokens", "must be an integer"),
        ({**OK, "max_tokens": 4.0}, "max_tokens", "must be an integer"),
        ({**OK, "max_tokens": -1}, "max_tokens", ">= 1"),
        ({**OK, "max_tokens": 10**30}, "max_tokens", "<="),
        ({**OK, "max_tokens": [4]}, "max_tokens", "must be an integer"),
        ({**OK, "temperature": 1e-300}, "temperature", "at least 1e-05"),
        ({**OK, "temperature": 101}, "temperature", "must be in"),
        ({**OK, "temperature": 10**400}, "temperature", "out of range"),
        ({**OK, "temperature": True}, "temperature", "must be a number"),
        ({**OK, "top_k": -2}, "top_k", ">= -1"),
        ({**OK, "prompt": [1, -1]}, "prompt", "outside the vocabulary"),
        ({**OK, "prompt": [1, True]}, "prompt", "must be a string"),
        ({**OK, "prompt": [[1], []]}, "prompt", "'prompt[1]' is empty"),
        ({**OK, "prompt": "\ud800"}, "prompt", "lone surrogate"),
        ({**OK, "stop_token_ids": [1, 10**6]}, "stop_token_ids", "outside the vocabulary"),
        ({**OK, "stop_token_ids": [True]}, "stop_token_ids", "must be an integer"),
        ({**OK, "return_token_ids": 1}, "return_token_ids", "must be a boolean"),
        ({**OK, "n": True}, "n", "must be an integer"),
        ({**OK, "logprobs": 1}, "logprobs", "not supported"),
        ({**OK, "max_token": 4}, "max_token", "unrecognized request argument"),
        ({**OK, "relay": {"mode": "teacher"}, "seed": 3}, "relay", "relay-mode server"),
    ],
)
def test_types_and_limits_are_4xx_naming_field_and_value(guarded_server, body, param, words):
    r = post(guarded_server, body, key=KEY)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert words in err["message"] and err["param"] == param, err
    assert set(err) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 10_000 + b"]" * 10_000,
        b'{"prompt": ' + b"[" * 10_000 + b"]" * 10_000 + b"}",
        b"\xff\xfe\x00",
        b"",
        b"null",
        b'{"prompt": "a", "seed": ' + b"9" * 5000 + b"}",
        b'{"prompt": "a", "temperature": NaN}',
    ],
)
def test_unparseable_bodies_are_json_400(teacher_server, raw):
    headers = {"Content-Type": "application/json"}
    r = httpx.post(f"{teacher_server.url}/v1/completions", content=raw, headers=headers, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_max_tokens_absent_is_the_default_under_the_cap(tiny_models, tokenizer):
    engine = ModelEngine(TransformersBackend(tiny_models[1]), tokenizer, "teacher")
    limits = ServeLimits(max_tokens=5)
    with ServerThread(make_app(engine, limits=limits)) as srv:
        # an untrained model rarely stops early: greedy from a fixed prompt runs to the cap
        for body in ({"prompt": [5, 6]}, {"prompt": [5, 6], "max_tokens": None}):
            r = post(srv, {**body, "temperature": 0})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 5
        assert post(srv, {"prompt": [5, 6], "max_tokens": 6}).status_code == 400


def test_seeds_at_the_engines_limits(teacher_server, relay_server):
    from relaypipe.serve import RELAY_MAX_SEED

    sampled = {"prompt": "Q: 1\nA: ", "max_tokens": 3, "temperature": 1.0}
    assert post(teacher_server, {**sampled, "seed": 2**63 - 1}).status_code == 200
    assert post(teacher_server, {**sampled, "prompt": ["a", "b"], "seed": 2**63 - 1}).is_success
    assert post(relay_server, {**sampled, "seed": RELAY_MAX_SEED}).status_code == 200
    r = post(relay_server, {**sampled, "seed": RELAY_MAX_SEED + 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "seed"
    assert str(RELAY_MAX_SEED) in r.json()["error"]["message"]


@pytest.fixture(scope="module")
def capped_relay(tiny_models, tokenizer):
    """A relay server whose operator capped teacher tokens, calls, turns and modes."""
    student, teacher = tiny_models
    dec = RelayDecoder(TransformersBackend(student), TransformersBackend(teacher), tokenizer)
    cfg = RelayConfig(
        mode="random_router",
        router_p=1.0,
        max_teacher_tokens=6,
        max_calls=3,
        max_call_tokens=4,
        max_turns=5,
        seed=1,
    )
    engine = RelayEngine(
        dec, "relay", cfg, allowed_modes=("random_router", "teacher", "relay", "student")
    )
    with ServerThread(make_app(engine, limits=ServeLimits(max_tokens=24))) as srv:
        yield srv


@pytest.mark.parametrize(
    ("relay", "param"),
    [
        ({"max_teacher_tokens": 7}, "relay.max_teacher_tokens"),
        ({"max_calls": 4}, "relay.max_calls"),
        ({"max_call_tokens": 5}, "relay.max_call_tokens"),
        ({"max_turns": 6}, "relay.max_turns"),
        ({"mode": "fixed_help"}, "relay.mode"),
        ({"mode": "nonsense"}, "relay.mode"),
        ({"mode": 3}, "relay.mode"),
        ({"max_call_tokens": 2.5}, "relay.max_call_tokens"),
        ({"max_calls": True}, "relay.max_calls"),
        ({"router_p": float("nan")}, "relay.router_p"),
        ({"router_p": 1.5}, "relay.router_p"),
        ({"fixed_n": 0}, "relay.fixed_n"),
        ({"bogus": 1}, "relay"),
    ],
)
def test_a_request_cannot_raise_the_operators_relay_caps(capped_relay, relay, param):
    r = post(capped_relay, {"prompt": "Q: 1\nA: ", "max_tokens": 8, "relay": relay})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


@pytest.mark.parametrize("mode", ["teacher", "random_router", "relay"])
@pytest.mark.parametrize("asked", [None, 6, 2])
def test_teacher_budget_holds_in_every_mode(capped_relay, mode, asked):
    relay = {"mode": mode, "max_teacher_tokens": asked}
    r = post(capped_relay, {"prompt": PROMPTS, "max_tokens": 24, "temperature": 0, "relay": relay})
    assert r.status_code == 200, r.text
    budget = 6 if asked is None else asked
    for choice in r.json()["choices"]:
        assert choice["relay"]["teacher_tokens"] <= budget
        assert choice["relay"]["calls"] <= 3
    if mode == "teacher":  # all tokens are the teacher's: it wrote until its budget ran out
        assert {len(c["token_ids"]) for c in r.json()["choices"]} <= set(range(1, budget + 1))


def test_a_zero_teacher_budget_in_teacher_mode_is_a_400(capped_relay):
    body = {"prompt": "Q: 1\nA: ", "relay": {"mode": "teacher", "max_teacher_tokens": 0}}
    r = post(capped_relay, body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "relay.max_teacher_tokens"
    body = {"prompt": "Q: 1\nA: ", "relay": {"mode": "student", "max_teacher_tokens": 0}}
    assert post(capped_relay, body).status_code == 200


def test_cli_relay_server_caps_teacher_tokens_and_modes(tmp_path, tiny_models, tokenizer):
    """Issue 15: --max-teacher-tokens 12, then mode teacher with max_teacher_tokens null."""
    for name, model in zip(("student", "teacher"), tiny_models, strict=True):
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    base = [
        *("serve", "--student", str(tmp_path / "student"), "--teacher", str(tmp_path / "teacher")),
        *("--device", "cpu", "--api-key-env", ""),
    ]
    caps = ["--max-teacher-tokens", "12", "--max-tokens", "40"]
    modes = ["--allowed-modes", "relay", "teacher", "student"]
    with ServerThread(build_app(parser.parse_args([*base, *caps, *modes]))) as srv:
        body = {"prompt": "Q: 1\nA: ", "max_tokens": 32, "temperature": 0}
        r = post(srv, {**body, "relay": {"mode": "teacher", "max_teacher_tokens": None}})
        assert r.status_code == 200, r.text
        assert 0 < r.json()["choices"][0]["relay"]["teacher_tokens"] <= 12
        r = post(srv, {**body, "relay": {"mode": "teacher", "max_teacher_tokens": 13}})
        assert r.status_code == 400 and "cap of 12" in r.json()["error"]["message"]
        r = post(srv, {**body, "relay": {"mode": "random_router"}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "relay.mode"
        assert post(srv, {**body, "max_tokens": 41}).status_code == 400
    with pytest.raises(SystemExit):  # the default mode must be one a request may use
        build_app(parser.parse_args([*base, "--allowed-modes", "teacher"]))


# ---------------------------------------------------------------------------- isolation
class PoisonBackend(TransformersBackend):
    """Fails any batch that holds a prompt starting with the poison token id."""

    POISON = 7

    def generate(self, requests, **kw):
        if any(r.context and r.context[0] == self.POISON for r in requests):
            raise RuntimeError("poisoned batch")
        return super().generate(requests, **kw)


class RecordingEngine(ModelEngine):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.batch_sizes: list[int] = []

    def run(self, jobs):
        self.batch_sizes.append(len(jobs))
        super().run(jobs)


def test_a_decode_failure_fails_only_its_own_request(tiny_models, tokenizer):
    engine = RecordingEngine(PoisonBackend(tiny_models[1]), tokenizer, "teacher")
    limits = ServeLimits(batch_wait_s=0.05)
    good = [
        {"prompt": [10 + i, 11, 12], "max_tokens": 5, "temperature": t, "seed": i}
        for i in range(8)
        for t in (0, 1.0)
    ]
    bad = [
        {"prompt": [PoisonBackend.POISON, 11], "max_tokens": 5, "temperature": t} for t in (0, 1.0)
    ]
    with ServerThread(make_app(engine, limits=limits)) as srv:
        alone = [post(srv, b).json()["choices"][0]["token_ids"] for b in good]
        engine.batch_sizes.clear()
        mixed = [*bad, *good[:8], *bad, *good[8:]]
        with ThreadPoolExecutor(len(mixed)) as pool:
            replies = list(pool.map(lambda b: post(srv, b), mixed))
    assert max(engine.batch_sizes) > 1  # they really shared batches
    for body, r in zip(mixed, replies, strict=True):
        if body in bad:
            assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        else:  # every good request: 200 and exactly what it got alone
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["token_ids"] == alone[good.index(body)]


def test_wrong_method_is_a_json_405(guarded_server):
    r = httpx.get(f"{guarded_server.url}/v1/completions")
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"


class EchoEngine:
    """No model: each job's answer is its first prompt; a job with prompt [0] raises, and the
    engine (deliberately careless) fails the whole batch for it."""

    name, tokenizer, max_batch, max_seed = "echo", None, 8, 0

    def validate(self, params):
        pass

    def run(self, jobs):
        if any(j.prompts == [[0]] for j in jobs):
            raise RuntimeError("poison")
        for j in jobs:
            j.future.set_result(j.prompts[0])


def test_the_batcher_isolates_failures_and_skips_cancelled_jobs():
    from relaypipe.relay.sampling import Sampling
    from relaypipe.serve import CompletionParams, Job, MicroBatcher

    params = CompletionParams(max_tokens=1, sampling=Sampling())
    batcher = MicroBatcher(EchoEngine(), ServeLimits(batch_wait_s=0.2))
    jobs = [Job([[i]], params) for i in range(5)]
    assert jobs[3].future.cancel()  # its client went away before the batch ran
    batcher.start()
    try:
        for job in jobs:
            batcher.submit(job)
        assert [jobs[i].future.result(timeout=10) for i in (1, 2, 4)] == [[1], [2], [4]]
        with pytest.raises(RuntimeError, match="poison"):
            jobs[0].future.result(timeout=10)
        assert jobs[3].future.cancelled()
    finally:
        batcher.stop()
