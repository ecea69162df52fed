"""The decoder's own budgets hold in every mode (project issue 15).

``max_teacher_tokens`` and ``max_calls`` bound every request whatever its mode: relay and
fixed_help refuse or clip commands, random_router stops handing over once a budget is spent
(the student writes the rest, so a request still gets its full length), teacher mode ends with
stop reason ``max_teacher_tokens`` (or ``max_calls`` / ``max_teacher_tokens`` at once for a
budget of 0). While the budgets are not binding the tokens are what they are without them.

Scripted students and teachers (hypothesis), real tiny models, and the relay server over HTTP,
which relies on the decoder's cap alone (it no longer lowers a request's ``max_tokens``).
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from relaypipe.relay.decoder import MODES, RelayConfig, RelayDecoder
from relaypipe.relay.sampling import Sampling
from relaypipe.relay.trace import RelayTrace, Source, StopReason
from relaypipe.relay.transformers_backend import TransformersBackend
from relaypipe.serve import (
    ApiError,
    CompletionParams,
    RelayEngine,
    RelayOptions,
    ServeLimits,
    ServerThread,
    make_app,
)
from tests.test_decoder import RoutedDecoder, ScriptedBackend
from tests.test_serve import post
from tests.test_teacher_view import PROMPTS, VOCABS, Vocab, ids_of
from tests.test_teacher_view import request as request_strategy

S, T, C = Source.STUDENT, Source.TEACHER, Source.COMMAND
ENDED_BY_EOS = (StopReason.STUDENT_EOS, StopReason.TEACHER_EOS)


# ---------------------------------------------------------------------------- scripted runs
def scripted_decode(vocab: Vocab, requests: list[dict], cfg: RelayConfig) -> list[RelayTrace]:
    """Decode scripted requests (student and teacher streams, optional router scripts)."""
    routes = {i: r["route"] for i, r in enumerate(requests) if r["route"] is not None}
    if cfg.mode != "random_router" or cfg.router_p != 0.5:
        routes = {}
    student = ScriptedBackend(
        vocab.tok, {i: [ids_of(vocab, r["student"])] for i, r in enumerate(requests)}, stream=True
    )
    teacher = ScriptedBackend(
        vocab.tok, {i: [ids_of(vocab, r["teacher"])] for i, r in enumerate(requests)}, stream=True
    )
    decoder = RoutedDecoder(student, teacher, vocab.tok, cfg, routes=routes)
    return decoder.decode([vocab.text(PROMPTS[i]) for i in range(len(requests))])


def check_budgets(tr: RelayTrace, cfg: RelayConfig, eos: int, note=event) -> None:
    """The budgets and bounds hold, and each mode meets a spent budget as documented. ``note``
    records what happened (hypothesis statistics)."""
    if cfg.max_teacher_tokens is not None:
        assert tr.n_teacher <= cfg.max_teacher_tokens
    if cfg.max_calls is not None:
        assert tr.calls <= cfg.max_calls
    assert len(tr.token_ids) == len(tr.sources) <= cfg.max_new_tokens
    assert tr.n_teacher == sum(h.delivered for h in tr.handoffs)
    for h in tr.handoffs:
        assert 1 <= h.granted <= h.requested and h.delivered <= h.granted
    if cfg.mode == "student":
        assert not tr.handoffs
    if cfg.mode == "teacher":
        if cfg.max_calls == 0:
            assert not tr.token_ids and tr.stop_reason == StopReason.MAX_CALLS
            return
        if cfg.max_teacher_tokens == 0:
            assert not tr.token_ids and tr.stop_reason == StopReason.MAX_TEACHER_TOKENS
            return
        first = tr.handoffs[0]
        assert first.start == 0 and first.requested == cfg.max_new_tokens
        assert first.granted == min(cfg.max_new_tokens, cfg.max_teacher_tokens or 10**9)
        if tr.stop_reason == StopReason.MAX_TEACHER_TOKENS:
            assert tr.n_teacher == cfg.max_teacher_tokens < cfg.max_new_tokens
        spent = first.delivered == first.granted == cfg.max_teacher_tokens
        if spent and tr.token_ids[first.granted - 1] != eos and first.granted < cfg.max_new_tokens:
            # the teacher wrote its budget: the request ends there, nobody else writes
            assert tr.stop_reason == StopReason.MAX_TEACHER_TOKENS
            assert tr.sources == [T] * cfg.max_teacher_tokens
            note("teacher mode: ended by its teacher budget")
    if cfg.mode == "random_router":
        # the router ignores max_turns: a request ends at an EOS or at its full length, so
        # a spent budget never shortens it (the student writes the rest)
        assert tr.stop_reason in (*ENDED_BY_EOS, StopReason.MAX_NEW_TOKENS)
        if tr.stop_reason == StopReason.MAX_NEW_TOKENS:
            assert len(tr.token_ids) == cfg.max_new_tokens
        spent = (cfg.max_calls is not None and tr.calls == cfg.max_calls) or (
            cfg.max_teacher_tokens is not None and tr.n_teacher == cfg.max_teacher_tokens
        )
        if spent and tr.stop_reason == StopReason.MAX_NEW_TOKENS:
            note("random_router: a spent budget, the student wrote the rest")


def binds(free: RelayTrace, cfg: RelayConfig) -> bool:
    """Whether the budgets of ``cfg`` would have changed the unbudgeted run ``free``. In teacher
    mode the request ends as soon as its teacher budget is spent, so reaching it binds."""
    calls = cfg.max_calls is not None and free.calls > cfg.max_calls
    tokens = cfg.max_teacher_tokens is not None and (
        free.n_teacher > cfg.max_teacher_tokens
        or (cfg.mode == "teacher" and free.n_teacher == cfg.max_teacher_tokens)
    )
    return calls or tokens


def same_tokens(a: RelayTrace, b: RelayTrace) -> None:
    assert a.token_ids == b.token_ids and a.sources == b.sources
    assert a.stop_reason == b.stop_reason
    assert [(h.start, h.delivered) for h in a.handoffs] == [
        (h.start, h.delivered) for h in b.handoffs
    ]


budget_config = st.fixed_dictionaries(
    {
        "max_new_tokens": st.integers(1, 40),
        "max_turns": st.integers(1, 30),
        "max_call_tokens": st.integers(1, 8),
        # small budgets often: scripted teachers often end a request at their first call
        "max_teacher_tokens": st.one_of(st.none(), st.integers(0, 3), st.integers(0, 12)),
        "max_calls": st.one_of(st.none(), st.integers(0, 1), st.integers(0, 4)),
        "router_p": st.sampled_from([0.05, 0.2, 0.5, 0.8, 1.0]),
        "fixed_n": st.integers(1, 5),
        "seed": st.integers(0, 2**16),
    }
)


@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(requests=st.lists(request_strategy, min_size=1, max_size=3), kwargs=budget_config)
def test_budgets_hold_in_every_mode(mode, requests, kwargs):
    vocab = VOCABS["micro"]
    cfg = RelayConfig(mode=mode, **kwargs)
    traces = scripted_decode(vocab, requests, cfg)
    free_cfg = dataclasses.replace(cfg, max_teacher_tokens=None, max_calls=None)
    free = scripted_decode(vocab, requests, free_cfg)
    for tr, unbounded in zip(traces, free, strict=True):
        check_budgets(tr, cfg, vocab.eos)
        if not binds(unbounded, cfg):
            same_tokens(tr, unbounded)
            event("budgets not binding: the same tokens as without them")
        else:
            event("budgets binding")


# ---------------------------------------------------------------------------- exact transcripts
def text(tokenizer, ids):
    return tokenizer.decode(ids)


def routed(tokenizer, student, teacher, route, **cfg):
    config = RelayConfig(mode="random_router", router_p=0.5, **cfg)
    dec = RoutedDecoder(
        ScriptedBackend(tokenizer, {0: student}, stream=True),
        ScriptedBackend(tokenizer, {0: teacher}),
        tokenizer,
        config,
        routes={0: route},
    )
    (tr,) = dec.decode_text(["Q: 1\nA: "])
    return tr


def test_router_clips_a_run_to_the_teacher_budget_then_the_student_writes_the_rest(tokenizer):
    # the router gives tokens 2..5 to the teacher (a run of 4), then would again at token 8
    # (token 6 takes no draw: the draw that ended the run was its own)
    route = [False, False, True, True, True, True, False, False, True] + [False] * 40
    free = routed(tokenizer, ["abcdefghijklmnop"], ["WXYZ", "Q"], route, max_new_tokens=12)
    assert text(tokenizer, free.token_ids) == "abWXYZcdQefg"
    assert [(h.start, h.requested, h.granted) for h in free.handoffs] == [(2, 4, 4), (8, 1, 1)]
    tr = routed(
        tokenizer,
        ["abcdefghijklmnop"],
        ["WXYZ", "Q"],
        route,
        max_new_tokens=12,
        max_teacher_tokens=3,
    )
    assert text(tokenizer, tr.token_ids) == "abWXYcdefghi"
    assert tr.sources == [S, S, T, T, T] + [S] * 7
    assert [(h.start, h.requested, h.granted) for h in tr.handoffs] == [(2, 4, 3)]
    assert tr.stop_reason == StopReason.MAX_NEW_TOKENS and not tr.events


def test_router_hand_offs_count_as_calls(tokenizer):
    # the router hands one token to the teacher at tokens 0, 3 and 6 (tokens 1 and 4 take no
    # draw: the one that ended the teacher's run before them was theirs)
    route = [True, False, False, True, False, False, True] + [False] * 40
    free = routed(tokenizer, ["abcdefghij"], ["X", "Y", "Z"], route, max_new_tokens=8)
    assert text(tokenizer, free.token_ids) == "XabYcdZe" and free.calls == 3
    tr = routed(tokenizer, ["abcdefghij"], ["X", "Y", "Z"], route, max_new_tokens=8, max_calls=2)
    assert text(tokenizer, tr.token_ids) == "XabYcdef" and tr.calls == 2
    assert tr.stop_reason == StopReason.MAX_NEW_TOKENS
    tr = routed(tokenizer, ["abcdefghij"], ["X"], route, max_new_tokens=8, max_calls=0)
    assert text(tokenizer, tr.token_ids) == "abcdefgh" and tr.sources == [S] * 8


def test_a_spent_router_budget_leaves_commands_blocked(tokenizer):
    route = [True] * 60
    tr = routed(
        tokenizer, ["a<call>3</call>bcd<eos>"], ["XY"], route, max_new_tokens=32, max_calls=1
    )
    assert text(tokenizer, tr.token_ids) == "XYa<call>3</call>bcd<eos>"
    assert [e.kind for e in tr.events] == ["blocked"]
    assert tr.calls == 1 and tr.stop_reason == StopReason.STUDENT_EOS


def teacher_run(tokenizer, teacher, **cfg):
    student = ScriptedBackend(tokenizer, {0: ["never<eos>"]})
    dec = RelayDecoder(
        student,
        ScriptedBackend(tokenizer, {0: teacher}),
        tokenizer,
        RelayConfig(mode="teacher", **cfg),
    )
    (tr,) = dec.decode_text(["Q: 1\nA: "])
    assert not student.seen
    return tr


def test_teacher_mode_ends_when_its_budget_is_spent(tokenizer):
    tr = teacher_run(tokenizer, ["abcdefgh"], max_new_tokens=6, max_teacher_tokens=4)
    assert text(tokenizer, tr.token_ids) == "abcd" and tr.sources == [T] * 4
    assert tr.stop_reason == StopReason.MAX_TEACHER_TOKENS
    assert [(h.requested, h.granted, h.delivered) for h in tr.handoffs] == [(6, 4, 4)]
    # not binding: the same as without a budget
    for budget in (6, 7, None):
        tr = teacher_run(tokenizer, ["abcdefgh"], max_new_tokens=6, max_teacher_tokens=budget)
        assert text(tokenizer, tr.token_ids) == "abcdef"
        assert tr.stop_reason == StopReason.MAX_NEW_TOKENS
    # an EOS within the budget is an EOS
    tr = teacher_run(tokenizer, ["ab<eos>"], max_new_tokens=6, max_teacher_tokens=3)
    assert tr.stop_reason == StopReason.TEACHER_EOS


@pytest.mark.parametrize(
    ("budgets", "reason"),
    [
        ({"max_calls": 0}, StopReason.MAX_CALLS),
        ({"max_teacher_tokens": 0}, StopReason.MAX_TEACHER_TOKENS),
        ({"max_calls": 0, "max_teacher_tokens": 0}, StopReason.MAX_CALLS),
    ],
)
def test_teacher_mode_with_a_zero_budget_writes_nothing(tokenizer, budgets, reason):
    tr = teacher_run(tokenizer, ["abc"], max_new_tokens=6, **budgets)
    assert tr.token_ids == [] and tr.handoffs == [] and tr.stop_reason == reason


def test_teacher_mode_with_one_call_allowed_makes_it(tokenizer):
    tr = teacher_run(tokenizer, ["abcdef"], max_new_tokens=6, max_calls=1)
    assert tr.calls == 1 and tr.stop_reason == StopReason.MAX_NEW_TOKENS


# ---------------------------------------------------------------------------- real tiny models
@pytest.mark.parametrize("mode", MODES)
def test_real_models_hold_budgets_and_keep_tokens_when_not_binding(tiny_models, tokenizer, mode):
    student, teacher = tiny_models
    dec = RelayDecoder(TransformersBackend(student), TransformersBackend(teacher), tokenizer)
    hot = Sampling(temperature=1.0)
    base = RelayConfig(
        mode=mode,
        router_p=0.3,
        max_new_tokens=24,
        seed=5,
        student_sampling=hot,
        teacher_sampling=hot,
    )
    prompts = list(PROMPTS)
    free = dec.decode_text(prompts, base)
    most = max(t.n_teacher for t in free)
    calls = max(t.calls for t in free)
    loose = dataclasses.replace(base, max_teacher_tokens=most + 1, max_calls=calls + 1)
    for a, b in zip(free, dec.decode_text(prompts, loose), strict=True):
        same_tokens(a, b)
    notes: list[str] = []
    for budgets in ({"max_teacher_tokens": 2}, {"max_calls": 1}, {"max_teacher_tokens": 0}):
        cfg = dataclasses.replace(base, **budgets)
        for tr in dec.decode_text(prompts, cfg):
            check_budgets(tr, cfg, tokenizer.eos_token_id, note=notes.append)
    if mode == "random_router":  # the budgets above really bound
        assert most > 2 and calls > 1
        assert "random_router: a spent budget, the student wrote the rest" in notes
    if mode == "teacher":
        assert "teacher mode: ended by its teacher budget" in notes


# ---------------------------------------------------------------------------- the server
@pytest.fixture(scope="module")
def router_server(tiny_models, tokenizer):
    """A random_router relay server: every token the teacher's, budgets capped by the operator."""
    student, teacher = tiny_models
    dec = RelayDecoder(TransformersBackend(student), TransformersBackend(teacher), tokenizer)
    cfg = RelayConfig(mode="random_router", router_p=1.0, max_teacher_tokens=5, max_calls=3, seed=2)
    engine = RelayEngine(dec, "relay", cfg)
    with ServerThread(make_app(engine, limits=ServeLimits(max_tokens=24))) as srv:
        srv.decoder, srv.config = dec, cfg
        yield srv


