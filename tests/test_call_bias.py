"""The call bias (RelayConfig.call_bias): a logit bias on the student's <call> at decoding time.

Backend level: GenRequest.logit_bias on TransformersBackend (zero is no bias, biased greedy
tokens are those of biased recomputation, +-inf force/ban, validation). Decoder level with the
tiny micro models and scripted students: 0 is today's decode, a large bias calls at once, -inf
never, no effect outside relay/fixed_help, a turn split at <call> is still one turn, the teacher
share grows with the bias, and bad values are refused."""

from __future__ import annotations

import itertools
import math
from collections.abc import Hashable, Sequence
from dataclasses import replace

import pytest
import torch

from relaypipe.relay.backends import GenRequest, GenResult
from relaypipe.relay.decoder import MODES, RelayConfig, RelayDecoder
from relaypipe.relay.grammar import CALL_OPEN
from relaypipe.relay.sampling import Sampling
from relaypipe.relay.trace import Source
from relaypipe.relay.transformers_backend import TransformersBackend
from tests.test_decoder import ScriptedBackend

C = Source.COMMAND

PROMPTS = ["Q: 1+2\nA: ", "Q: 33+4+5+6\nA: ", "Q: 5\nA: ", "Q: 12+1\nA: 7"]
HOT = Sampling(temperature=1.0)


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def open_id(tokenizer) -> int:
    return tokenizer.convert_tokens_to_ids(CALL_OPEN)


def many_prompts(n: int) -> list[str]:
    return [f"Q: {i}+{3 * i % 17}\nA: " for i in range(n)]


@torch.inference_mode()
def biased_reference(model, context: list[int], n: int, bias: dict[int, float]) -> list[int]:
    """Greedy tokens by full recomputation, the bias added to each step's logits."""
    seq, out = list(context), []
    eos = model.config.eos_token_id
    for _ in range(n):
        logits = model(torch.tensor([seq])).logits[0, -1].float()
        for t, b in bias.items():
            logits[t] += b
        tok = int(logits.argmax())
        out.append(tok)
        if tok == eos:
            break
        seq.append(tok)
    return out


