"""Continuous scheduling (relaypipe.relay.lanes, DecodeStream): the same tokens as the round
schedule and as uncached decoding, per mode; requests really do not wait for batch-mates; the
stream's own mechanics (joining mid-decode, packed prefill groups)."""

from __future__ import annotations

from collections.abc import Hashable

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from relaypipe.relay.backends import GenRequest
from relaypipe.relay.decoder import RelayConfig, RelayDecoder
from relaypipe.relay.grammar import CALL_CLOSE, CALL_OPEN
from relaypipe.relay.lanes import BatchLane, StreamLane, open_lane
from relaypipe.relay.sampling import Sampling
from relaypipe.relay.transformers_backend import TransformersBackend, feed_groups
from tests.test_backends import reference
from tests.test_decoder import RoutedDecoder

HOT = Sampling(temperature=1.5)


def bigram_llama(tokenizer, seed: int = 0) -> LlamaForCausalLM:
    """A real Llama whose next token depends on the current one only (attention and MLP
    write nothing; embeddings are one-hot), so it calls the teacher: greedy, it writes
    ``<call>2</call>a<call>2</call>a...``; sampled, commands (valid, stray and nested) among
    random text."""
    vocab = len(tokenizer)
    hidden = 128
    assert vocab <= hidden
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    tok = tokenizer.convert_tokens_to_ids
    open_id, close_id = tok(CALL_OPEN), tok(CALL_CLOSE)
    two, a = tok("2"), tok("a")
    table = torch.randn(vocab, vocab) * 0.3  # table[next, current]: the logits
    table[open_id, :] += 3.0  # any token: a command may open
    table[:, open_id] = 0.0
    table[two, open_id] = 8.0  # <call> -> 2
    table[close_id, two] = 8.0  # 2 -> </call>
    table[:, close_id] = 0.0
    table[a, close_id] = 4.0  # </call> -> a
    table[tokenizer.eos_token_id, :] = -4.0
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(vocab, hidden))
        model.lm_head.weight.zero_()
        model.lm_head.weight[:, :vocab] = table / hidden**0.5  # rms-normed one-hot: sqrt(h)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return model


def many_prompts(n: int) -> list[str]:
    return [f"Q: {i}+{3 * i % 17}+{i % 5}\nA: " for i in range(n)]


class RoundsOnly:
    """A TransformersBackend seen through ``generate`` only: the decoder falls back to its
    round schedule (BatchLane), the reference the continuous schedule must reproduce."""

    def __init__(self, backend: TransformersBackend) -> None:
        self.backend = backend
        self.eos_token_ids = backend.eos_token_ids
        self.supports_logit_bias = True

    def generate(self, requests, **kwargs):
        return self.backend.generate(requests, **kwargs)

    def release(self, key: Hashable) -> None:
        self.backend.release(key)


def fingerprint(traces, prefill: bool = True):
    return [
        (
            t.token_ids,
            t.sources,
            t.turns,
            t.stop_reason,
            [(e.position, e.kind, e.detail) for e in t.events],
            [
                (h.start, h.requested, h.granted, h.delivered, h.context_tokens)
                + ((h.prefill_tokens,) if prefill else ())
                for h in t.handoffs
            ],
            t.student_prefill_tokens if prefill else None,
        )
        for t in traces
    ]