@pytest.mark.parametrize(
    ("relay", "budget"),
    [({"max_teacher_tokens": 2}, 2), ({"max_teacher_tokens": None}, 5), ({}, 5), (None, 5)],
)
def test_router_request_with_a_small_budget_gets_its_full_length(router_server, relay, budget):
    body = {"prompt": [PROMPTS[0], PROMPTS[1]], "max_tokens": 16, "temperature": 0}
    if relay is not None:
        body["relay"] = relay
    r = post(router_server, {**body, "return_token_ids": True})
    assert r.status_code == 200, r.text
    cfg = dataclasses.replace(
        router_server.config, max_new_tokens=16, max_teacher_tokens=budget, seed=2
    )
    want = router_server.decoder.decode_text(body["prompt"], cfg)
    for choice, tr in zip(r.json()["choices"], want, strict=True):
        info = choice["relay"]
        assert choice["token_ids"] == tr.token_ids
        # router_p = 1: the teacher writes until its budget is spent, the student the rest
        assert info["sources"][:budget] == ["teacher"] * budget
        assert "teacher" not in info["sources"][budget:]
        assert info["teacher_tokens"] == budget and info["calls"] == 1
        assert len(choice["token_ids"]) == 16 and choice["finish_reason"] == "length"
        assert info["stop_reason"] == StopReason.MAX_NEW_TOKENS
        assert choice["relay"]["handoffs"][0]["requested"] == 16
        assert choice["relay"]["handoffs"][0]["granted"] == budget