def gens(seed: int, n: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


# ------------------------------------------------------------------ backend: GenRequest.logit_bias
@pytest.mark.parametrize("use_cache", [True, False], ids=["cached", "uncached"])
@pytest.mark.parametrize("fast", [True, False], ids=["lean", "hf"])
@pytest.mark.parametrize("sampling", [Sampling(), HOT], ids=["greedy", "sampled"])
def test_zero_or_empty_bias_is_no_bias(tiny_models, tokenizer, use_cache, fast, sampling):
    ctx = [ids(tokenizer, p) for p in PROMPTS]
    o = open_id(tokenizer)

    def run(bias):
        backend = TransformersBackend(tiny_models[0], use_cache=use_cache, fast=fast)
        reqs = [
            GenRequest(i, c, 12, g, bias)
            for i, (c, g) in enumerate(zip(ctx, gens(5, 4), strict=True))
        ]
        return [r.tokens for r in backend.generate(reqs, sampling=sampling)]

    plain = run(None)
    assert run({}) == plain
    assert run({o: 0.0}) == plain


@pytest.mark.parametrize("use_cache", [True, False], ids=["cached", "uncached"])
@pytest.mark.parametrize("fast", [True, False], ids=["lean", "hf"])
def test_biased_greedy_tokens_are_those_of_biased_recomputation(
    tiny_models, tokenizer, use_cache, fast
):
    model = tiny_models[0]
    ctx = [ids(tokenizer, p) for p in PROMPTS]
    first = [biased_reference(model, c, 1, {})[0] for c in ctx]
    biases = [
        {first[0]: -math.inf},  # ban what it would write first
        {open_id(tokenizer): 4.0, first[1]: -2.5},
        None,  # an unbiased batch-mate decodes as if alone
        {first[3]: -1e4, 7: 3.0},
    ]
    backend = TransformersBackend(model, use_cache=use_cache, fast=fast)
    n = [9, 6, 12, 8]
    got = backend.generate([GenRequest(i, c, n[i], None, biases[i]) for i, c in enumerate(ctx)])
    for c, k, b, res in zip(ctx, n, biases, got, strict=True):
        assert res.tokens == biased_reference(model, c, k, b or {})
    assert got[0].tokens[0] != first[0]
    # a second call reuses the cache and keeps biasing (prefix reuse with a bias)
    again = backend.generate([GenRequest(1, ctx[1] + got[1].tokens[:3], 5, None, biases[1])])[0]
    assert again.tokens == biased_reference(model, ctx[1] + got[1].tokens[:3], 5, biases[1])


@pytest.mark.parametrize("big", [1e308, 1e39, 1e7])
@pytest.mark.parametrize("temperature", [0.0, 1e-5, 5.0])
def test_huge_finite_biases_act_like_the_cap_without_overflow(
    tiny_models, tokenizer, big, temperature
):
    """A finite bias past float32 (the server fuzz found 1e308 failing a batch with an
    overflow) is applied as MAX_FINITE_BIAS: decisive, never inf or NaN."""
    backend = TransformersBackend(tiny_models[0])
    ctx = ids(tokenizer, PROMPTS[0])
    o = open_id(tokenizer)
    sampling = Sampling(temperature=temperature)
    up = backend.generate([GenRequest(0, ctx, 6, gens(0, 1)[0], {o: big})], sampling=sampling)
    assert up[0].tokens == [o] * 6
    down = backend.generate([GenRequest(1, ctx, 6, gens(0, 1)[0], {o: -big})], sampling=sampling)
    assert o not in down[0].tokens


@pytest.mark.parametrize("use_cache", [True, False], ids=["cached", "uncached"])
def test_plus_inf_forces_and_minus_inf_bans_under_hot_sampling(tiny_models, tokenizer, use_cache):
    backend = TransformersBackend(tiny_models[0], use_cache=use_cache)
    ctx = [ids(tokenizer, p) for p in PROMPTS]
    o = open_id(tokenizer)
    hot = Sampling(temperature=5.0, top_k=50, top_p=0.95)
    plain = backend.generate(
        [GenRequest(i, c, 30, g) for i, (c, g) in enumerate(zip(ctx, gens(0, 4), strict=True))],
        sampling=hot,
    )
    seen = {t for r in plain for t in r.tokens}
    banned = {t: -math.inf for t in sorted(seen)[:10]}
    forced = backend.generate(
        [
            GenRequest(i, c, 30, g, {o: math.inf})
            for i, (c, g) in enumerate(zip(ctx, gens(0, 4), strict=True))
        ],
        sampling=hot,
    )
    assert all(r.tokens == [o] * 30 for r in forced)
    two = backend.generate(
        [GenRequest(9, ctx[0], 40, gens(1, 1)[0], {o: math.inf, 5: math.inf})], sampling=hot
    )[0]
    assert set(two.tokens) == {o, 5}  # forced tokens share the mass
    kept = backend.generate(
        [
            GenRequest(i, c, 30, g, banned)
            for i, (c, g) in enumerate(zip(ctx, gens(0, 4), strict=True))
        ],
        sampling=hot,
    )
    assert not {t for r in kept for t in r.tokens} & set(banned)


def test_biased_sampling_depends_on_the_request_generator_only(tiny_models, tokenizer):
    ctx = [ids(tokenizer, p) for p in PROMPTS]
    bias = {open_id(tokenizer): 2.0}
    batch = TransformersBackend(tiny_models[0]).generate(
        [
            GenRequest(i, c, 10, g, bias if i % 2 else None)
            for i, (c, g) in enumerate(zip(ctx, gens(3, 4), strict=True))
        ],
        sampling=HOT,
    )
    for i in range(4):
        alone = TransformersBackend(tiny_models[0]).generate(
            [GenRequest("x", ctx[i], 10, gens(3 + i, 1)[0], bias if i % 2 else None)],
            sampling=HOT,
        )
        assert batch[i].tokens == alone[0].tokens


@pytest.mark.parametrize(
    "bias, match",
    [
        ({4: float("nan")}, "logit_bias\\[4\\]"),
        ({4: "1.0"}, "logit_bias\\[4\\]"),
        ({4: True}, "logit_bias\\[4\\]"),
        ({True: 1.0}, "token ids"),
        ({-1: 1.0}, "token ids"),
        ({"4": 1.0}, "token ids"),
        ({10_000: 1.0}, "outside the vocabulary"),
        ([(4, 1.0)], "mapping"),
    ],
)
def test_bad_logit_biases_are_refused(tiny_models, tokenizer, bias, match):
    backend = TransformersBackend(tiny_models[0])
    with pytest.raises(ValueError, match=match) as err:
        backend.generate([GenRequest("r", ids(tokenizer, "Q: 1"), 3, None, bias)])
    assert "'r'" in str(err.value) and "logit_bias" in str(err.value)


# ------------------------------------------------------------------ decoder: RelayConfig.call_bias
def real_decoder(tiny_models, tokenizer, use_cache=True, student_cls=None):
    student, teacher = tiny_models
    s = TransformersBackend(student, use_cache=use_cache)
    return RelayDecoder(
        student_cls(s) if student_cls else s,
        TransformersBackend(teacher, use_cache=use_cache),
        tokenizer,
    )


def fingerprint(traces):
    return [(t.token_ids, t.sources, t.turns, [e.kind for e in t.events]) for t in traces]


@pytest.mark.parametrize("mode", ["relay", "fixed_help"])
@pytest.mark.parametrize("use_cache", [True, False], ids=["cached", "uncached"])
@pytest.mark.parametrize("sampling", [Sampling(), HOT], ids=["greedy", "sampled"])
def test_bias_zero_is_todays_decode(tiny_models, tokenizer, mode, use_cache, sampling):
    dec = real_decoder(tiny_models, tokenizer, use_cache)
    base = dict(
        mode=mode, max_new_tokens=24, seed=4, student_sampling=sampling, teacher_sampling=sampling
    )
    plain = dec.decode_text(PROMPTS, RelayConfig(**base))
    zero = dec.decode_text(PROMPTS, RelayConfig(**base, call_bias=0.0))
    assert fingerprint(zero) == fingerprint(plain)
    assert fingerprint(
        real_decoder(tiny_models, tokenizer, not use_cache).decode_text(
            PROMPTS, RelayConfig(**base, call_bias=-0.0)
        )
    ) == fingerprint(plain)


@pytest.mark.parametrize("mode", ["relay", "fixed_help"])
@pytest.mark.parametrize("use_cache", [True, False], ids=["cached", "uncached"])
@pytest.mark.parametrize("sampling", [Sampling(), HOT], ids=["greedy", "sampled"])
def test_a_large_bias_calls_at_the_first_step(tiny_models, tokenizer, mode, use_cache, sampling):
    dec = real_decoder(tiny_models, tokenizer, use_cache)
    for bias in (40.0, math.inf):
        cfg = RelayConfig(mode=mode, max_new_tokens=12, call_bias=bias, student_sampling=sampling)
        traces = dec.decode_text(PROMPTS, cfg)
        assert all(t.token_ids[0] == dec.open_id for t in traces)
        assert all(t.sources[0] == Source.COMMAND for t in traces)


@pytest.mark.parametrize("use_cache", [True, False], ids=["cached", "uncached"])
def test_minus_inf_never_calls(tiny_models, tokenizer, use_cache):
    dec = real_decoder(tiny_models, tokenizer, use_cache)
    hot = Sampling(temperature=3.0)
    prompts = many_prompts(16)
    base = dict(max_new_tokens=40, student_sampling=hot, seed=2)
    # the control: this hot untrained student does write <call> now and then
    some = dec.decode_text(prompts, RelayConfig(**base, call_bias=1.0))
    assert any(dec.open_id in t.token_ids for t in some)
    for mode in ("relay", "fixed_help"):
        never = dec.decode_text(prompts, RelayConfig(**base, mode=mode, call_bias=-math.inf))
        assert not any(dec.open_id in t.token_ids for t in never)
        assert all(t.calls == 0 and not t.handoffs for t in never)
        # what is marked a command is a stray </call> (the bias is on the open tag only)
        for t in never:
            marked = {tok for tok, src in zip(t.token_ids, t.sources, strict=True) if src == C}
            assert marked <= {dec.close_id}


class NoBiasSupport:
    """A real backend that does not declare supports_logit_bias (like an HTTP teacher)."""

    def __init__(self, backend):
        self.backend = backend
        self.eos_token_ids = backend.eos_token_ids
        self.biases: list = []

    def generate(self, requests, **kw):
        self.biases.extend(r.logit_bias for r in requests)
        return self.backend.generate(requests, **kw)

    def release(self, key: Hashable) -> None:
        self.backend.release(key)


@pytest.mark.parametrize("mode", ["student", "teacher", "random_router"])
def test_no_effect_in_modes_without_calls(tiny_models, tokenizer, mode):
    dec = real_decoder(tiny_models, tokenizer, student_cls=NoBiasSupport)
    base = dict(
        mode=mode,
        router_p=0.3,
        max_new_tokens=20,
        seed=1,
        student_sampling=HOT,
        teacher_sampling=HOT,
    )
    plain = dec.decode_text(PROMPTS, RelayConfig(**base))
    for bias in (40.0, -math.inf, math.inf, -3.0):
        assert fingerprint(
            dec.decode_text(PROMPTS, RelayConfig(**base, call_bias=bias))
        ) == fingerprint(plain)
    assert all(b is None for b in dec.student.biases)  # nothing was even asked of the backend


def test_a_bias_needs_a_student_that_supports_it(tiny_models, tokenizer):
    dec = real_decoder(tiny_models, tokenizer, student_cls=NoBiasSupport)
    with pytest.raises(
        ValueError, match=r"call_bias=2\.0 needs .*supports_logit_bias.*NoBiasSupport"
    ):
        dec.decode_text(PROMPTS, RelayConfig(call_bias=2.0))
    assert not dec.student.biases  # refused before anything was decoded
    dec.decode_text(PROMPTS[:1], RelayConfig(call_bias=0.0, max_new_tokens=4))  # 0 needs nothing


@pytest.mark.parametrize("value", [float("nan"), "1.0", True, None, [1.0]])
def test_bad_call_bias_is_refused(value):
    with pytest.raises(ValueError, match="call_bias"):
        RelayConfig(call_bias=value)


@pytest.mark.parametrize("value", [0, 0.0, -3, 2.5, math.inf, -math.inf, 1e6])
def test_call_bias_accepts_numbers_and_infinities(value):
    assert RelayConfig(call_bias=value).call_bias == value
    assert RelayConfig(call_bias=value, mode="relay").biased == (value != 0)
    for mode in MODES:
        assert RelayConfig(call_bias=value, mode=mode).biased == (
            value != 0 and mode in ("relay", "fixed_help")
        )


# ------------------------------------------------------------------ decoder: where the bias goes
class BiasScripted(ScriptedBackend):
    """A streamed scripted student that declares bias support (and ignores the bias): its
    tokens are the same biased or not, so only the decoder's handling differs. Records every
    request's logit bias and stop tokens."""

    supports_logit_bias = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.biases: dict[int, list] = {}
        self.stops: list[frozenset[int]] = []

    def generate(
        self, requests: Sequence[GenRequest], *, stop_token_ids=frozenset(), sampling=Sampling()
    ) -> list[GenResult]:
        for r in requests:
            self.biases.setdefault(r.key[1], []).append(r.logit_bias)
        self.stops.append(stop_token_ids)
        return super().generate(requests, stop_token_ids=stop_token_ids, sampling=sampling)


def scripted(tokenizer, stream, teacher, bias, **cfg):
    student = BiasScripted(tokenizer, {0: stream}, stream=True)
    dec = RelayDecoder(
        student,
        ScriptedBackend(tokenizer, {0: teacher}),
        tokenizer,
        RelayConfig(call_bias=bias, **cfg),
    )
    (trace,) = dec.decode_text(["Q: 1\nA: "])
    return trace, student


@pytest.mark.parametrize("mode", ["relay", "fixed_help"])
def test_a_turn_split_at_the_open_tag_is_one_turn_and_the_body_is_unbiased(tokenizer, mode):
    stream = ["12<call>3</call>", "x<call>2</call>", "y<call>1</call>", "z<eos>"]
    cfg = dict(mode=mode, max_new_tokens=64, max_calls=2, fixed_n=2)
    plain, p_student = scripted(tokenizer, stream, ["ab", "cd", "ef"], 0.0, **cfg)
    biased, b_student = scripted(tokenizer, stream, ["ab", "cd", "ef"], 1.5, **cfg)
    assert fingerprint([biased]) == fingerprint([plain])
    assert [replace(h, seconds=0) for h in biased.handoffs] == [
        replace(h, seconds=0) for h in plain.handoffs
    ]
    assert plain.turns == biased.turns == 4
    o, c = tokenizer.convert_tokens_to_ids([CALL_OPEN, "</call>"])
    assert all(s == frozenset([c]) for s in p_student.stops)
    assert all(s == frozenset([o, c]) for s in b_student.stops)
    assert all(b is None for b in p_student.biases[0])
    # biased outside commands, unbiased inside, none once max_calls is spent
    want = [{o: 1.5}, None, {o: 1.5}, None, None, None, None]
    assert b_student.biases[0] == want
    assert [e.kind for e in biased.events] == ["budget"]


def test_a_split_turn_counts_once_against_max_turns(tokenizer):
    stream = ["1<call>0</call>", "2<call>0</call>", "3<eos>"]  # "no call" commands
    plain, _ = scripted(tokenizer, stream, [], 0.0, max_turns=2)
    biased, _ = scripted(tokenizer, stream, [], 2.0, max_turns=2)
    assert fingerprint([biased]) == fingerprint([plain])
    assert biased.turns == 2 and biased.stop_reason == plain.stop_reason == "max_turns"
    assert tokenizer.decode(biased.token_ids) == "1<call>0</call>2<call>0</call>"


def test_open_tag_at_the_last_allowed_token_ends_as_without_a_bias(tokenizer):
    stream = ["12<call>3</call>"]
    plain, _ = scripted(tokenizer, stream, [], 0.0, max_new_tokens=3)
    biased, _ = scripted(tokenizer, stream, [], 2.0, max_new_tokens=3)
    assert fingerprint([biased]) == fingerprint([plain])
    assert biased.stop_reason == plain.stop_reason
    assert [e.kind for e in biased.events] == ["unterminated"]


# ------------------------------------------------------------------ the teacher share over biases
class CommandBodies:
    """A real student whose command bodies are scripted: a request resumed right after its
    ``<call>`` (the decoder's split under a call bias) gets ``body</call>``; everything else is
    the model's own, logit bias included. The untrained model decides *when* to call."""

    supports_logit_bias = True
    open_stream = None  # scripted through generate: the decoder's round schedule (BatchLane)

    def __init__(self, backend: TransformersBackend, tokenizer, body: str = "6"):
        self.backend = backend
        self.eos_token_ids = backend.eos_token_ids
        self.open = tokenizer.convert_tokens_to_ids(CALL_OPEN)
        self.body = tokenizer(body + "</call>", add_special_tokens=False).input_ids

    def generate(self, requests, *, stop_token_ids=frozenset(), sampling=Sampling()):
        out: list = [None] * len(requests)
        real = []
        for k, r in enumerate(requests):
            if r.context[-1] == self.open:
                toks = self.body[: r.max_new_tokens]
                finish = "stop" if toks[-1] in stop_token_ids else "length"
                out[k] = GenResult(toks, finish, 1)
            else:
                real.append(k)
        done = self.backend.generate(
            [requests[k] for k in real], stop_token_ids=stop_token_ids, sampling=sampling
        )
        for k, res in zip(real, done, strict=True):
            out[k] = res
        return out

    def release(self, key: Hashable) -> None:
        self.backend.release(key)


def share(traces) -> float:
    return sum(t.n_teacher for t in traces) / sum(t.n_generated for t in traces)


def test_teacher_share_grows_with_the_bias(tiny_models, tokenizer):
    student, teacher = tiny_models
    dec = RelayDecoder(
        CommandBodies(TransformersBackend(student), tokenizer),
        TransformersBackend(teacher),
        tokenizer,
    )
    prompts = many_prompts(48)
    grid = [-math.inf, -4.0, 0.0, 2.0, 3.0, 4.0, 6.0, math.inf]
    shares = []
    for bias in grid:
        cfg = RelayConfig(
            max_new_tokens=24, seed=11, call_bias=bias, student_sampling=HOT, teacher_sampling=HOT
        )
        shares.append(share(dec.decode_text(prompts, cfg)))
    assert shares[0] == 0.0
    assert shares[-1] > 0.4
    for lower, higher in itertools.pairwise(shares):
        assert higher >= lower - 0.02, shares  # non-decreasing up to sampling noise
    assert shares[-2] > shares[2] + 0.2, shares  # and it really moves
