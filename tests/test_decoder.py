"""The relay decoder against scripted backends (exact transcripts) and tiny real models."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Hashable, Sequence

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from relaypipe.relay.backends import GenRequest, GenResult
from relaypipe.relay.decoder import RelayConfig, RelayDecoder
from relaypipe.relay.grammar import CALL_CLOSE, CALL_OPEN
from relaypipe.relay.sampling import Sampling
from relaypipe.relay.trace import Source, StopReason
from relaypipe.relay.transformers_backend import TransformersBackend

S, T, C = Source.STUDENT, Source.TEACHER, Source.COMMAND


class ScriptedBackend:
    """Replies to request i with the next chunk of script[i], cut like a real model would be:
    at the first stop token (included) or at max_new_tokens. Records every context it saw and
    every reply it gave. A chunk is text or a list of token ids (to spell what the tokenizer
    would merge, e.g. ``<call>`` out of single characters). With ``stream=True`` the chunks
    are one stream and a cut leaves the rest for the next reply; without, the rest of a cut
    chunk is dropped. An exhausted script replies EOS."""

    def __init__(self, tokenizer, scripts: dict[int, list], stream: bool = False):
        self.tok = tokenizer
        self.eos_token_ids = frozenset([tokenizer.eos_token_id])
        self.stream = stream
        self.queues = {i: [self._ids(c) for c in chunks] for i, chunks in scripts.items()}
        if stream:
            self.queues = {i: [[t for c in q for t in c]] for i, q in self.queues.items()}
        self.seen: dict[int, list[list[int]]] = defaultdict(list)
        self.replies: dict[int, list[list[int]]] = defaultdict(list)
        self.released: list[Hashable] = []

    def _ids(self, chunk: str | list[int]) -> list[int]:
        if not isinstance(chunk, str):
            return list(chunk)
        return self.tok(chunk, add_special_tokens=False).input_ids

    def generate(
        self,
        requests: Sequence[GenRequest],
        *,
        stop_token_ids=frozenset(),
        sampling=Sampling(),
    ) -> list[GenResult]:
        out = []
        for r in requests:
            i = r.key[1]
            self.seen[i].append(list(r.context))
            queue = self.queues.setdefault(i, [])
            if self.stream:
                chunk = queue[0] if queue and queue[0] else [self.tok.eos_token_id]
            else:
                chunk = queue.pop(0) if queue else [self.tok.eos_token_id]
            toks, finish = [], "length"
            for t in chunk[: r.max_new_tokens]:
                toks.append(t)
                if t in stop_token_ids:
                    finish = "stop"
                    break
                if t in self.eos_token_ids:
                    finish = "eos"
                    break
            if self.stream and queue:
                del queue[0][: len(toks)]
            self.replies[i].append(toks)
            out.append(GenResult(tokens=toks, finish=finish, prefill_tokens=len(r.context)))
        return out

    def release(self, key: Hashable) -> None:
        self.released.append(key)


class ScriptedRouter(random.Random):
    """A router RNG that returns ``draws`` first (then seeded draws): hand-offs at chosen
    places. The decoder gives a token to the teacher when a draw is below router_p."""

    def __init__(self, draws: Sequence[float], seed: int = 0):
        super().__init__(seed)
        self.draws = list(draws)
        self.used = 0

    def random(self) -> float:
        self.used += 1
        return self.draws.pop(0) if self.draws else super().random()


class RoutedDecoder(RelayDecoder):
    """A RelayDecoder whose random router follows a script per request id: ``routes[i]`` is
    a list of booleans, True where the router's next draw gives a token to the teacher (with
    router_p = 0.5). Requests without a route use the real router."""

    def __init__(self, *args, routes: dict[int, Sequence[bool]], **kwargs):
        super().__init__(*args, **kwargs)
        self.routes = routes
        self.routers: dict[int, ScriptedRouter] = {}

    def _new_router(self, cfg: RelayConfig, request_id: int) -> random.Random:
        if request_id not in self.routes:
            return super()._new_router(cfg, request_id)
        assert cfg.router_p == 0.5, "a scripted route reads draws against router_p = 0.5"
        draws = [0.0 if teacher else 0.99 for teacher in self.routes[request_id]]
        router = self.routers[request_id] = ScriptedRouter(draws, seed=request_id)
        return router


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (no merges: one token per UTF-8 byte) with the call tags and EOS
    as special tokens: it spells any text, non-ASCII digits included (the micro tokenizer
    knows printable ASCII only)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False)
    fast.add_special_tokens(
        {"eos_token": "<eos>", "additional_special_tokens": [CALL_OPEN, CALL_CLOSE]}
    )
    return fast


def run(tokenizer, student_script, teacher_script, prompts=("Q: 1\nA: ",), **cfg):
    student = ScriptedBackend(tokenizer, student_script)
    teacher = ScriptedBackend(tokenizer, teacher_script)
    dec = RelayDecoder(student, teacher, tokenizer, RelayConfig(**cfg))
    traces = dec.decode_text(list(prompts))
    return traces, student, teacher


def text(tokenizer, ids):
    return tokenizer.decode(ids)


def test_relay_transcript_keeps_command_for_student_and_hides_it_from_teacher(tokenizer):
    traces, student, teacher = run(
        tokenizer, {0: ["12+<call>3</call>", "9=21<eos>"]}, {0: ["abc"]}, max_new_tokens=64
    )
    tr = traces[0]
    assert text(tokenizer, tr.token_ids) == "12+<call>3</call>abc9=21<eos>"
    assert tr.sources == [S, S, S, C, C, C, T, T, T, S, S, S, S, S]
    # the teacher saw the prompt and the student's own tokens, with no command
    assert text(tokenizer, teacher.seen[0][0]) == "Q: 1\nA: 12+"
    # the student resumed from its own view, command included
    assert text(tokenizer, student.seen[0][1]) == "Q: 1\nA: 12+<call>3</call>abc"
    (h,) = tr.handoffs
    assert (h.start, h.requested, h.granted, h.delivered) == (6, 3, 3, 3)
    assert h.context_tokens == len(teacher.seen[0][0])
    assert tr.stop_reason == StopReason.STUDENT_EOS
    assert (tr.n_teacher, tr.n_student, tr.n_command, tr.calls) == (3, 11, 3, 1)
    assert tr.call_ratio == pytest.approx(3 / 14)
    assert tr.teacher_mask() == [int(s == T) for s in tr.sources]
    assert text(tokenizer, tr.teacher_view_ids()) == "Q: 1\nA: 12+abc9=21<eos>"
    assert len(student.released) == 1 and len(teacher.released) == 1


def test_teacher_eos_ends_the_request_and_delivered_counts_what_came_back(tokenizer):
    traces, _, _ = run(tokenizer, {0: ["x<call>8</call>"]}, {0: ["ab<eos>"]})
    tr = traces[0]
    assert tr.stop_reason == StopReason.TEACHER_EOS
    assert (tr.handoffs[0].granted, tr.handoffs[0].delivered) == (8, 3)


def test_zero_call_means_no_call(tokenizer):
    traces, _, teacher = run(tokenizer, {0: ["a<call>0</call>", "b<eos>"]}, {0: []})
    assert traces[0].calls == 0 and not teacher.seen and not traces[0].events
    assert text(tokenizer, traces[0].token_ids) == "a<call>0</call>b<eos>"


def test_teacher_token_budget_clips_then_refuses(tokenizer):
    traces, _, _ = run(
        tokenizer,
        {0: ["a<call>5</call>", "b<call>4</call>", "c<eos>"]},
        {0: ["XY", "Z"]},
        max_teacher_tokens=2,
    )
    tr = traces[0]
    assert [(h.requested, h.granted, h.delivered) for h in tr.handoffs] == [(5, 2, 2)]
    assert [e.kind for e in tr.events] == ["clipped", "budget"]
    assert "max_teacher_tokens" in tr.events[1].detail
    assert text(tokenizer, tr.token_ids) == "a<call>5</call>XYb<call>4</call>c<eos>"


def test_call_budget_and_max_call_tokens(tokenizer):
    traces, _, _ = run(
        tokenizer,
        {0: ["<call>99</call>", "<call>1</call>", "<eos>"]},
        {0: ["abcd"]},
        max_calls=1,
        max_call_tokens=4,
    )
    tr = traces[0]
    assert [(h.requested, h.granted) for h in tr.handoffs] == [(99, 4)]
    assert [e.kind for e in tr.events] == ["clipped", "budget"]


@pytest.mark.parametrize(
    ("command", "why"),
    [
        ("<call>x</call>", "not a non-negative integer"),
        ("<call>-3</call>", "not a non-negative integer"),
        ("<call></call>", "empty call body"),
        ("</call>", "without"),
        ("<call>3<call>2</call>", "nested"),
        ("<call>99999999999</call>", "digits"),
    ],
)
def test_malformed_commands_are_recorded_and_never_crash_the_batch(tokenizer, command, why):
    traces, _, teacher = run(
        tokenizer,
        {0: [f"a{command}", "b<eos>"], 1: ["fine<eos>"]},
        {0: []},
        prompts=("Q: 1\nA: ", "Q: 2\nA: "),
    )
    bad, good = traces
    assert bad.calls == 0 and not teacher.seen
    (event,) = bad.events
    assert event.kind == "malformed" and why in event.detail
    assert bad.sources.count(C) == len(tokenizer(command, add_special_tokens=False).input_ids)
    assert bad.stop_reason == good.stop_reason == StopReason.STUDENT_EOS
    assert text(tokenizer, good.token_ids) == "fine<eos>"


def test_unterminated_command_at_eos(tokenizer):
    traces, _, _ = run(tokenizer, {0: ["ab<call>3<eos>"]}, {0: []})
    tr = traces[0]
    assert [e.kind for e in tr.events] == ["unterminated"]
    assert tr.sources == [S, S, C, C, C]


def test_student_mode_blocks_calls(tokenizer):
    traces, _, teacher = run(
        tokenizer, {0: ["a<call>3</call>", "b<eos>"]}, {0: ["zzz"]}, mode="student"
    )
    assert traces[0].calls == 0 and not teacher.seen
    assert [e.kind for e in traces[0].events] == ["blocked"]


def test_teacher_mode_writes_everything(tokenizer):
    traces, student, _ = run(tokenizer, {0: []}, {0: ["42<eos>"]}, mode="teacher")
    tr = traces[0]
    assert not student.seen and tr.sources == [T, T, T] and tr.call_ratio == 1.0
    assert tr.stop_reason == StopReason.TEACHER_EOS


def test_fixed_help_grants_fixed_n(tokenizer):
    traces, _, _ = run(
        tokenizer, {0: ["<call>2</call>", "<eos>"]}, {0: ["abcdef"]}, mode="fixed_help", fixed_n=5
    )
    assert [(h.requested, h.granted, h.delivered) for h in traces[0].handoffs] == [(5, 5, 5)]


@pytest.mark.parametrize(("p", "expected"), [(0.0, {S}), (1.0, {T})])
def test_random_router_extremes(tokenizer, p, expected):
    traces, _, _ = run(
        tokenizer,
        {0: ["abcdefgh"] * 10},
        {0: ["x"] * 10},
        mode="random_router",
        router_p=p,
        max_new_tokens=8,
    )
    assert set(traces[0].sources) == expected
    assert traces[0].n_generated == 8 and traces[0].stop_reason == StopReason.MAX_NEW_TOKENS


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_random_router_share_is_p(tokenizer, p):
    """Each token is the teacher's with probability p, independently: the realised share is p.
    (It was p / (1 - p + p^2), 0.38 at p = 0.3: the draw that ended a teacher run was drawn
    again for the token after it.)"""
    n, length = 300, 40
    traces, _, _ = run(
        tokenizer,
        {i: ["abcdefgh" * 5] * (length + 1) for i in range(n)},
        {i: ["x" * length] * (length + 1) for i in range(n)},
        prompts=["Q: 1\nA: "] * n,
        mode="random_router",
        router_p=p,
        max_new_tokens=length,
    )
    teacher = sum(t.n_teacher for t in traces)
    total = sum(t.n_generated for t in traces)
    assert total == n * length
    assert abs(teacher / total - p) < 0.015, teacher / total  # 12,000 tokens: sd <= 0.005


def test_bounds_max_new_tokens_and_max_turns(tokenizer):
    traces, _, _ = run(tokenizer, {0: ["abcdefghij"]}, {0: []}, max_new_tokens=4)
    assert traces[0].n_generated == 4 and traces[0].stop_reason == StopReason.MAX_NEW_TOKENS
    traces, _, _ = run(
        tokenizer, {0: ["a<call>0</call>"] * 5}, {0: []}, max_turns=3, max_new_tokens=100
    )
    assert traces[0].turns == 3 and traces[0].stop_reason == StopReason.MAX_TURNS


def test_batch_of_requests_in_different_states(tokenizer):
    traces, _, teacher = run(
        tokenizer,
        {
            0: ["<call>2</call>", "b<call>1</call>", "c<eos>"],  # two calls
            1: ["done<eos>"],  # never calls
            2: ["x<call>4</call>"],  # teacher ends it
        },
        {0: ["T1", "U"], 2: ["ok<eos>"]},
        prompts=("Q: a\nA: ", "Q: b\nA: ", "Q: c\nA: "),
    )
    assert [tr.calls for tr in traces] == [2, 0, 1]
    assert [tr.stop_reason for tr in traces] == ["student_eos", "student_eos", "teacher_eos"]
    assert text(tokenizer, traces[0].token_ids) == "<call>2</call>T1b<call>1</call>Uc<eos>"
    assert 1 not in teacher.seen


# Non-ASCII decimal digits: Python's \d and int() read them all as numbers, a byte-level
# tokenizer can spell them, and none is a token count.
NON_ASCII_DIGITS = {
    "arabic-indic": "\u0663",  # ٣
    "extended-arabic-indic": "\u06f3",  # ۳
    "devanagari": "\u0969",  # ३
    "bengali": "\u09e9",  # ৩
    "full-width": "\uff13",  # ３
    "superscript": "\u00b2",  # ²
    "math-bold": "\U0001d7d1",  # 𝟑
    "math-monospace": "\U0001d7f9",  # 𝟹
    "mixed": "1\u0663",
    "ascii-digit-non-ascii-space": "\u00a03",  # no-break space before an ASCII 3
    "ascii-digit-em-space": "3\u2003",
}


@pytest.mark.parametrize("mode", ["relay", "fixed_help"])
@pytest.mark.parametrize("body", NON_ASCII_DIGITS.values(), ids=NON_ASCII_DIGITS.keys())
def test_non_ascii_digits_are_a_malformed_command_not_a_token_count(body, mode):
    tok = byte_tokenizer()
    command = f"<call>{body}</call>"
    traces, _, teacher = run(
        tok, {0: [f"a{command}", "b<eos>"]}, {0: ["never"]}, mode=mode, max_new_tokens=64
    )
    tr = traces[0]
    assert tr.calls == 0 and tr.n_teacher == 0 and not teacher.seen
    (event,) = tr.events
    assert event.kind == "malformed" and "not a non-negative integer" in event.detail
    assert tr.sources.count(C) == len(tok(command, add_special_tokens=False).input_ids)
    assert tok.decode(tr.token_ids) == f"a{command}b<eos>"
    assert tr.stop_reason == StopReason.STUDENT_EOS


@pytest.mark.parametrize("body", ["3", " 3", "3 ", "\t3\n", "\r\x0b\x0c3 "])
def test_ascii_digits_with_ascii_whitespace_still_call(body):
    traces, _, teacher = run(
        byte_tokenizer(), {0: [f"a<call>{body}</call>", "b<eos>"]}, {0: ["xyz"]}
    )
    assert [(h.requested, h.delivered) for h in traces[0].handoffs] == [(3, 3)]
    assert not traces[0].events and len(teacher.seen[0]) == 1


def test_non_ascii_digit_in_the_micro_tokenizer_is_unknown_and_malformed(tokenizer):
    traces, _, teacher = run(tokenizer, {0: ["a<call>\u0663</call>", "b<eos>"]}, {0: []})
    (event,) = traces[0].events
    assert event.kind == "malformed" and traces[0].calls == 0 and not teacher.seen


def test_unterminated_nested_command_is_marked_from_its_first_open_tag(tokenizer):
    traces, _, _ = run(tokenizer, {0: ["ab<call>3<call>2<eos>"]}, {0: []})
    tr = traces[0]
    assert [e.kind for e in tr.events] == ["unterminated"]
    assert tr.sources == [S, S, C, C, C, C, C]


def chars(tokenizer, text: str) -> list[int]:
    """``text`` one character token at a time: ``<call>`` spelled out, not the tag token."""
    return tokenizer.convert_tokens_to_ids(list(text))


def routed_run(tokenizer, student_stream, teacher_script, route, **cfg):
    """Request 0 with a streamed student and the router's hand-offs set by ``route``."""
    student = ScriptedBackend(tokenizer, {0: student_stream}, stream=True)
    teacher = ScriptedBackend(tokenizer, teacher_script)
    config = RelayConfig(mode="random_router", router_p=0.5, **cfg)
    dec = RoutedDecoder(student, teacher, tokenizer, config, routes={0: route})
    (trace,) = dec.decode_text(["Q: 1\nA: "])
    return trace, student, teacher