def test_router_request_with_a_zero_budget_is_the_student_alone(router_server):
    body = {"prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0}
    for relay in ({"max_teacher_tokens": 0}, {"max_calls": 0}):
        r = post(router_server, {**body, "relay": relay})
        assert r.status_code == 200, r.text
        (choice,) = r.json()["choices"]
        assert "teacher" not in choice["relay"]["sources"]
        assert len(choice["relay"]["sources"]) == 12 and choice["relay"]["calls"] == 0


def test_teacher_request_stops_at_its_budget_over_http(router_server):
    body = {"prompt": PROMPTS[0], "max_tokens": 16, "temperature": 0}
    r = post(router_server, {**body, "relay": {"mode": "teacher", "max_teacher_tokens": 3}})
    assert r.status_code == 200, r.text
    (choice,) = r.json()["choices"]
    assert choice["relay"]["sources"] == ["teacher"] * 3
    assert choice["relay"]["stop_reason"] == StopReason.MAX_TEACHER_TOKENS
    assert choice["finish_reason"] == "length"
    for relay in ({"max_teacher_tokens": 0}, {"max_calls": 0}):
        r = post(router_server, {**body, "relay": {"mode": "teacher", **relay}})
        assert r.status_code == 400 and r.json()["error"]["param"] == f"relay.{next(iter(relay))}"
    r = post(router_server, {**body, "relay": {"max_teacher_tokens": 6}})
    assert r.status_code == 400 and "cap of 5" in r.json()["error"]["message"]


def test_the_engine_passes_max_tokens_and_caps_through_unchanged(router_server):
    engine = RelayEngine(router_server.decoder, "relay", router_server.config)

    def config(**relay):
        params = CompletionParams(max_tokens=20, sampling=Sampling(), relay=RelayOptions(**relay))
        return engine.config_for(params)

    for mode in MODES:
        cfg = config(mode=mode, max_teacher_tokens=1, max_calls=1)
        assert (cfg.max_new_tokens, cfg.max_teacher_tokens, cfg.max_calls) == (20, 1, 1)
        cfg = config(mode=mode)  # absent: the operator's caps
        assert (cfg.max_new_tokens, cfg.max_teacher_tokens, cfg.max_calls) == (20, 5, 3)
    with pytest.raises(ApiError, match="cap of 3"):
        config(max_calls=4)
