"""Adversarial request bodies against real ``relaypipe serve`` servers on loopback.

Whatever a client sends (random JSON of any type, size and nesting; numbers at and past every
limit; non-JSON bytes), the answer is JSON with status 200 or 4xx, never 5xx, and the server
still answers a good request afterwards. Good requests that share micro-batches with bad ones
get exactly what they get alone. A 200 from a capped relay server never exceeds the caps.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from relaypipe.micro.tokenizer import build_char_tokenizer
from relaypipe.relay.decoder import MODES, RelayConfig, RelayDecoder
from relaypipe.relay.transformers_backend import TransformersBackend
from relaypipe.serve import (
    RELAY_MAX_SEED,
    CompletionRequest,
    ModelEngine,
    RelayEngine,
    RelayOptions,
    ServeLimits,
    ServerThread,
    make_app,
)

LIMITS = ServeLimits(
    max_body_bytes=32_768, max_prompt_tokens=48, max_tokens=6, max_prompts=3, batch_wait_s=0.02
)
RELAY_CAPS = {"max_teacher_tokens": 5, "max_calls": 2, "max_call_tokens": 3, "max_turns": 4}
ALLOWED = tuple(m for m in MODES if m != "fixed_help")
FIELDS = tuple(CompletionRequest.model_fields)
RELAY_FIELDS = tuple(RelayOptions.model_fields)
GOOD = {"prompt": "Q: 1+2\nA: ", "max_tokens": 4, "temperature": 0}


class RecordingEngine(ModelEngine):
    """A model engine that remembers its batch sizes (to prove requests shared batches)."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.batch_sizes: list[int] = []

    def run(self, jobs):  # type: ignore[no-untyped-def]
        self.batch_sizes.append(len(jobs))
        super().run(jobs)


@pytest.fixture(scope="module")
def model_server(tiny_models, tokenizer):
    engine = RecordingEngine(TransformersBackend(tiny_models[1]), tokenizer, "teacher")
    with ServerThread(make_app(engine, limits=LIMITS)) as srv:
        srv.engine = engine
        yield srv


@pytest.fixture(scope="module")
def relay_server(tiny_models, tokenizer):
    student, teacher = tiny_models
    dec = RelayDecoder(TransformersBackend(student), TransformersBackend(teacher), tokenizer)
    cfg = RelayConfig(mode="relay", router_p=0.5, seed=0, **RELAY_CAPS)
    engine = RelayEngine(dec, "relay", cfg, allowed_modes=ALLOWED)
    with ServerThread(make_app(engine, limits=LIMITS)) as srv:
        yield srv


_client = httpx.Client(timeout=60)  # keep-alive: the fuzz measures the server, not connects


def send(srv, body: Any = None, raw: bytes | None = None) -> httpx.Response:
    """POST a body as Python's json writes it (NaN, Infinity, lone surrogates and all)."""
    content = raw if raw is not None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    return _client.post(f"{srv.url}/v1/completions", content=content, headers=headers)


def check(r: httpx.Response, relay: bool = False) -> dict:
    """200 or 4xx, always JSON of the right shape; a 200 within every limit."""
    assert r.status_code == 200 or 400 <= r.status_code < 500, (r.status_code, r.text[:500])
    assert r.headers["content-type"].startswith("application/json")
    data = r.json()
    with contextlib.suppress(InvalidArgument):  # tallied in --hypothesis-show-statistics
        event(f"{r.status_code} {data['error']['param'] if r.status_code != 200 else ''}")
    if r.status_code != 200:
        err = data["error"]
        assert set(err) == {"message", "type", "param", "code"}, err
        assert isinstance(err["message"], str) and err["message"]
        assert err["param"] is None or isinstance(err["param"], str)
        return data
    assert 1 <= len(data["choices"]) <= LIMITS.max_prompts
    for choice in data["choices"]:
        assert len(choice["token_ids"]) <= LIMITS.max_tokens
        if relay:
            assert choice["relay"]["teacher_tokens"] <= RELAY_CAPS["max_teacher_tokens"]
            assert choice["relay"]["calls"] <= RELAY_CAPS["max_calls"]
    return data


def still_fine(srv) -> None:
    r = send(srv, GOOD)
    assert r.status_code == 200, r.text


# ---------------------------------------------------------------------------- strategies
VOCAB = len(build_char_tokenizer())  # the fixtures' vocabulary: ids around it probe its bound
EDGE_INTS = [
    *(0, 1, -1, 2, 3, 4, 5, 6, 7, 47, 48, 49, VOCAB - 1, VOCAB, VOCAB + 1),
    *(2**31 - 1, 2**31, 2**53, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**64 + 1),
    *(-(2**63), -(2**63) - 1, RELAY_MAX_SEED, RELAY_MAX_SEED + 1, 10**30, -(10**30), 10**400),
]
EDGE_FLOATS = [
    *(0.0, -0.0, 0.5, 1.0, 2.5, 4.0, -1.0, 1e-300, 5e-324, 1e-5, 9.99e-6, 1e-4, 0.999999),
    *(99.99, 100.0, 100.5, 1e308, math.nan, math.inf, -math.inf),
]
EDGE_STRINGS = ["", " ", "teacher", "relay", "model", "\ud800", "\x00", "Q: 1\nA: ", *MODES]