def test_router_hand_off_inside_an_open_command_abandons_it(tokenizer):
    # the router gives token 4 (after "ab<call>1") to the teacher, one token long
    route = [False] * 4 + [True, False] + [False] * 40
    tr, student, teacher = routed_run(
        tokenizer, ["ab<call>1", "2</call>c<eos>"], {0: ["X"]}, route, max_new_tokens=64
    )
    assert text(tokenizer, tr.token_ids) == "ab<call>1X2</call>c<eos>"
    assert tr.sources == [S, S, C, C, T, S, C, S, S]
    # the teacher continued the text before the command; the student kept its own view
    assert [text(tokenizer, v) for v in teacher.seen[0]] == ["Q: 1\nA: ab"]
    assert text(tokenizer, student.seen[0][1]) == "Q: 1\nA: ab<call>1X"
    unterminated, stray = tr.events
    assert (unterminated.kind, unterminated.position) == ("unterminated", 3)
    assert "abandoned" in unterminated.detail
    assert stray.kind == "malformed" and "without" in stray.detail
    # accounting: the teacher's run as drawn, the abandoned tokens the student's
    (h,) = tr.handoffs
    assert (h.start, h.requested, h.granted, h.delivered) == (4, 1, 1, 1)
    assert (tr.n_teacher, tr.n_student, tr.n_command) == (1, 8, 3)
    assert h.context_tokens == len(teacher.seen[0][0])


