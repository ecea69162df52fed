"""The relay decoder against scripted backends (exact transcripts) and tiny real models."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Sequence

import pytest
import torch

from relaypipe.relay.backends import GenRequest, GenResult, Sampling, TransformersBackend
from relaypipe.relay.decoder import RelayConfig, RelayDecoder
from relaypipe.relay.trace import Source, StopReason

S, T, C = Source.STUDENT, Source.TEACHER, Source.COMMAND


class ScriptedBackend:
    """Replies to request i with the next chunk of script[i], cut like a real model would be:
    at the first stop token (included) or at max_new_tokens. Records every context it saw."""

    def __init__(self, tokenizer, scripts: dict[int, list[str]]):
        self.tok = tokenizer
        self.eos_token_ids = frozenset([tokenizer.eos_token_id])
        self.queues = {i: [self._ids(c) for c in chunks] for i, chunks in scripts.items()}
        self.seen: dict[int, list[list[int]]] = defaultdict(list)
        self.released: list[Hashable] = []

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids

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
            chunk = self.queues[i].pop(0) if self.queues[i] else [self.tok.eos_token_id]
            toks, finish = [], "length"
            for t in chunk[: r.max_new_tokens]:
                toks.append(t)
                if t in stop_token_ids:
                    finish = "stop"
                    break
                if t in self.eos_token_ids:
                    finish = "eos"
                    break
            out.append(GenResult(tokens=toks, finish=finish, prefill_tokens=len(r.context)))
        return out

    def release(self, key: Hashable) -> None:
        self.released.append(key)


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
