"""The teacher never sees a call tag or part of one (project issue 15), in every mode and at
every hand-off.

Scripted students write commands, partial commands, stray close tags, nested opens, malformed
bodies and tags spelled out in ordinary tokens; a scripted teacher writes tags of its own; in
random_router mode hypothesis places the hand-offs itself (a scripted router) or draws router_p
and a seed for the real one. The teacher records every view it is given, and each is checked:
no tag token, no tag text, no text ending in the start of a tag; and it is exactly what
RelayTrace.teacher_view_ids rebuilds from the final trace cut at the hand-off. The same runs
check that accounting follows the tokens (the teacher's tokens are what it returned, each
hand-off delivers what the trace holds). Two tokenizers: the micro character tokenizer (tags
are special tokens, "<call>" can also be spelled one character at a time) and a byte-level one.
Finally real tiny models through TransformersBackend, with commands spliced into the student.
"""

from __future__ import annotations

import random
from collections.abc import Hashable, Sequence

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from relaypipe.micro.tokenizer import build_char_tokenizer
from relaypipe.relay.backends import GenRequest, GenResult
from relaypipe.relay.decoder import MODES, RelayConfig, RelayDecoder
from relaypipe.relay.grammar import CALL_CLOSE, CALL_OPEN, TAG_PREFIXES
from relaypipe.relay.sampling import Sampling
from relaypipe.relay.trace import RelayTrace, Source
from relaypipe.relay.transformers_backend import TransformersBackend
from tests.test_decoder import RoutedDecoder, ScriptedBackend, byte_tokenizer

S, T, C = Source.STUDENT, Source.TEACHER, Source.COMMAND
PROMPTS = ("Q: 1+2\nA: ", "Q: 33+4\nA: ", "Q: 5\nA: ")
TOKENIZERS = {"micro": build_char_tokenizer(), "bytes": byte_tokenizer()}


class Vocab:
    """Token ids of one tokenizer for building scripts."""

    def __init__(self, tok):
        self.tok = tok
        self.open, self.close = tok.convert_tokens_to_ids([CALL_OPEN, CALL_CLOSE])
        self.eos = tok.eos_token_id
        self.pieces: dict[int, str] = {}

    def text(self, s: str) -> list[int]:
        """``s`` tokenized: "<call>" becomes the tag token."""
        return self.tok(s, add_special_tokens=False).input_ids

    def spelled(self, s: str) -> list[int]:
        """``s`` without tag tokens: one token per character (micro) or byte (bytes)."""
        return [t for ch in s for t in self.text(ch)]

    def piece(self, token: int) -> str:
        if token not in self.pieces:
            self.pieces[token] = self.tok.decode([token], skip_special_tokens=True)
        return self.pieces[token]


VOCABS = {name: Vocab(tok) for name, tok in TOKENIZERS.items()}

# What a script is made of: ("text", s), ("spelled", s), ("open",), ("close",), ("eos",).
plain = st.text(alphabet="0123456789+=ab \n<>/", min_size=1, max_size=5).map(
    lambda s: [("spelled", s)]
)
digits = st.text(alphabet="0123456789", min_size=1, max_size=3)
body = st.one_of(digits, st.sampled_from(["", "x", " 1 ", "-2", "1.5", "0"]))
SPELLED = [CALL_OPEN, CALL_CLOSE, "<call>3</call>", "<", "<c", "<ca", "<call", "</", "</cal", "<<"]
command = st.integers(1, 30).map(lambda n: [("open",), ("spelled", str(n)), ("close",)])
student_piece = st.one_of(
    plain,
    command,  # a call (twice: as likely as plain text)
    command,
    body.map(lambda b: [("open",), ("spelled", b), ("close",)]),  # a command (maybe malformed)
    digits.map(lambda d: [("open",), ("spelled", d)]),  # a command not closed (yet)
    st.just([("open",)]),
    st.just([("close",)]),  # a stray close tag
    st.tuples(digits, digits).map(  # nested
        lambda p: [("open",), ("spelled", p[0]), ("open",), ("spelled", p[1]), ("close",)]
    ),
    st.sampled_from(SPELLED).map(lambda s: [("spelled", s)]),  # tags spelled in characters
)
teacher_piece = st.one_of(
    plain,
    st.just([("open",)]),
    st.just([("close",)]),
    digits.map(lambda d: [("open",), ("spelled", d), ("close",)]),
    st.sampled_from(SPELLED).map(lambda s: [("spelled", s)]),
)