edges = st.sampled_from([*EDGE_INTS, *EDGE_FLOATS, None, True, False])
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from(EDGE_INTS),
    st.integers(),
    st.sampled_from(EDGE_FLOATS),
    st.floats(),
    st.sampled_from(EDGE_STRINGS),
    st.text(max_size=30),
)
keys = st.one_of(st.sampled_from(FIELDS + RELAY_FIELDS), st.text(max_size=10))
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(keys, inner, max_size=6),
    max_leaves=30,
)
token_ids = st.one_of(st.integers(-3, VOCAB + 3), st.sampled_from(EDGE_INTS), scalars)
prompts = st.one_of(
    json_values,
    st.text(max_size=80),
    st.lists(st.integers(0, 40), min_size=0, max_size=60),
    st.lists(token_ids, max_size=12),
    st.lists(st.text(max_size=12), max_size=5),
    st.lists(st.lists(st.integers(-2, VOCAB + 2), max_size=10), max_size=5),
)
relay_options = st.one_of(
    json_values,
    st.dictionaries(st.sampled_from(RELAY_FIELDS), edges | scalars, max_size=5),
    st.fixed_dictionaries(
        {}, optional={"mode": st.sampled_from([*MODES, "x", None]), "max_teacher_tokens": scalars}
    ),
)


def field_values(name: str) -> st.SearchStrategy[Any]:
    if name == "prompt":
        return prompts
    if name == "relay":
        return relay_options
    return st.one_of(edges, scalars, json_values)  # a third: a number at or past a limit


# a good body with some fields replaced, removed or added: reaches every check
mutated = st.fixed_dictionaries(
    {
        "base": st.sampled_from(
            [
                GOOD,
                {"prompt": [5, 6, 7], "max_tokens": 6, "temperature": 1.0, "seed": 3},
                {"prompt": ["a", [4, 5]], "top_p": 0.9, "top_k": 3, "return_token_ids": True},
                {"prompt": "b", "relay": {"mode": "teacher", "max_teacher_tokens": None}},
                {"prompt": "c", "relay": {"mode": "random_router", "router_p": 1.0}},
            ]
        ),
        "changes": st.lists(st.sampled_from([*FIELDS, "bogus"]), min_size=1, max_size=3),
        "drop": st.booleans(),
        "data": st.data(),
    }
)

raw_bodies = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=300).map(str.encode),
    st.integers(1, 30_000).map(lambda d: b"[" * d + b"]" * d),
    st.integers(1, 30_000).map(lambda d: b'{"prompt": ' + b"[" * d + b"]" * d + b"}"),
    st.integers(1, 30_000).map(lambda d: b'{"relay": ' + b'{"a":' * d + b"1" + b"}" * d + b"}"),
    st.integers(1, 5000).map(lambda d: b'{"prompt": "x", "seed": ' + b"9" * d + b"}"),
    st.integers(LIMITS.max_body_bytes - 50, LIMITS.max_body_bytes + 50).map(
        lambda n: b'{"prompt": "' + b"a" * max(0, n - 14) + b'"}'
    ),
    st.sampled_from(
        [b"", b"null", b"[]", b"1", b'"x"', b"{", b'{"prompt": NaN}', b'{"prompt": "a",}']
    ),
)

FUZZ = settings(
    max_examples=300,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    deadline=None,
)


def build_mutated(example: dict) -> dict:
    body = dict(example["base"])
    draw = example["data"].draw
    for name in example["changes"]:
        if example["drop"] and name in body:
            del body[name]
        else:
            body[name] = draw(field_values(name), label=name)
    return body


# ---------------------------------------------------------------------------- fuzz
def server(which: str, model_server, relay_server):
    return model_server if which == "model" else relay_server


@pytest.mark.parametrize("which", ["model", "relay"])
@settings(FUZZ, max_examples=100)
@given(body=st.one_of(*[st.dictionaries(keys, json_values, max_size=8)] * 3, json_values))
def test_random_json_gets_json_200_or_4xx(which, model_server, relay_server, body):
    check(send(server(which, model_server, relay_server), body), which == "relay")


@pytest.mark.parametrize("which", ["model", "relay"])
@settings(FUZZ, max_examples=200)
@given(example=mutated)
def test_mutated_good_bodies_get_json_200_or_4xx(which, model_server, relay_server, example):
    check(send(server(which, model_server, relay_server), build_mutated(example)), which == "relay")


@settings(FUZZ, max_examples=150)
@given(raw=raw_bodies)
def test_raw_bodies_get_json_4xx(model_server, raw):
    r = send(model_server, raw=raw)
    check(r)
    if r.status_code == 200:  # only a valid object can be answered
        assert isinstance(json.loads(raw), dict)


