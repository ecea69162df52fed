"""TransformersBackend: cached, batched and lean decoding give the tokens plain recomputation
gives; prefix reuse prefills only what is new; edge cases (shrinking context, no tokens, stop
tokens, weight updates)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from relaypipe.relay import sampling
from relaypipe.relay.backends import GenRequest
from relaypipe.relay.decoder import RelayConfig, RelayDecoder
from relaypipe.relay.kv_store import KVStore, SlotRows
from relaypipe.relay.sampling import (
    MAX_TEMPERATURE,
    MAX_TOP_K,
    MIN_TEMPERATURE,
    MIN_TOP_P,
    Sampling,
    sample_next,
)
from relaypipe.relay.transformers_backend import TransformersBackend

PROMPTS = ["Q: 1+2\nA: ", "Q: 33+4+5+6\nA: ", "Q: 5\nA: ", "Q: 12+1\nA: 7"]


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


@torch.inference_mode()
def reference(model, context: list[int], n: int, stops=frozenset()) -> list[int]:
    """Greedy tokens by full recomputation with the model's own forward: no cache, no batch."""
    seq, out = list(context), []
    eos = model.config.eos_token_id
    for _ in range(n):
        tok = int(model(torch.tensor([seq])).logits[0, -1].argmax())
        out.append(tok)
        if tok == eos or tok in stops:
            break
        seq.append(tok)
    return out


@pytest.fixture(params=[True, False], ids=["lean", "hf"])
def fast(request):
    return request.param


def test_lean_path_is_used_for_llama_and_can_be_refused(tiny_models):
    assert TransformersBackend(tiny_models[0]).fast
    assert not TransformersBackend(tiny_models[0], fast=False).fast
    with pytest.raises(ValueError, match="Llama"):
        TransformersBackend(torch.nn.Linear(2, 2), fast=True)  # type: ignore[arg-type]


@pytest.mark.parametrize("which", [0, 1])
def test_batched_cached_decoding_equals_recomputation(tiny_models, tokenizer, fast, which):
    model = tiny_models[which]
    backend = TransformersBackend(model, fast=fast)
    contexts = [ids(tokenizer, p) for p in PROMPTS]
    n = [9, 4, 12, 1]
    got = backend.generate(
        [GenRequest(i, c, k) for i, (c, k) in enumerate(zip(contexts, n, strict=True))]
    )
    for c, k, res in zip(contexts, n, got, strict=True):
        assert res.tokens == reference(model, c, k)
        assert res.prefill_tokens == len(c)
        assert res.finish in ("length", "eos")


def test_lean_forward_matches_the_model_forward(tiny_models, tokenizer):
    ctx = ids(tokenizer, PROMPTS[1])
    n = len(ctx)
    for model in tiny_models:
        backend = TransformersBackend(model, fast=True)
        store = KVStore(*backend._geometry, dtype=torch.float32, device="cpu")
        store.acquire()
        store.reserve(n)
        cols = torch.arange(n)
        backend._sync()  # reads the weights
        with torch.inference_mode():
            want = model(torch.tensor([ctx])).logits[0, -1]
            got = backend._runner(
                torch.tensor([ctx]), SlotRows(store, [0], cols[None], n), cols, None
            )
        torch.testing.assert_close(got[0], want, rtol=1e-5, atol=1e-5)
        hf = TransformersBackend(model, fast=False)
        assert (
            backend.generate([GenRequest("a", ctx, 16)])[0].tokens
            == hf.generate([GenRequest("a", ctx, 16)])[0].tokens
        )