def script(piece_strategy, max_pieces: int, min_pieces: int = 0):
    """A stream of pieces, maybe ending in EOS."""
    pieces = st.lists(piece_strategy, min_size=min_pieces, max_size=max_pieces)
    return st.tuples(pieces, st.booleans()).map(
        lambda x: [item for p in x[0] for item in p] + ([("eos",)] if x[1] else [])
    )


def ids_of(vocab: Vocab, items) -> list[int]:
    out: list[int] = []
    for item in items:
        kind = item[0]
        if kind == "spelled":
            out += vocab.spelled(item[1])
        else:
            out.append({"open": vocab.open, "close": vocab.close, "eos": vocab.eos}[kind])
    return out


request = st.fixed_dictionaries(
    {
        "student": script(student_piece, 10, min_pieces=1),
        "teacher": script(teacher_piece, 6),
        # None: the real router (router_p and seed as drawn); else the router's draws in
        # order, True where it gives a token to the teacher (router_p = 0.5)
        "route": st.one_of(st.none(), st.lists(st.booleans(), max_size=60)),
    }
)
config = st.fixed_dictionaries(
    {
        "max_new_tokens": st.integers(1, 60),
        "max_turns": st.integers(1, 30),
        "max_call_tokens": st.integers(1, 6),
        "max_teacher_tokens": st.one_of(st.none(), st.none(), st.integers(0, 12)),
        "max_calls": st.one_of(st.none(), st.none(), st.integers(0, 3)),
        "router_p": st.sampled_from([0.0, 0.05, 0.2, 0.5, 0.8, 1.0]),
        "fixed_n": st.integers(1, 4),
        "seed": st.integers(0, 2**16),
    }
)


def check_view(vocab: Vocab, view: list[int], prompt: list[int]) -> None:
    """No tag token, no tag text, nothing that ends in the start of a tag."""
    assert view[: len(prompt)] == prompt
    assert vocab.open not in view and vocab.close not in view
    for skip in (False, True):
        whole = vocab.tok.decode(view, skip_special_tokens=skip)
        assert CALL_OPEN not in whole and CALL_CLOSE not in whole, whole
        generated = vocab.tok.decode(view[len(prompt) :], skip_special_tokens=skip)
        assert not generated.endswith(TAG_PREFIXES), generated


def ignore(_: str) -> None:
    """A ``note`` for checks outside hypothesis."""


def check_request(
    vocab: Vocab, tr: RelayTrace, student, teacher, cfg: RelayConfig, note=event
) -> None:
    """Every view of request ``tr`` is clean and the trace accounts for it. ``note`` records
    what happened (hypothesis statistics)."""
    i = tr.request_id
    views = teacher.seen.get(i, [])
    assert len(views) == len(tr.handoffs)
    for view, h in zip(views, tr.handoffs, strict=True):
        check_view(vocab, view, tr.prompt_ids)
        # the trace explains exactly what the teacher saw
        cut = RelayTrace(
            request_id=i,
            prompt_ids=tr.prompt_ids,
            token_ids=tr.token_ids[: h.start],
            sources=tr.sources[: h.start],
        )
        assert view == cut.teacher_view_ids((vocab.open, vocab.close), vocab.piece)
        assert h.context_tokens == len(view)
    # accounting: the teacher's tokens are what it returned, where the hand-offs put them
    spans = [k for h in tr.handoffs for k in range(h.start, h.start + h.delivered)]
    assert [k for k, s in enumerate(tr.sources) if s == T] == spans
    assert [tr.token_ids[k] for k in spans] == [t for r in teacher.replies.get(i, []) for t in r]
    assert tr.n_teacher == sum(h.delivered for h in tr.handoffs) <= cfg.max_new_tokens
    assert len(tr.token_ids) == len(tr.sources) <= cfg.max_new_tokens
    if cfg.max_teacher_tokens is not None and cfg.mode in ("relay", "fixed_help"):
        assert tr.n_teacher <= cfg.max_teacher_tokens
    # every tag token the student wrote is part of a command
    for t, s in zip(tr.token_ids, tr.sources, strict=True):
        if t in (vocab.open, vocab.close) and s != T:
            assert s == C
    # the student always continued its own view: everything so far, commands included
    for ctx in student.seen.get(i, []):
        assert ctx == tr.prompt_ids + tr.token_ids[: len(ctx) - len(tr.prompt_ids)]
    if cfg.mode == "student":
        assert not tr.handoffs
    if cfg.mode == "teacher" and not views:  # a teacher budget of 0: no call, nothing written
        assert not tr.token_ids and 0 in (cfg.max_calls, cfg.max_teacher_tokens)
    elif cfg.mode == "teacher":  # the first view is the prompt alone
        assert views[0] == tr.prompt_ids
    for e in tr.events:
        if e.kind == "unterminated" and "abandoned" in e.detail:
            note("a hand-off abandoned an open command")
        if e.kind == "malformed":
            note("a malformed command")