CONFIGS = {
    "relay": dict(mode="relay", call_bias=2.0),
    "fixed_help": dict(mode="fixed_help", call_bias=2.0, fixed_n=3),
    "student": dict(mode="student"),
    "teacher": dict(mode="teacher"),
    "random_router": dict(mode="random_router", router_p=0.2),
    "budgeted": dict(mode="relay", call_bias=3.0, max_calls=2, max_teacher_tokens=5),
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("sampling", [Sampling(), HOT], ids=["greedy", "sampled"])
def test_continuous_equals_rounds_equals_uncached(tiny_models, tokenizer, name, sampling):
    student, teacher = bigram_llama(tokenizer), tiny_models[1]
    cfg = RelayConfig(
        max_new_tokens=40,
        max_call_tokens=6,
        seed=3,
        student_sampling=sampling,
        teacher_sampling=sampling,
        **CONFIGS[name],
    )
    prompts = many_prompts(10)

    def run(use_cache: bool, rounds: bool):
        s = TransformersBackend(student, use_cache=use_cache)
        t = TransformersBackend(teacher, use_cache=use_cache)
        if rounds:
            s, t = RoundsOnly(s), RoundsOnly(t)
        return RelayDecoder(s, t, tokenizer).decode_text(prompts, cfg)

    continuous = run(True, False)
    assert fingerprint(run(True, True)) == fingerprint(continuous)
    assert fingerprint(run(False, False), prefill=False) == fingerprint(continuous, False)
    if name != "student":  # the comparison covers hand-offs
        assert sum(len(t.handoffs) for t in continuous) >= 3
    if name == "budgeted":
        assert any(e.kind == "budget" for t in continuous for e in t.events)


class CountingStreams(TransformersBackend):
    """Records, per stream step, which request keys came back."""

    def __init__(self, model, log: list, name: str) -> None:
        super().__init__(model, name=name)
        self.log = log

    def open_stream(self, stop_token_ids=frozenset(), sampling=Sampling()):
        stream = super().open_stream(stop_token_ids, sampling)
        step, log, name = stream.step, self.log, self.name

        def logged():
            done = step()
            log.append((name, [k[1] for k, _ in done]))
            return done

        stream.step = logged  # type: ignore[method-assign]
        return stream


def test_a_hand_off_does_not_wait_for_a_batch_mates_long_student_run(tiny_models, tokenizer):
    """Request 0 hands over at its 2nd token, request 1 only at its 30th: request 0's teacher
    span comes back while request 1 is still with the student (the round schedule would hold it
    until request 1's student call ended)."""
    log: list = []
    s = CountingStreams(tiny_models[0], log, "student")
    t = CountingStreams(tiny_models[1], log, "teacher")
    routes = {
        0: [False, True, False, False, True] + [False] * 60,
        1: [False] * 29 + [True] + [False] * 40,
    }
    dec = RoutedDecoder(s, t, tokenizer, routes=routes)
    cfg = RelayConfig(mode="random_router", router_p=0.5, max_new_tokens=36)
    traces = dec.decode_text(many_prompts(2), cfg)
    assert traces[0].handoffs[0].start == 1 and traces[1].handoffs[0].start == 29
    order = [(name, key) for name, keys in log for key in keys]
    back0 = order.index(("teacher", 0))
    student1 = order.index(("student", 1))  # request 1's first student call ending (at 29)
    assert back0 < student1
    # ...and request 0 was with the student again meanwhile, batched with request 1
    assert ("student", 0) in order[back0:student1]


def test_requests_join_a_running_stream(tiny_models, tokenizer):
    """A request added while others decode gets the tokens it gets alone; stop tokens end it."""
    model = tiny_models[1]
    backend = TransformersBackend(model)
    stream = backend.open_stream()
    ctx = [tokenizer(p, add_special_tokens=False).input_ids for p in many_prompts(3)]
    stream.add(GenRequest("a", ctx[0], 12))
    got: dict = {}
    for _ in range(4):
        got.update(stream.step())
    stream.add(GenRequest("b", ctx[1], 5))
    stream.add(GenRequest("c", ctx[2], 0))
    while len(stream):
        got.update(stream.step())
    assert got["a"].tokens == reference(model, ctx[0], 12)
    assert got["b"].tokens == reference(model, ctx[1], 5)
    assert got["c"].tokens == [] and got["c"].finish == "length"
    assert got["b"].prefill_tokens == len(ctx[1])


def test_feed_groups_minimise_padding_plus_forwards():
    assert feed_groups([]) == []
    assert feed_groups([5]) == [[0]]
    # single-token decode rows and a row back with a few tokens: one forward
    assert feed_groups([1, 1, 3, 1, 1], overhead_tokens=32) == [[2, 0, 1, 3, 4]]
    # a long prompt is not padded against short rows
    assert feed_groups([40, 1, 1, 2], overhead_tokens=8) == [[0], [3, 1, 2]]
    # no overhead: a forward per distinct length (no padding at all)
    assert feed_groups([3, 1, 3, 1], overhead_tokens=0) == [[0, 2], [1, 3]]
    for lengths in ([7, 1, 30, 29, 2, 15, 16], [1] * 9, list(range(1, 40, 3))):
        for overhead in (0, 4, 32, 1000):
            groups = feed_groups(lengths, overhead)
            assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
            cost = sum(overhead + len(g) * max(lengths[i] for i in g) for g in groups)
            one = overhead + len(lengths) * max(lengths)
            each = sum(overhead + n for n in lengths)
            assert cost <= min(one, each)  # never worse than one forward or one per row


def test_mixed_lengths_prefill_in_groups_with_the_same_tokens(tiny_models, tokenizer):
    model = tiny_models[0]
    contexts = [list(range(8, 8 + n)) for n in (3, 40, 4, 38, 2)]
    got = TransformersBackend(model).generate([GenRequest(i, c, 6) for i, c in enumerate(contexts)])
    for c, res in zip(contexts, got, strict=True):
        assert res.tokens == reference(model, c, 6) and res.prefill_tokens == len(c)


def test_lanes_follow_what_a_backend_can_do(tiny_models, tokenizer):
    backend = TransformersBackend(tiny_models[0])
    assert isinstance(open_lane(backend, frozenset(), Sampling()), StreamLane)
    assert isinstance(open_lane(RoundsOnly(backend), frozenset(), Sampling()), BatchLane)


@torch.inference_mode()
def test_a_stream_survives_a_store_that_grows_under_it(tiny_models, tokenizer):
    """Columns and slots grow while rows decode (kv_chunk=1 reallocates often)."""
    model = tiny_models[1]
    backend = TransformersBackend(model, kv_chunk=1)
    ctx = [tokenizer(p, add_special_tokens=False).input_ids for p in many_prompts(6)]
    got = backend.generate([GenRequest(i, c, 20) for i, c in enumerate(ctx)])
    for c, res in zip(ctx, got, strict=True):
        assert res.tokens == reference(model, c, 20)


def test_teacher_hold_batches_hand_offs_without_changing_tokens(tiny_models, tokenizer):
    """Held hand-offs share teacher forwards (fewer teacher steps), tokens unchanged; a lone
    request is never held (nothing else for the student to do)."""
    cfg = RelayConfig(mode="random_router", router_p=0.2, max_new_tokens=40, seed=5)
    prompts = many_prompts(8)
    traces, teacher_steps = {}, {}
    for hold in (0, 8, "auto"):
        log: list = []
        s = CountingStreams(tiny_models[0], log, "student")
        t = CountingStreams(tiny_models[1], log, "teacher")
        traces[hold] = fingerprint(
            RelayDecoder(s, t, tokenizer, teacher_hold=hold).decode_text(prompts, cfg)
        )
        teacher_steps[hold] = sum(name == "teacher" for name, _ in log)
    assert traces[8] == traces[0] == traces["auto"]
    assert teacher_steps[8] < teacher_steps[0]
    with pytest.raises(ValueError, match="teacher_hold"):
        RelayDecoder(s, t, tokenizer, teacher_hold=-1)
    # one request: each hand-off runs at once (student idle), so holding changes nothing
    for hold in (0, 50):
        log = []
        s = CountingStreams(tiny_models[0], log, "student")
        t = CountingStreams(tiny_models[1], log, "teacher")
        RelayDecoder(s, t, tokenizer, teacher_hold=hold).decode_text(prompts[:1], cfg)
        teacher_steps[("alone", hold)] = sum(name == "teacher" for name, _ in log)
    assert teacher_steps[("alone", 0)] == teacher_steps[("alone", 50)]


class PeakStreams(TransformersBackend):
    """Records the most requests its streams held at once."""

    peak = 0

    def open_stream(self, stop_token_ids=frozenset(), sampling=Sampling()):
        stream = super().open_stream(stop_token_ids, sampling)
        add = stream.add

        def counted(request):
            add(request)
            self.peak = max(self.peak, len(stream))

        stream.add = counted  # type: ignore[method-assign]
        return stream


@pytest.mark.parametrize("name", ["relay", "teacher", "random_router", "student"])
def test_max_batch_admits_requests_as_others_leave_with_the_same_tokens(
    tiny_models, tokenizer, name
):
    """decode(max_batch=k): at most k requests decoding at once, the rest joining as requests
    finish; every request's tokens are those of the all-at-once decode."""
    cfg = RelayConfig(max_new_tokens=30, max_call_tokens=4, seed=2, **CONFIGS[name])
    prompts = [tokenizer(p, add_special_tokens=False).input_ids for p in many_prompts(9)]
    student = bigram_llama(tokenizer)
    whole = None
    for k in (None, 1, 3):
        s, t = PeakStreams(student), PeakStreams(tiny_models[1])
        got = RelayDecoder(s, t, tokenizer).decode(prompts, cfg, max_batch=k)
        if k is None:
            whole = got
            continue
        assert fingerprint(got) == fingerprint(whole)
        assert max(s.peak, t.peak) <= k
    with pytest.raises(ValueError, match="max_batch"):
        RelayDecoder(s, t, tokenizer).decode(prompts, cfg, max_batch=0)