def test_router_hand_off_right_after_an_open_tag_and_inside_a_nested_one(tokenizer):
    route = [False] * 4 + [True, True, False] + [False] * 40
    tr, _, teacher = routed_run(
        tokenizer, ["a<call>3<call>", "<eos>"], {0: ["XY"]}, route, max_new_tokens=64
    )
    assert text(tokenizer, tr.token_ids) == "a<call>3<call>XY<eos>"
    assert tr.sources == [S, C, C, C, T, T, S]
    assert [text(tokenizer, v) for v in teacher.seen[0]] == ["Q: 1\nA: a"]
    assert [e.kind for e in tr.events] == ["unterminated"]


def test_router_hand_off_after_a_closed_command_leaves_it_as_it_was(tokenizer):
    route = [False] * 8 + [True, False] + [False] * 40
    tr, _, teacher = routed_run(
        tokenizer, ["ab<call>12</call>cd<eos>"], {0: ["X"]}, route, max_new_tokens=64
    )
    assert text(tokenizer, tr.token_ids) == "ab<call>12</call>cdX<eos>"
    assert tr.sources == [S, S, C, C, C, C, S, S, T, S]
    assert [e.kind for e in tr.events] == ["blocked"]
    assert [text(tokenizer, v) for v in teacher.seen[0]] == ["Q: 1\nA: abcd"]