def decode_and_check(vocab: Vocab, requests: list[dict], cfg_kwargs: dict) -> None:
    routes = {i: r["route"] for i, r in enumerate(requests) if r["route"] is not None}
    if routes and cfg_kwargs["mode"] == "random_router":
        cfg_kwargs = {**cfg_kwargs, "router_p": 0.5}
    else:
        routes = {}
    cfg = RelayConfig(**cfg_kwargs)
    student = ScriptedBackend(
        vocab.tok, {i: [ids_of(vocab, r["student"])] for i, r in enumerate(requests)}, stream=True
    )
    teacher = ScriptedBackend(
        vocab.tok, {i: [ids_of(vocab, r["teacher"])] for i, r in enumerate(requests)}, stream=True
    )
    decoder = RoutedDecoder(student, teacher, vocab.tok, cfg, routes=routes)
    traces = decoder.decode([vocab.text(PROMPTS[i]) for i in range(len(requests))])
    for tr in traces:
        check_request(vocab, tr, student, teacher, cfg)
    event(f"mode {cfg.mode}" + (", with hand-offs" if any(t.handoffs for t in traces) else ""))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(TOKENIZERS))
@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(requests=st.lists(request, min_size=1, max_size=3), cfg=config)
def test_no_view_holds_a_tag_or_part_of_one_in_any_mode(name, mode, requests, cfg):
    decode_and_check(VOCABS[name], requests, {**cfg, "mode": mode})


# Hand-offs at every position of streams full of commands: the router's draws say exactly
# which generated token is the teacher's.
dense_piece = st.one_of(
    digits.map(lambda d: [("open",), ("spelled", d), ("close",)]),
    digits.map(lambda d: [("open",), ("spelled", d)]),
    st.just([("open",)]),
    st.just([("close",)]),
    st.sampled_from(["<ca", "</", "1", "<call>"]).map(lambda s: [("spelled", s)]),
)


@settings(max_examples=400)
@given(
    student=st.lists(dense_piece, min_size=1, max_size=12).map(lambda x: [i for p in x for i in p]),
    teacher=script(teacher_piece, 8),
    route=st.lists(st.booleans(), min_size=1, max_size=50),
    max_new_tokens=st.integers(4, 40),
)
def test_router_hand_offs_inside_commands_never_show_them(student, teacher, route, max_new_tokens):
    cfg = {
        "mode": "random_router",
        "router_p": 0.5,
        "max_new_tokens": max_new_tokens,
        "max_turns": 64,
        "seed": 0,
    }
    decode_and_check(
        VOCABS["micro"], [{"student": student, "teacher": teacher, "route": route}], cfg
    )


def test_every_hand_off_position_in_one_command_stream():
    """Exhaustive: one teacher token at each position of a stream of commands and pieces."""
    vocab = VOCABS["micro"]
    items = [("spelled", "1+"), ("open",), ("spelled", "23"), ("close",), ("spelled", "4")]
    items += [("open",), ("spelled", "5"), ("open",), ("spelled", "6"), ("close",)]
    items += [("spelled", "<call>7</cal"), ("open",), ("spelled", "8"), ("eos",)]
    n = len(ids_of(vocab, items))
    abandoned = 0
    for k in range(n):
        for run in (1, 3):
            route = [False] * k + [True] * run + [False] * 60
            cfg = {"mode": "random_router", "router_p": 0.5, "max_new_tokens": 64, "seed": 0}
            req = {"student": items, "teacher": [("spelled", "XYZ")], "route": route}
            student = ScriptedBackend(vocab.tok, {0: [ids_of(vocab, items)]}, stream=True)
            teacher = ScriptedBackend(vocab.tok, {0: [vocab.spelled("XYZ")]}, stream=True)
            dec = RoutedDecoder(student, teacher, vocab.tok, RelayConfig(**cfg), routes={0: route})
            (tr,) = dec.decode([vocab.text(PROMPTS[0])])
            check_request(vocab, tr, student, teacher, RelayConfig(**cfg), note=ignore)
            assert len(tr.handoffs) == 1 and tr.handoffs[0].start == k, (k, req)
            abandoned += any("abandoned" in e.detail for e in tr.events)
    assert abandoned >= 8  # hand-offs inside commands really happened