def test_prefix_reuse_across_calls(tiny_models, tokenizer, fast):
    model = tiny_models[1]
    backend = TransformersBackend(model, fast=fast)
    ctx = ids(tokenizer, PROMPTS[0])
    first = backend.generate([GenRequest("k", ctx, 5)])[0]
    assert first.prefill_tokens == len(ctx)
    # the last generated token was never fed; plus three tokens someone else wrote
    extra = ids(tokenizer, "9+1")
    ctx2 = ctx + first.tokens + extra
    assert backend.cached_tokens("k") == len(ctx) + len(first.tokens) - 1
    second = backend.generate([GenRequest("k", ctx2, 6)])[0]
    assert second.prefill_tokens == 1 + len(extra)
    assert second.tokens == reference(model, ctx2, 6)
    # asking again for the very same context feeds only its last token
    again = backend.generate([GenRequest("k", ctx2, 6)])[0]
    assert again.prefill_tokens == 1 and again.tokens == second.tokens


def test_forward_stats_count_what_the_forwards_fed(tiny_models, tokenizer):
    backend = TransformersBackend(tiny_models[1])
    ctx = ids(tokenizer, PROMPTS[1])
    res = backend.generate([GenRequest("one", ctx, 5)])[0]
    n = len(res.tokens)
    stats = backend.reset_stats()
    # one row: a forward per sampled token, the prompt then each token fed back, no padding
    assert (stats.forwards, stats.rows, stats.tokens) == (n, n, len(ctx) + n - 1)
    assert stats.seconds > 0 and stats.rows_per_forward == 1
    assert backend.stats.forwards == 0  # counting starts again
    reqs = [GenRequest(i, ids(tokenizer, p), 4) for i, p in enumerate(PROMPTS[:3])]
    out = backend.generate(reqs)
    stats = backend.reset_stats()
    # every sampled token comes from a forward the row was fed in; padding only adds tokens
    assert stats.rows == sum(len(r.tokens) for r in out)
    fed = sum(len(r.context) + len(o.tokens) - 1 for r, o in zip(reqs, out, strict=True))
    assert stats.tokens >= fed
    assert max(len(o.tokens) for o in out) <= stats.forwards < stats.rows
    assert stats.to_dict()["rows_per_forward"] == pytest.approx(stats.rows / stats.forwards)


def test_context_diverging_from_or_shorter_than_the_cache(tiny_models, tokenizer, fast):
    model = tiny_models[1]
    backend = TransformersBackend(model, fast=fast)
    long = ids(tokenizer, "Q: 33+4+5+6\nA: 38")
    backend.generate([GenRequest("k", long, 8)])
    diverged = ids(tokenizer, "Q: 33+9")  # shares "Q: 33+" (6 tokens)
    res = backend.generate([GenRequest("k", diverged, 7)])[0]
    assert res.prefill_tokens == len(diverged) - 6
    assert res.tokens == reference(model, diverged, 7)
    shorter = diverged[:4]  # a prefix of what is cached: feed its last token again
    res = backend.generate([GenRequest("k", shorter, 7)])[0]
    assert res.prefill_tokens == 1 and res.tokens == reference(model, shorter, 7)


def test_non_contiguous_batches_and_mixed_reuse(tiny_models, tokenizer, fast):
    """Rounds of a relay: subsets of the live requests, each at its own cache length."""
    model = tiny_models[0]
    backend = TransformersBackend(model, fast=fast)
    ctxs = {i: ids(tokenizer, p) for i, p in enumerate(PROMPTS)}
    first = backend.generate([GenRequest(i, c, 3) for i, c in ctxs.items()])
    for i, res in enumerate(first):
        ctxs[i] = ctxs[i] + res.tokens
    ctxs[2] = ctxs[2] + ids(tokenizer, "abc")  # a teacher span for request 2
    subset = [3, 0, 2]  # slots out of order, one of them missing
    got = backend.generate([GenRequest(i, ctxs[i], 5) for i in subset])
    for i, res in zip(subset, got, strict=True):
        assert res.tokens == reference(model, ctxs[i], 5)
    assert [r.prefill_tokens for r in got] == [1, 1, 4]
    # request 1 was left alone: its cache is intact
    res = backend.generate([GenRequest(1, ctxs[1], 4)])[0]
    assert res.prefill_tokens == 1 and res.tokens == reference(model, ctxs[1], 4)