def test_tags_the_teacher_writes_stay_its_tokens_but_are_hidden_from_its_view(tokenizer):
    open_id, close_id = tokenizer.convert_tokens_to_ids([CALL_OPEN, CALL_CLOSE])
    x, y = tokenizer.convert_tokens_to_ids(["x", "y"])
    traces, _, teacher = run(
        tokenizer,
        {0: ["a<call>4</call>", "b<call>2</call>", "c<eos>"]},
        {0: [[x, open_id, y, close_id], "zz"]},
    )
    tr = traces[0]
    assert text(tokenizer, tr.token_ids) == "a<call>4</call>x<call>y</call>b<call>2</call>zzc<eos>"
    assert tr.n_teacher == 6 and sum(h.delivered for h in tr.handoffs) == 6
    assert [text(tokenizer, v) for v in teacher.seen[0]] == ["Q: 1\nA: a", "Q: 1\nA: axyb"]
    assert tr.teacher_mask()[4:8] == [1, 1, 1, 1]


def test_tags_spelled_out_in_characters_are_no_command_and_hidden_from_the_teacher(tokenizer):
    spelled = chars(tokenizer, "a<call>5</call>b<ca")
    traces, _, teacher = run(
        tokenizer, {0: [spelled, "<call>2</call>", "c<eos>"]}, {0: ["zz"]}, max_new_tokens=64
    )
    tr = traces[0]
    # spelled tags are text: no hand-off and no event of theirs, the tag tokens hand off
    assert len(tr.handoffs) == 1 and [e.kind for e in tr.events] == []
    assert tr.sources[: len(spelled)] == [S] * len(spelled)
    # the teacher sees neither the spelled tags nor the "<ca" its view would end in
    assert [text(tokenizer, v) for v in teacher.seen[0]] == ["Q: 1\nA: a5b"]
    assert text(tokenizer, tr.token_ids) == "a<call>5</call>b<ca<call>2</call>zzc<eos>"