# Real tiny models through TransformersBackend: a student whose turns are now and then a
# scripted fragment (a command, a partial one, a stray tag) and otherwise its own sampling.


class SplicingStudent:
    """A real backend whose reply to a request is, per turn, either the next scripted fragment
    (cut at the stop token or max_new_tokens, like a model) or, for None, the model's own."""

    def __init__(self, backend: TransformersBackend, fragments: dict[int, list[list[int] | None]]):
        self.backend = backend
        self.eos_token_ids = backend.eos_token_ids
        self.fragments = fragments
        self.seen: dict[int, list[list[int]]] = {}

    def generate(
        self,
        requests: Sequence[GenRequest],
        *,
        stop_token_ids: frozenset[int] = frozenset(),
        sampling: Sampling = Sampling(),
    ) -> list[GenResult]:
        out: list[GenResult | None] = [None] * len(requests)
        real = []
        for k, r in enumerate(requests):
            self.seen.setdefault(r.key[1], []).append(list(r.context))
            queue = self.fragments.get(r.key[1], [])
            frag = queue.pop(0) if queue else None
            if frag is None:
                real.append(k)
                continue
            toks, finish = [], "length"
            for t in frag[: r.max_new_tokens]:
                toks.append(t)
                if t in stop_token_ids:
                    finish = "stop"
                    break
            out[k] = GenResult(tokens=toks, finish=finish, prefill_tokens=len(r.context))
        results = self.backend.generate(
            [requests[k] for k in real], stop_token_ids=stop_token_ids, sampling=sampling
        )
        for k, res in zip(real, results, strict=True):
            out[k] = res
        return out  # type: ignore[return-value]

    def release(self, key: Hashable) -> None:
        self.backend.release(key)


class RecordingBackend:
    """A real backend that records every context it is given."""

    def __init__(self, backend: TransformersBackend):
        self.backend = backend
        self.eos_token_ids = backend.eos_token_ids
        self.seen: dict[int, list[list[int]]] = {}
        self.replies: dict[int, list[list[int]]] = {}

    def generate(self, requests, *, stop_token_ids=frozenset(), sampling=Sampling()):
        results = self.backend.generate(requests, stop_token_ids=stop_token_ids, sampling=sampling)
        for r, res in zip(requests, results, strict=True):
            self.seen.setdefault(r.key[1], []).append(list(r.context))
            self.replies.setdefault(r.key[1], []).append(list(res.tokens))
        return results

    def release(self, key: Hashable) -> None:
        self.backend.release(key)


@pytest.mark.parametrize("seed", range(4))
def test_real_tiny_models_with_commands_spliced_in(tiny_models, seed):
    vocab = VOCABS["micro"]
    o, c = vocab.open, vocab.close
    d = vocab.spelled
    fragments = [[o, *d("12")], [o], [*d("3"), c], [c], [o, *d("4"), c], [*d("<ca")], None, None]
    prompts = [vocab.text(p) for p in PROMPTS]
    rng = random.Random(seed)
    script = {i: [rng.choice(fragments) for _ in range(12)] for i in range(len(prompts))}
    student = SplicingStudent(TransformersBackend(tiny_models[0]), {})
    teacher = RecordingBackend(TransformersBackend(tiny_models[1]))
    sampling = Sampling(temperature=1.0)
    for mode in MODES:
        student.fragments = {i: list(f) for i, f in script.items()}  # the same script each mode
        student.seen, teacher.seen, teacher.replies = {}, {}, {}
        cfg = RelayConfig(
            mode=mode,
            router_p=0.3,
            max_new_tokens=40,
            seed=seed,
            student_sampling=sampling,
            teacher_sampling=sampling,
        )
        traces = RelayDecoder(student, teacher, vocab.tok, cfg).decode(prompts)
        for tr in traces:
            check_request(vocab, tr, student, teacher, cfg, note=ignore)
        if mode == "random_router":  # the router really handed over inside commands
            assert any("abandoned" in e.detail for tr in traces for e in tr.events)