@pytest.mark.parametrize("contiguous", [True, False])
def test_rows_dropped_midway_keep_their_cache(tiny_models, tokenizer, fast, contiguous):
    """Finished rows leave the working batch once half are done; all caches stay right."""
    model = tiny_models[1]
    backend = TransformersBackend(model, fast=fast)
    prompts = [ids(tokenizer, p) for p in PROMPTS * 2]
    keys = list(range(len(prompts)))
    backend.generate([GenRequest(k, [1], 1) for k in range(-1, -4, -1)])  # slots 0..2
    if not contiguous:
        backend.release(-2)  # a hole: the batch below gathers its slots
    n = [1, 2, 3, 11, 1, 5, 2, 9]
    got = backend.generate([GenRequest(k, p, m) for k, p, m in zip(keys, prompts, n, strict=True)])
    ctxs = []
    for p, m, res in zip(prompts, n, got, strict=True):
        assert res.tokens == reference(model, p, m)
        ctxs.append(p + res.tokens)
    again = backend.generate([GenRequest(k, c, 4) for k, c in zip(keys, ctxs, strict=True)])
    for c, res in zip(ctxs, again, strict=True):
        assert res.prefill_tokens == 1 and res.tokens == reference(model, c, 4)


def test_zero_new_tokens_and_stop_tokens(tiny_models, tokenizer, fast):
    model = tiny_models[0]
    backend = TransformersBackend(model, fast=fast)
    ctx = ids(tokenizer, PROMPTS[1])
    free = reference(model, ctx, 12)
    zero, one = backend.generate([GenRequest("z", ctx, 0), GenRequest("o", ctx, 12)])
    assert (zero.tokens, zero.finish, zero.prefill_tokens) == ([], "length", 0)
    assert backend.cached_tokens("z") == 0 and one.tokens == free
    assert backend.generate([GenRequest("z", ctx, 0)])[0].tokens == []
    stop = free[3]
    res = backend.generate([GenRequest("s", ctx, 12)], stop_token_ids=frozenset([stop]))[0]
    cut = free.index(stop) + 1
    assert res.tokens == free[:cut] and res.finish == "stop"
    assert backend.cached_tokens("s") == len(ctx) + cut - 1  # the stop token is not fed
    eos = model.config.eos_token_id
    res = backend.generate([GenRequest("e", ctx, 12)], stop_token_ids=frozenset([eos]))[0]
    assert res.finish in ("stop", "length")  # a stop id that is also EOS counts as the stop


def test_empty_context_and_duplicate_keys_are_refused(tiny_models, tokenizer):
    backend = TransformersBackend(tiny_models[0])
    with pytest.raises(ValueError, match="empty context"):
        backend.generate([GenRequest("a", [], 3)])
    ctx = ids(tokenizer, "Q: 1")
    with pytest.raises(ValueError, match="twice"):
        backend.generate([GenRequest("a", ctx, 3), GenRequest("a", ctx, 3)])


def test_release_frees_the_slot_for_the_next_request(tiny_models, tokenizer):
    backend = TransformersBackend(tiny_models[0])
    ctx = ids(tokenizer, PROMPTS[0])
    backend.generate([GenRequest("a", ctx, 3), GenRequest("b", ctx, 3)])
    slot_a = backend._entries["a"].slot
    backend.release("a")
    backend.release("a")  # twice is harmless
    res = backend.generate([GenRequest("c", ctx, 3)])[0]
    assert backend._entries["c"].slot == slot_a and res.prefill_tokens == len(ctx)


def test_weight_updates_invalidate_cached_keys_and_values(tokenizer):
    from relaypipe.micro.models import ModelSize, build_model

    model = build_model(ModelSize(32, 1, 2, 64), tokenizer, seed=5).eval()
    backend = TransformersBackend(model)
    ctx = ids(tokenizer, PROMPTS[1])
    first = backend.generate([GenRequest("k", ctx, 4)])[0]
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)  # an optimiser step, in place
    ctx2 = ctx + first.tokens
    res = backend.generate([GenRequest("k", ctx2, 6)])[0]
    assert res.prefill_tokens == len(ctx2)
    assert res.tokens == reference(model, ctx2, 6)