def test_a_spelled_tag_prefix_is_hidden_only_where_it_ends_the_view(tokenizer):
    # hand-offs after "1<ca" (hidden: it may become a tag) and after "1<caXd" (not a tag);
    # "d", right after the teacher's run, takes no draw: the run's last draw was its
    route = [False] * 4 + [True, False] + [True, False] + [False] * 40
    tr, _, teacher = routed_run(
        tokenizer, [chars(tokenizer, "1<cad"), "<eos>"], {0: ["X", "Y"]}, route, max_new_tokens=64
    )
    assert text(tokenizer, tr.token_ids) == "1<caXdY<eos>"
    assert [text(tokenizer, v) for v in teacher.seen[0]] == ["Q: 1\nA: 1", "Q: 1\nA: 1<caXd"]
    assert not tr.events


def _real_decoder(tiny_models, tokenizer, use_cache=True):
    student, teacher = tiny_models
    return RelayDecoder(
        TransformersBackend(student, use_cache=use_cache),
        TransformersBackend(teacher, use_cache=use_cache),
        tokenizer,
    )


def test_sampling_is_seeded_and_reproducible(tiny_models, tokenizer):
    dec = _real_decoder(tiny_models, tokenizer)
    prompts = ["Q: 1+2\nA: ", "Q: 33+4\nA: ", "Q: 5\nA: "]
    cfg = RelayConfig(
        mode="random_router",
        router_p=0.3,
        max_new_tokens=24,
        seed=7,
        student_sampling=Sampling(temperature=1.0),
        teacher_sampling=Sampling(temperature=1.0),
    )
    a = dec.decode_text(prompts, cfg)
    b = dec.decode_text(prompts, cfg)
    c = dec.decode_text(prompts, RelayConfig(**{**cfg.__dict__, "seed": 8}))
    assert [t.token_ids for t in a] == [t.token_ids for t in b]
    assert [t.sources for t in a] == [t.sources for t in b]
    assert [t.token_ids for t in a] != [t.token_ids for t in c]