# every number-like field, at and past every limit (a grid: no luck involved)
NUMERIC_FIELDS = [
    *("max_tokens", "temperature", "top_p", "top_k", "seed", "n", "best_of", "logprobs"),
    *("presence_penalty", "frequency_penalty", "prompt", "stop_token_ids"),
]
EDGES = [*EDGE_INTS, *EDGE_FLOATS, None, True, False]
SAMPLED = {"prompt": "Q: 1\nA: ", "max_tokens": 3, "temperature": 0.7, "seed": 5}


def with_value(field: str, value: Any) -> dict:
    if field.startswith("relay."):
        return {**SAMPLED, "relay": {field[len("relay.") :]: value}}
    if field in ("prompt", "stop_token_ids"):  # as a token id
        return {**SAMPLED, field: [3, value]}
    return {**SAMPLED, field: value}


@pytest.mark.parametrize(
    ("which", "field"),
    [("model", f) for f in NUMERIC_FIELDS]
    + [("relay", f) for f in NUMERIC_FIELDS + [f"relay.{r}" for r in RELAY_FIELDS]],
)
def test_numbers_at_and_past_every_limit(which, field, model_server, relay_server):
    srv = server(which, model_server, relay_server)
    with ThreadPoolExecutor(4) as pool:  # concurrent, so they share micro-batches too
        replies = list(pool.map(lambda v: send(srv, with_value(field, v)), EDGES))
    for value, r in zip(EDGES, replies, strict=True):
        assert r.status_code < 500, (field, value, r.text)
        data = check(r, which == "relay")
        if r.status_code != 200:
            assert data["error"]["param"] in (field, field.split(".")[0]), (value, data)


def test_server_answers_after_the_fuzz(model_server, relay_server):
    still_fine(model_server)
    still_fine(relay_server)


# ---------------------------------------------------------------------------- batch-mates
GOOD_MIX = [
    {"prompt": f"Q: {i}+{i}\nA: ", "max_tokens": 6, "temperature": t, "seed": i}
    for i in range(6)
    for t in (0, 0.8)
] + [
    {"prompt": [[5, 6], "Q: 9\nA: "], "max_tokens": 5, "temperature": 0},
    {"prompt": [7, 8, 9], "max_tokens": 6, "temperature": 1.0, "top_k": 5, "seed": 2**63 - 1},
]
BAD_MIX = [
    {**GOOD, "seed": 2**64},
    {**GOOD, "seed": 2**63},
    {**GOOD, "seed": -1},
    {**GOOD, "seed": True},
    {**GOOD, "max_tokens": 2.5},
    {**GOOD, "max_tokens": 0},
    {**GOOD, "max_tokens": 10**6},
    {**GOOD, "temperature": math.nan},
    {**GOOD, "temperature": 1e-300},
    {**GOOD, "prompt": [1, 10**9]},
    {**GOOD, "prompt": [-1]},
    {**GOOD, "prompt": []},
    {**GOOD, "relay": {"max_call_tokens": 2.5}},
    {**GOOD, "relay": {"mode": "fixed_help"}},
    {**GOOD, "relay": {"max_teacher_tokens": 6}},
    {**GOOD, "mode": "teacher"},
    b'{"prompt": ' + b"[" * 10_000 + b"]" * 10_000 + b"}",
    b"not json",
]


@pytest.mark.parametrize("which", ["model", "relay"])
def test_good_requests_beside_bad_ones_get_what_they_get_alone(which, model_server, relay_server):
    srv = model_server if which == "model" else relay_server
    good = GOOD_MIX
    if which == "relay":  # every allowed mode, and the relay engine's own largest seed
        good = [
            {**b, "relay": {"mode": m}, **({"seed": RELAY_MAX_SEED} if "seed" in b else {})}
            for b, m in zip(GOOD_MIX, [*ALLOWED] * len(GOOD_MIX), strict=False)
        ]
    replies = [send(srv, b) for b in good]
    assert [r.status_code for r in replies] == [200] * len(good), [r.text for r in replies]
    alone = [check(r, which == "relay")["choices"] for r in replies]
    mix: list[Any] = [*good, *BAD_MIX] * 2
    random.Random(15).shuffle(mix)
    if which == "model":
        model_server.engine.batch_sizes.clear()
    with ThreadPoolExecutor(16) as pool:
        replies = list(
            pool.map(lambda b: send(srv, raw=b) if isinstance(b, bytes) else send(srv, b), mix)
        )
    for body, r in zip(mix, replies, strict=True):
        data = check(r, which == "relay")
        if body in good:
            assert r.status_code == 200, r.text
            want = alone[good.index(body)]
            assert [c["token_ids"] for c in data["choices"]] == [c["token_ids"] for c in want]
        else:
            assert 400 <= r.status_code < 500, (body, r.text)
    if which == "model":
        assert max(model_server.engine.batch_sizes) > 1  # good and bad did share the queue