def test_sampling_depends_on_the_request_generator_only(tiny_models, tokenizer, fast):
    backend = TransformersBackend(tiny_models[0], fast=fast)
    sampling = Sampling(temperature=1.0, top_k=20, top_p=0.9)
    ctx = [ids(tokenizer, p) for p in PROMPTS]

    def gen(seed):
        return torch.Generator().manual_seed(seed)

    batch = backend.generate(
        [GenRequest(i, c, 10, gen(i)) for i, c in enumerate(ctx)], sampling=sampling
    )
    alone = TransformersBackend(tiny_models[0], fast=fast).generate(
        [GenRequest("x", ctx[2], 10, gen(2))], sampling=sampling
    )
    assert batch[2].tokens == alone[0].tokens


def test_relay_decode_same_on_lean_and_hf_paths(tiny_models, tokenizer):
    student, teacher = tiny_models
    cfg = RelayConfig(mode="random_router", router_p=0.25, max_new_tokens=30, seed=3)

    def run(fast: bool):
        dec = RelayDecoder(
            TransformersBackend(student, fast=fast),
            TransformersBackend(teacher, fast=fast),
            tokenizer,
            cfg,
        )
        return dec.decode_text(PROMPTS)

    lean, hf = run(True), run(False)
    assert [t.token_ids for t in lean] == [t.token_ids for t in hf]
    assert [t.teacher_prefill_tokens for t in lean] == [t.teacher_prefill_tokens for t in hf]
    # with the cache, the teacher prefills only what was written since its last turn
    for tr in lean:
        for prev, h in zip(tr.handoffs, tr.handoffs[1:], strict=False):
            unseen = h.context_tokens - (prev.context_tokens + prev.delivered - 1)
            assert h.prefill_tokens == unseen