def test_cached_and_uncached_paths_give_identical_tokens(tiny_models, tokenizer):
    prompts = ["Q: 1+2\nA: ", "Q: 33+4+5\nA: ", "Q: 5\nA: ", "Q: 12+1\nA: "]
    cfg = RelayConfig(mode="random_router", router_p=0.25, max_new_tokens=30, seed=3)
    cached = _real_decoder(tiny_models, tokenizer, use_cache=True).decode_text(prompts, cfg)
    plain = _real_decoder(tiny_models, tokenizer, use_cache=False).decode_text(prompts, cfg)
    assert [t.token_ids for t in cached] == [t.token_ids for t in plain]
    assert sum(len(t.handoffs) for t in cached) > 4  # hand-offs really happened
    # the cache means each hand-off prefills only the new tokens
    assert sum(t.teacher_prefill_tokens for t in cached) < sum(
        t.teacher_prefill_tokens for t in plain
    )


def test_batched_equals_one_by_one(tiny_models, tokenizer):
    dec = _real_decoder(tiny_models, tokenizer)
    prompts = ["Q: 1+2\nA: ", "Q: 33+4+5+6\nA: ", "Q: 5\nA: "]
    cfg = RelayConfig(mode="random_router", router_p=0.2, max_new_tokens=20, seed=1)
    together = dec.decode_text(prompts, cfg)
    alone = [dec.decode_text([p], cfg)[0] for p in prompts]
    # request ids differ (seeded per position), so compare greedy tokens of request 0 only
    assert together[0].token_ids == alone[0].token_ids
    torch.testing.assert_close(torch.tensor(together[0].sources), torch.tensor(alone[0].sources))