def test_other_architectures_use_their_own_forward():
    """GPT-2 (learned positions, fused qkv) through the generic path, also with padding and
    finished rows reaching past its position table."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=2, n_positions=40)
    model = GPT2LMHeadModel(cfg).eval()
    model.config.eos_token_id = None
    backend = TransformersBackend(model)
    assert not backend.fast
    long, short = list(range(5, 40)), [5, 6]
    got = backend.generate([GenRequest("a", long, 3), GenRequest("b", short, 20)])
    assert got[0].tokens == reference(model, long, 3)
    assert got[1].tokens == reference(model, short, 20)
    ctx = short + got[1].tokens + [7]
    again = backend.generate([GenRequest("b", ctx, 5)])[0]
    assert again.prefill_tokens == 2 and again.tokens == reference(model, ctx, 5)


# ---------------------------------------------------------------------------- Sampling bounds
NAN, INF = float("nan"), float("inf")
BAD_SAMPLING = {
    "temperature": [
        *(-1.0, -1e-9, 1e-30, 1e-300, 5e-324, 9.99e-6, 100.0001, 101, 1e308, NAN, INF, -INF),
        *(True, False, "1.0", None, [1.0], 1j),
    ],
    "top_p": [
        *(0, 0.0, -0.1, -1e-9, 1e-46, 1e-45, 1e-30, 9.99e-7, 1.0000001, 2, NAN, INF, -INF),
        *(True, "0.5", None),
    ],
    "top_k": [-1, -2, 2**31, 2**63, 1.5, 2.0, NAN, True, "3", None],
}


@pytest.mark.parametrize(
    ("name", "value"),
    [(name, v) for name, values in BAD_SAMPLING.items() for v in values],
    ids=lambda x: repr(x)[:20],
)
def test_sampling_refuses_values_that_break_sampling(name, value):
    with pytest.raises(ValueError, match=rf"^{name} must be .*, got {re.escape(repr(value))}$"):
        Sampling(**{name: value})


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"temperature": 0},
        {"temperature": -0.0},  # 0: greedy
        {"temperature": MIN_TEMPERATURE},
        {"temperature": MAX_TEMPERATURE},
        {"temperature": 1},
        {"temperature": np.float32(0.7)},
        {"top_p": MIN_TOP_P},
        {"top_p": 1},
        {"top_k": 0},
        {"top_k": 1},
        {"top_k": MAX_TOP_K},
        {"top_k": np.int64(5)},
    ],
)
def test_sampling_accepts_its_bounds(kwargs):
    Sampling(**kwargs)


def test_the_server_accepts_exactly_what_sampling_accepts():
    """The protocol's bounds are Sampling's: a request the server takes always samples."""
    from relaypipe.serve import protocol
    from relaypipe.serve.engines import CompletionParams

    for const in ("MIN_TEMPERATURE", "MAX_TEMPERATURE", "MIN_TOP_P", "MAX_TOP_K"):
        assert getattr(protocol, const) is getattr(sampling, const)
    limits = protocol.ServeLimits()
    ctx = protocol.RequestContext(vocab_size=100, limits=limits)
    edges = {
        "temperature": [0.0, 1e-5, 9.99e-6, 1e-30, 0.5, 100.0, 100.5, -1.0],
        "top_p": [1e-6, 9.99e-7, 1e-46, 0.0, 0.5, 1.0, 1.5],
        "top_k": [-2, -1, 0, 1, 7, MAX_TOP_K, MAX_TOP_K + 1],
    }
    for name, values in edges.items():
        for value in values:
            body = {"prompt": [1, 2], name: value}
            try:
                req = protocol.parse_completion_request(body, ctx)
            except protocol.ApiError:
                server = False
            else:
                server = True
                CompletionParams.from_request(req, limits)  # builds its Sampling: no error
            try:
                Sampling(**{name: 0 if name == "top_k" and value == -1 else value})
                ours = True
            except ValueError:
                ours = False
            assert server == ours, (name, value)


@pytest.mark.parametrize(
    "sampling",
    [
        Sampling(temperature=MIN_TEMPERATURE, top_p=MIN_TOP_P),
        Sampling(temperature=MIN_TEMPERATURE),
        Sampling(temperature=1.0, top_p=MIN_TOP_P),
    ],
    ids=["coldest-narrowest", "coldest", "narrowest"],
)
def test_the_extreme_valid_samplings_decode_as_greedy(tiny_models, tokenizer, fast, sampling):
    """The coldest temperature and the narrowest top_p decode without error, and keep the most
    likely token only: greedy decoding."""
    model = tiny_models[0]
    backend = TransformersBackend(model, fast=fast)
    contexts = [ids(tokenizer, p) for p in PROMPTS]
    reqs = [GenRequest(i, c, 12, torch.Generator().manual_seed(i)) for i, c in enumerate(contexts)]
    got = backend.generate(reqs, sampling=sampling)
    for c, res in zip(contexts, got, strict=True):
        assert res.tokens == reference(model, c, 12)


def test_the_hottest_widest_sampling_decodes(tiny_models, tokenizer):
    backend = TransformersBackend(tiny_models[0])
    sampling = Sampling(temperature=MAX_TEMPERATURE, top_k=MAX_TOP_K, top_p=1.0)
    res = backend.generate(
        [GenRequest("x", ids(tokenizer, PROMPTS[0]), 16, torch.Generator().manual_seed(0))],
        sampling=sampling,
    )[0]
    assert len(res.tokens) == 16 or res.finish == "eos"
    assert all(0 <= t < tiny_models[0].config.vocab_size for t in res.tokens)


def test_sample_next_at_the_bounds_with_extreme_logits():
    gen = torch.Generator().manual_seed(0)
    logits = torch.tensor([3e4, -3e4, 0.0, 3e4 - 1, float("-inf")])
    cold = Sampling(temperature=MIN_TEMPERATURE, top_p=MIN_TOP_P)
    assert {sample_next(logits, cold, gen) for _ in range(20)} == {0}
    hot = Sampling(temperature=MAX_TEMPERATURE, top_k=MAX_TOP_K)
    assert {sample_next(logits, hot, gen) for _ in range(50)} <= {0, 1, 2, 3}
