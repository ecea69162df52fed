"""Backends: something that continues token contexts. The relay decoder talks only to this.

A backend receives, per request, the *whole* context in its own view (the student's view with
commands, or the teacher's view without) and returns up to ``max_new_tokens`` new tokens. It
may keep per-request state between calls under the request's ``key``; the in-process backend
keeps each request's KV cache, so a call prefills only the tokens it has not seen yet (the
longest common prefix with what it cached is reused). An HTTP backend fits the same interface.

Logit bias (an optional capability). A request may carry ``GenRequest.logit_bias``, a map from
token id to a number added to that token's logit at every sampling step of the request, before
temperature, top-k and top-p, greedy or not (OpenAI's ``logit_bias``, in logit units). ``-inf``
bans the token; ``+inf`` forces it (every other token is banned; several forced tokens share
the mass equally); NaN is refused. A backend that honours it says so with a class attribute
``supports_logit_bias = True`` (:class:`TransformersBackend` does); a backend without the
attribute may ignore the field, so a caller that needs a bias must check the flag first (the
relay decoder does, for its ``call_bias``). ``None`` or ``{}`` is no bias: the request decodes
exactly as it would without the field.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import math
import numbers
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

log = logging.getLogger(__name__)


# The bounds of a valid Sampling, also the server's request bounds (relaypipe.serve.protocol
# imports them from here). Past them sampling breaks in float32: a positive temperature under
# MIN_TEMPERATURE overflows logits / temperature (1e-30: inf - inf = NaN in the softmax), a
# top_p under MIN_TOP_P may round to 0 (below ~1e-45) and drop every token.
MIN_TEMPERATURE = 1e-5
MAX_TEMPERATURE = 100.0
MIN_TOP_P = 1e-6
MAX_TOP_K = 2**31 - 1


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class Sampling:
    """How to pick the next token. ``temperature == 0`` is greedy decoding.

    Checked at construction (a ValueError naming the field and the value): ``temperature`` is
    0 or in [MIN_TEMPERATURE, MAX_TEMPERATURE], ``top_p`` in [MIN_TOP_P, 1], ``top_k`` an
    integer in [0, MAX_TOP_K] (0: no cut; the server maps its -1 to 0); no NaN, no infinity,
    no bool.
    """

    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0

    def __post_init__(self) -> None:
        t, p, k = self.temperature, self.top_p, self.top_k
        if not (_is_real(t) and (t == 0 or MIN_TEMPERATURE <= t <= MAX_TEMPERATURE)):
            raise ValueError(
                f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, "
                f"{MAX_TEMPERATURE:g}], got {t!r}"
            )
        if not (_is_real(p) and MIN_TOP_P <= p <= 1):
            raise ValueError(f"top_p must be in [{MIN_TOP_P:g}, 1], got {p!r}")
        if not (
            isinstance(k, numbers.Integral) and not isinstance(k, bool) and 0 <= k <= MAX_TOP_K
        ):
            raise ValueError(
                f"top_k must be an integer in [0, {MAX_TOP_K}] (0: no top-k cut), got {k!r}"
            )


@dataclass
class GenRequest:
    key: Hashable  # identity of the request; state cached under it until release(key)
    context: list[int]  # the full context in this backend's view
    max_new_tokens: int
    generator: torch.Generator | None = None  # per-request RNG: results independent of batching
    # token id -> added to its logit at every step (module docstring, "Logit bias"); honoured
    # by backends with ``supports_logit_bias = True``
    logit_bias: Mapping[int, float] | None = None


@dataclass
class GenResult:
    tokens: list[int]  # new tokens, including a final stop/EOS token if one was produced
    finish: str  # "stop" (a stop token), "eos", "length", or "error"
    prefill_tokens: int  # context tokens processed before the first new token
    error: str | None = None


class Backend(Protocol):
    """What the relay decoder needs from a model.

    Optional: ``supports_logit_bias = True`` where ``generate`` honours each request's
    ``logit_bias`` (module docstring); the decoder needs it of the student only for a non-zero
    ``RelayConfig.call_bias``.
    """

    eos_token_ids: frozenset[int]

    def generate(
        self,
        requests: Sequence[GenRequest],
        *,
        stop_token_ids: frozenset[int] = frozenset(),
        sampling: Sampling = Sampling(),
    ) -> list[GenResult]: ...

    def release(self, key: Hashable) -> None: ...


def check_logit_bias(bias: Mapping[int, float] | None, vocab_size: int | None = None) -> None:
    """Refuse a logit bias no backend can apply: a ValueError naming ``logit_bias``, the token
    and the value. Token ids are integers (not bool) in [0, vocab_size); values are numbers,
    finite or +-inf, not NaN."""
    if bias is None:
        return
    if not isinstance(bias, Mapping):
        raise ValueError(f"logit_bias must be a mapping token id -> bias, got {bias!r}")
    for tok, value in bias.items():
        if not isinstance(tok, numbers.Integral) or isinstance(tok, bool) or tok < 0:
            raise ValueError(f"logit_bias: token ids are integers >= 0, got {tok!r}")
        if vocab_size is not None and tok >= vocab_size:
            raise ValueError(
                f"logit_bias: token id {tok} is outside the vocabulary (size {vocab_size})"
            )
        if not _is_real(value) or math.isnan(value):
            raise ValueError(
                f"logit_bias[{tok}] must be a number (finite, or +-inf), got {value!r}"
            )


# A finite logit bias acts as at most this much: larger finite values (up to a double's 1e308)
# would overflow float32, or turn to inf once divided by a low temperature; no logit gap a model
# produces comes near it, so the pick is the same.
MAX_FINITE_BIAS = 1e6


class _LogitBias:
    """The logit biases of a batch as dense rows, applied to each step's logits.

    ``add`` holds the finite biases and -inf bans (0 elsewhere); rows with a +inf bias are
    replaced by 0 on their forced tokens and -inf elsewhere (adding +inf would turn softmax
    into NaN). Only built when some request has a bias: an unbiased batch never comes here.
    """

    def __init__(self, biases: Sequence[Mapping[int, float] | None], vocab: int, dev) -> None:
        self.add = torch.zeros((len(biases), vocab), dtype=torch.float32)
        self.force = torch.zeros((len(biases), vocab), dtype=torch.bool)
        for row, bias in enumerate(biases):
            for tok, value in (bias or {}).items():
                if value == math.inf:
                    self.force[row, tok] = True
                elif value == -math.inf:
                    self.add[row, tok] = value
                else:  # beyond float32 (or a hot temperature's division); decisive already
                    self.add[row, tok] = max(-MAX_FINITE_BIAS, min(MAX_FINITE_BIAS, value))
        self.any_force = bool(self.force.any())
        self.add, self.force = self.add.to(dev), self.force.to(dev)

    def __call__(self, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Biased float32 logits [R, V] of the batch rows ``rows`` (indices into the batch).
        Float32 is exact for the unbiased rows (x + 0 == x), so their picks do not change."""
        out = logits.float() + self.add[rows]
        if self.any_force:
            force = self.force[rows]
            forced = torch.where(force, 0.0, float("-inf"))
            out = torch.where(force.any(dim=-1, keepdim=True), forced, out)
        return out


def sample_next(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """One token id from a [V] logits row."""
    if sampling.temperature == 0:
        return int(torch.argmax(logits))
    logits = logits.float() / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(logits, min(sampling.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if sampling.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        drop = torch.cumsum(sorted_p, 0) - sorted_p >= sampling.top_p
        sorted_p[drop] = 0.0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=generator))


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off on ``device`` (where torch has autocast for it)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _text_config(model: PreTrainedModel):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _params_version(params: Sequence[torch.Tensor]) -> tuple[int, ...]:
    """Changes whenever a parameter is updated in place (an optimiser step, a state-dict
    load). Parameters made under inference mode keep no version: taken as never changing."""
    try:
        return tuple(p._version for p in params)
    except RuntimeError:
        return ()


def _grown(needed: int, have: int, chunk: int, cap: int | None = None) -> int:
    """Columns to allocate when ``have`` are too few for ``needed``: the next multiple of
    ``chunk`` or twice ``have``, whichever is more (a long decode is copied O(log n) times, a
    short one holds about what it wrote), but no more than ``cap`` (never less than needed)."""
    size = max(-(-needed // chunk) * chunk, 2 * have)
    return size if cap is None else max(needed, min(size, cap))


class _KVStore:
    """Keys and values of every cached request in one tensor.

    ``data`` is ``[layers, 2, slots, kv_heads, length, head_dim]`` (2: keys, values). A request
    owns one slot and its context token j sits at column j, so requests of any lengths batch
    without padding their caches: a query at position p attends to columns 0..p of its row.
    Fresh storage is zero, and only finite values are ever written, so columns a row does not
    attend to are harmless under a mask. Columns are added as sequences lengthen (see
    :func:`_grown`), not for the longest possible decode up front.
    """

    def __init__(
        self, layers: int, kv_heads: int, head_dim: int, dtype, device, chunk: int = 64
    ) -> None:
        self.data = torch.zeros((layers, 2, 0, kv_heads, 0, head_dim), dtype=dtype, device=device)
        self._free: list[int] = []  # a heap: the lowest free slot first keeps batches contiguous
        self.slots_used = 0
        self.chunk = chunk

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def acquire(self) -> int:
        if self._free:
            return heapq.heappop(self._free)
        self.slots_used += 1
        return self.slots_used - 1

    def release(self, slot: int) -> None:
        heapq.heappush(self._free, slot)

    def reserve(self, length: int) -> None:
        """Room for every acquired slot and ``length`` columns (grows geometrically)."""
        n_layers, _, slots, heads, cols, dim = self.data.shape
        if slots >= self.slots_used and cols >= length:
            return
        new_slots = slots if slots >= self.slots_used else max(self.slots_used, 2 * slots)
        new_cols = cols if cols >= length else _grown(length, cols, self.chunk)
        grown = self.data.new_zeros((n_layers, 2, new_slots, heads, new_cols, dim))
        grown[:, :, :slots, :, :cols] = self.data
        self.data = grown


@dataclass
class _Entry:
    slot: int
    ids: list[int]  # the tokens whose keys/values sit in columns 0..len-1 of the slot


class _HFRunner:
    """Any Hugging Face causal LM through its own forward, with the slot cache plugged in.

    The model sees a duck-typed cache whose ``update`` writes the new keys/values at each
    token's position and returns the batch's columns, and a ready 4D additive mask (which
    Hugging Face passes through as-is).
    """

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        # padding and finished rows may sit past a learned position table: clamp their ids
        self.max_position = getattr(_text_config(model), "max_position_embeddings", None)

    def refresh(self, version: tuple[int, ...]) -> None:
        pass

    def __call__(
        self,
        ids: torch.Tensor,  # [B, T]
        pos: torch.Tensor,  # [B, T] position (= cache column) of each input token
        kv: torch.Tensor,  # [layers, 2, B, kv_heads, >= hi, head_dim]
        hi: int,  # columns attended: 0..hi-1
        last: torch.Tensor | None,  # [B] index of each row's last real input; None: T-1
        cols: torch.Tensor,  # [>= hi] arange
        rows: torch.Tensor,  # [B, 1] arange
    ) -> torch.Tensor:
        """Logits [B, V] for each row's last input; writes the inputs' keys/values into kv."""
        allowed = cols[:hi] <= pos.unsqueeze(-1)  # [B, T, hi]
        bias = torch.zeros(allowed.shape, dtype=kv.dtype, device=kv.device)
        bias.masked_fill_(~allowed, torch.finfo(kv.dtype).min)
        logits = self.model(
            input_ids=ids,
            attention_mask=bias.unsqueeze(1),
            position_ids=pos if self.max_position is None else pos.clamp(max=self.max_position - 1),
            cache=_SlotCache(kv, pos, hi, rows),
            use_cache=True,
        ).logits  # [B, T, V]
        return logits[:, -1] if last is None else logits[rows[:, 0], last]


class _SlotCache:
    """What a Hugging Face attention layer needs from a cache, over the slot layout."""

    is_compileable = False

    def __init__(self, kv: torch.Tensor, pos: torch.Tensor, hi: int, rows: torch.Tensor) -> None:
        self.kv, self.pos, self.hi, self.rows = kv, pos, hi, rows

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        if keys.shape[1] != self.kv.shape[3] or keys.shape[-1] != self.kv.shape[-1]:
            raise ValueError(
                f"layer {layer_idx}: keys {tuple(keys.shape)} do not fit the cache "
                f"{tuple(self.kv.shape)} sized from the model config"
            )
        k, v = self.kv[layer_idx, 0], self.kv[layer_idx, 1]
        # .to: a forward under autocast (accelerate wraps a mixed-precision model's forward in
        # one) yields bf16 keys for float32 weights; the store keeps the weights' dtype
        k[self.rows, :, self.pos] = keys.transpose(1, 2).to(k.dtype)
        v[self.rows, :, self.pos] = values.transpose(1, 2).to(v.dtype)
        return k[:, :, : self.hi], v[:, :, : self.hi]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.hi - self.pos.shape[1]


class _LlamaRunner:
    """A lean forward for Llama-architecture models, reading the model's own weights.

    The arithmetic of Hugging Face's ``LlamaForCausalLM`` (RMSNorm, rotary embedding, SiLU
    MLP, in the same order, so greedy tokens agree), without its per-call machinery: building
    masks, output records and module dispatch cost more than a micro model's matmuls. Fewer
    ops per layer: q/k/v and gate/up are one matmul each, the rotary "rotate half" is one roll
    with a signed sine table, the vocabulary projection runs only on each row's last position.
    Weights are re-read whenever a parameter changes (training between rollouts).
    """

    def __init__(self, model: PreTrainedModel) -> None:
        cfg = _text_config(model)
        self.model = model
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.eps = cfg.rms_norm_eps
        self._version: tuple[int, ...] | None = None
        self._layers: list[tuple[torch.Tensor, ...]] = []
        self._rope: tuple[torch.Tensor, ...] = (torch.empty(0),) * 3  # inv_freq, cos, signed sin

    @staticmethod
    def supports(model: torch.nn.Module) -> bool:
        cfg = getattr(model, "config", None)
        if type(model).__name__ != "LlamaForCausalLM" or cfg is None:
            return False
        rope = getattr(cfg, "rope_parameters", None) or {}
        rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
        return (
            cfg.hidden_act == "silu"
            and rope.get("rope_type", "default") == "default"
            and getattr(cfg, "pretraining_tp", 1) == 1
            and not getattr(cfg, "attention_bias", False)
            and not getattr(cfg, "mlp_bias", False)
            and getattr(rotary, "attention_scaling", None) == 1.0
        )

    def refresh(self, version: tuple[int, ...]) -> None:
        """Re-read the weights if a parameter changed since the last call."""
        if version == self._version:
            return
        self._version = version
        self._layers = []
        for layer in self.model.model.layers:
            att, mlp = layer.self_attn, layer.mlp
            qkv = torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight])
            gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
            self._layers.append(
                (
                    layer.input_layernorm.weight,
                    qkv,
                    att.o_proj.weight,
                    layer.post_attention_layernorm.weight,
                    gate_up,
                    mlp.down_proj.weight,
                )
            )
        self._final_norm = self.model.model.norm.weight
        self._embed = self.model.get_input_embeddings().weight
        self._head = self.model.get_output_embeddings().weight

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused op, the same arithmetic as below
            return F.rms_norm(x, (x.shape[-1],), weight, self.eps)
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * h.to(x.dtype)

    def _cos_sin(self, pos: torch.Tensor, hi: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary tables looked up by position: the values HF computes for those positions,
        the sine negated on the first half so that ``rotate_half(x) * sin`` becomes
        ``roll(x) * signed_sin`` (negation is exact)."""
        inv = self.model.model.rotary_emb.inv_freq
        inv_old, cos, sin = self._rope
        if len(cos) < hi or inv_old is not inv or cos.dtype != dtype:
            n = max(256, 2 * hi)
            freqs = torch.arange(n, device=inv.device).float().unsqueeze(-1) * inv.float()
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
            sin[:, : sin.shape[1] // 2].neg_()
            self._rope = (inv, cos, sin)
        return cos[pos].unsqueeze(1), sin[pos].unsqueeze(1)  # [B, 1, T, D]

    def __call__(
        self,
        ids: torch.Tensor,
        pos: torch.Tensor,
        kv: torch.Tensor,
        hi: int,
        last: torch.Tensor | None,
        cols: torch.Tensor,
        rows: torch.Tensor,
    ) -> torch.Tensor:
        b, t = ids.shape
        h, g, d = self.n_heads, self.n_kv, self.head_dim
        x = F.embedding(ids, self._embed)
        cos, sin = self._cos_sin(pos, hi, x.dtype)
        allowed = (cols[:hi] <= pos.unsqueeze(-1)).unsqueeze(1)  # [B, 1, T, hi]
        for i, (w_in, w_qkv, w_o, w_post, w_gu, w_down) in enumerate(self._layers):
            qkv = F.linear(self._norm(x, w_in), w_qkv).view(b, t, h + 2 * g, d).transpose(1, 2)
            qk = qkv[:, : h + g]
            qk = qk * cos + qk.roll(d // 2, dims=-1) * sin
            keys, values = kv[i, 0], kv[i, 1]
            keys[rows, :, pos] = qk[:, h:].transpose(1, 2)
            values[rows, :, pos] = qkv[:, h + g :].transpose(1, 2)
            k, v = keys[:, :, :hi], values[:, :, :hi]
            if g != h:
                k = k.repeat_interleave(h // g, dim=1)
                v = v.repeat_interleave(h // g, dim=1)
            att = F.scaled_dot_product_attention(qk[:, :h], k, v, attn_mask=allowed)
            x = x + F.linear(att.transpose(1, 2).reshape(b, t, h * d), w_o)
            gate, up = F.linear(self._norm(x, w_post), w_gu).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, w_down)
        x = x[:, -1] if last is None else x[rows[:, 0], last]
        return F.linear(self._norm(x, self._final_norm), self._head)


class TransformersBackend:
    """An in-process Hugging Face causal LM with per-request KV caches kept across calls.

    Every request owns a slot of one key/value store, with its context token j at column j
    (see :class:`_KVStore`). A call prefills only what a request has not cached
    (the longest common prefix with its cached tokens is reused; a context that diverges
    simply overwrites from there), right-padded to the longest such suffix, then decodes all
    requests together one token per step until each has stopped. Nothing is stitched or
    padded in the cache: a batch whose slots are consecutive works on a view of the store,
    any other batch gathers its rows once per call and writes back only the columns it wrote.
    The mask is "column <= own position", so a request's tokens do not depend on its
    batch-mates beyond floating-point noise.

    Memory follows what is decoded: the store gains columns in steps of ``kv_chunk`` (or by
    doubling) as sequences lengthen, not batch x (prompt + max_new_tokens) up front, and it is
    freed once no request is cached (the relay decoder releases every request when its decode
    ends), so backends that take turns (evaluation's modes) do not all hold a cache at once.
    ``kv_bytes`` is what the store holds now, ``kv_peak_bytes`` the most held at once.

    ``fast`` picks the forward: a lean re-implementation for standard Llama models (the micro
    pair; numerically the same arithmetic), else the model's own forward with the slot cache
    plugged in. ``None`` (default) uses the lean one where supported.

    Honours each request's ``logit_bias`` (module docstring), on both forwards, cached or not;
    a batch without one runs exactly the code it ran before the bias existed.
    """

    supports_logit_bias = True

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        use_cache: bool = True,
        name: str = "model",
        fast: bool | None = None,
        kv_chunk: int = 64,
    ):
        if fast and not _LlamaRunner.supports(model):
            raise ValueError(f"fast=True needs a standard Llama model, not {type(model).__name__}")
        if kv_chunk < 1:
            raise ValueError(f"kv_chunk must be >= 1, got {kv_chunk}")
        self.model = model.eval()
        self.name = name
        self.use_cache = use_cache
        cfg = model.config
        eos = cfg.eos_token_id if cfg.eos_token_id is not None else []
        self.eos_token_ids = frozenset([eos] if isinstance(eos, int) else eos)
        pad = cfg.pad_token_id
        self.pad_id = int(pad if pad is not None else next(iter(self.eos_token_ids), 0))
        use_fast = _LlamaRunner.supports(model) if fast is None else fast
        self._runner = _LlamaRunner(model) if use_fast else _HFRunner(model)
        text = _text_config(model)
        heads = text.num_attention_heads
        self._geometry = (
            text.num_hidden_layers,
            getattr(text, "num_key_value_heads", None) or heads,
            getattr(text, "head_dim", None) or text.hidden_size // heads,
        )
        self.vocab_size: int | None = getattr(text, "vocab_size", None)
        window = getattr(text, "sliding_window", None)
        self._window = window if getattr(text, "use_sliding_window", True) is not False else None
        self.kv_chunk = kv_chunk
        self.kv_peak_bytes = 0
        self._estimate_logged = 0  # the largest memory estimate logged at info level
        self._store: _KVStore | None = None
        self._entries: dict[Hashable, _Entry] = {}
        # the parameters as of now: updates in place are noticed, replaced modules are not
        self._params = list(model.parameters())
        self._version = _params_version(self._params)
        self._cols = torch.empty(0, dtype=torch.long)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def fast(self) -> bool:
        return isinstance(self._runner, _LlamaRunner)

    @property
    def kv_bytes_per_token(self) -> int:
        """Keys and values of one token: layers x kv_heads x head_dim x 2 x dtype size."""
        layers, heads, dim = self._geometry
        return layers * heads * dim * 2 * self._params[0].element_size()

    @property
    def kv_bytes(self) -> int:
        """Bytes the key/value store holds now (0 when no request is cached)."""
        return self._store.nbytes if self._store is not None else 0

    def release(self, key: Hashable) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None and self._store is not None:
            self._store.release(entry.slot)
        if not self._entries:
            self._store = None  # nothing cached: give the memory back until the next call

    def cached_tokens(self, key: Hashable) -> int:
        entry = self._entries.get(key)
        return len(entry.ids) if entry else 0

    def _sync(self) -> torch.device:
        """Follow the model: new weights invalidate cached keys/values, a move the store."""
        dev, dtype = self._params[0].device, self._params[0].dtype
        version = _params_version(self._params)
        if version != self._version:
            self._version = version
            for entry in self._entries.values():
                entry.ids = []
        if self._store is None or self._store.data.device != dev or self._store.data.dtype != dtype:
            store = _KVStore(*self._geometry, dtype=dtype, device=dev, chunk=self.kv_chunk)
            for entry in self._entries.values():
                entry.slot, entry.ids = store.acquire(), []
            self._store = store
        self._runner.refresh(version)
        return dev

    def _index(self, items: list[int], dev: torch.device) -> torch.Tensor:
        return torch.tensor(items, dtype=torch.long, device=dev)

    def _columns(self, n: int, dev: torch.device) -> torch.Tensor:
        if len(self._cols) < n or self._cols.device != dev:
            self._cols = torch.arange(max(n, 2 * len(self._cols), 256), device=dev)
        return self._cols

    @torch.inference_mode()
    def generate(
        self,
        requests: Sequence[GenRequest],
        *,
        stop_token_ids: frozenset[int] = frozenset(),
        sampling: Sampling = Sampling(),
    ) -> list[GenResult]:
        if not requests:
            return []
        seen: set[Hashable] = set()
        for r in requests:
            if not r.context:
                raise ValueError(f"request {r.key!r}: empty context (a prompt needs a token)")
            if r.key in seen:
                raise ValueError(f"request key {r.key!r} appears twice in one call")
            seen.add(r.key)
            try:
                check_logit_bias(r.logit_bias, self.vocab_size)
            except ValueError as err:
                raise ValueError(f"request {r.key!r}: {err}") from None
        results = [GenResult(tokens=[], finish="length", prefill_tokens=0) for _ in requests]
        live = [i for i, r in enumerate(requests) if r.max_new_tokens > 0]
        if live:
            if not self._entries:  # a decode starts
                self._log_estimate([requests[i] for i in live])
            # In the weights' dtype even inside a caller's autocast: trl trains float32 weights
            # under bf16 autocast and calls the rollout from there, and the store (and so the
            # tokens) must not depend on the caller's context.
            with _no_autocast(self.device):
                done = self._decode([requests[i] for i in live], stop_token_ids, sampling)
            for i, res in zip(live, done, strict=True):
                results[i] = res
        return results

    def _log_estimate(self, batch: list[GenRequest]) -> None:
        """Before a decode starts (nothing cached yet): how much key/value memory it may take,
        at most. Logged at info level when it is the largest so far, else at debug level."""
        per_token = self.kv_bytes_per_token
        tokens = sum(len(r.context) + r.max_new_tokens for r in batch)
        estimate = per_token * tokens
        level = logging.INFO if estimate > self._estimate_logged else logging.DEBUG
        self._estimate_logged = max(self._estimate_logged, estimate)
        layers, heads, dim = self._geometry
        log.log(
            level,
            "%s: KV cache up to %.1f MiB for %d requests (%d tokens x %d B/token = %d layers x "
            "%d kv heads x %d head_dim x 2 x %d B); allocated as tokens are decoded",
            self.name,
            estimate / 2**20,
            len(batch),
            tokens,
            per_token,
            layers,
            heads,
            dim,
            self._params[0].element_size(),
        )

    def _held(self, kv: torch.Tensor, copied: bool) -> None:
        """Record the key/value memory held now (the store, plus this call's copy if any)."""
        held = self.kv_bytes + (kv.numel() * kv.element_size() if copied else 0)
        self.kv_peak_bytes = max(self.kv_peak_bytes, held)

    def _decode(
        self, batch: list[GenRequest], stop_token_ids: frozenset[int], sampling: Sampling
    ) -> list[GenResult]:
        dev = self._sync()
        store = self._store
        assert store is not None
        stops = stop_token_ids | self.eos_token_ids
        b = len(batch)
        ctx_len = [len(r.context) for r in batch]
        max_new = [r.max_new_tokens for r in batch]

        # 1. What each request has cached; the suffix it still has to prefill.
        entries: list[_Entry] = []
        if self.use_cache:
            for r in batch:
                entry = self._entries.get(r.key)
                if entry is None:
                    entry = self._entries[r.key] = _Entry(store.acquire(), [])
                entries.append(entry)
            reuse = [
                min(_common_prefix(e.ids, r.context), n - 1)
                for e, r, n in zip(entries, batch, ctx_len, strict=True)
            ]
            for e, c in zip(entries, reuse, strict=True):
                del e.ids[c:]  # columns from c on get overwritten (also if this call fails)
        else:
            reuse = [0] * b
        suffixes = [r.context[c:] for r, c in zip(batch, reuse, strict=True)]
        t = max(len(s) for s in suffixes)
        # columns: the padded prefill, then (at most) lockstep decoding of the longest request
        full = max(max(reuse) + t, max(ctx_len) + max(max_new))
        if self._window and full > self._window:
            raise ValueError(
                f"{self.name}: {full} positions exceed the model's sliding window "
                f"({self._window}); this backend's mask is full attention"
            )
        cols = self._columns(max(full, b), dev)
        # room for the prefill now; decoding adds columns as it reaches them (step 4)
        width = _grown(max(reuse) + t, 0, self.kv_chunk, cap=full)

        # 2. The batch's keys/values: a view of the store, or its rows gathered once (a copy,
        #    written back at the end).
        copied = not self.use_cache
        first = 0  # with a view: the batch's first slot
        if self.use_cache:
            store.reserve(width)
            slots = [e.slot for e in entries]
            if slots == list(range(slots[0], slots[0] + b)):
                first = slots[0]
                width = min(store.data.shape[4], full)  # a view costs nothing: all there is
                kv = store.data[:, :, first : first + b, :, :width]
            else:
                kv = store.data[:, :, :, :, :width].index_select(2, self._index(slots, dev))
                copied = True
        else:
            layers, heads, dim = self._geometry
            kv = torch.zeros((layers, 2, b, heads, width, dim), dtype=store.data.dtype, device=dev)
        self._held(kv, copied)

        def widen(kv: torch.Tensor, needed: int) -> torch.Tensor:
            """``kv`` with at least ``needed`` columns: the store grown and viewed again, or a
            larger copy (the columns past what was written stay zero)."""
            new = _grown(needed, kv.shape[4], self.kv_chunk, cap=full)
            if not copied:
                store.reserve(new)
                kv = store.data[:, :, first : first + b, :, : min(store.data.shape[4], full)]
            else:
                wider = kv.new_zeros((*kv.shape[:4], new, kv.shape[5]))
                wider[:, :, :, :, : kv.shape[4]] = kv
                kv = wider
            self._held(kv, copied)
            return kv

        def write_back(rows_of_kv: list[int], batch_rows: list[int]) -> None:
            """Copy columns min(reuse)..(last fed) of some rows of a copied kv to the store."""
            if not self.use_cache or not copied or not batch_rows:
                return
            lo = min(reuse)
            hi = max(ctx_len[i] + len(fed[i]) for i in batch_rows)
            store.reserve(hi)
            src = kv if rows_of_kv == list(range(len(kv[0, 0]))) else None
            if src is None:
                src = kv.index_select(2, self._index(rows_of_kv, dev))
            dst = self._index([entries[i].slot for i in batch_rows], dev)
            store.data[:, :, dst, :, lo:hi] = src[:, :, :, :, lo:hi]

        # 3. Prefill the unseen suffixes, right-padded: pads sit past each row's context, in
        #    columns its later tokens overwrite before anything attends to them.
        rows = cols[:b].unsqueeze(1)  # [B, 1]
        ids = torch.tensor(
            [s + [self.pad_id] * (t - len(s)) for s in suffixes], dtype=torch.long, device=dev
        )
        pos = torch.tensor(reuse, device=dev).unsqueeze(1) + cols[:t]
        last = torch.tensor([len(s) - 1 for s in suffixes], device=dev)
        logits = self._runner(ids, pos, kv, max(reuse) + t, last, cols, rows)

        # 4. Decode in lockstep: step k feeds each row's newest token at column context + k.
        #    A finished row's input is junk written past its last fed token, never attended
        #    to; once at most half the rows are active, the finished ones are dropped.
        out: list[list[int]] = [[] for _ in batch]
        fed: list[list[int]] = [[] for _ in batch]
        finish = ["length"] * b
        active = [True] * b
        n_active = b
        cur = list(range(b))  # the batch row of each kv row
        greedy = sampling.temperature == 0
        pos = torch.tensor(ctx_len, device=dev).unsqueeze(1)  # [rows, 1]
        bias = None  # the requests' logit biases, if any has one
        if any(r.logit_bias for r in batch):
            bias = _LogitBias([r.logit_bias for r in batch], logits.shape[-1], dev)
            bias_rows = self._index(cur, dev)
        k = 0
        while True:
            if bias is not None:
                logits = bias(logits, bias_rows)
            if greedy:
                tok = logits.argmax(dim=-1)
                toks = tok.tolist()
            else:
                toks = [
                    sample_next(logits[j], sampling, batch[i].generator)
                    if active[i]
                    else self.pad_id
                    for j, i in enumerate(cur)
                ]
                tok = torch.tensor(toks, device=dev)
            for j, i in enumerate(cur):
                if not active[i]:
                    continue
                tk = toks[j]
                out[i].append(tk)
                if tk in stops:
                    finish[i] = "stop" if tk in stop_token_ids else "eos"
                elif len(out[i]) < max_new[i]:
                    fed[i].append(tk)
                    continue
                active[i] = False
                n_active -= 1
            if not n_active:
                break
            if n_active <= len(cur) // 2:
                keep = [j for j, i in enumerate(cur) if active[i]]
                gone = [j for j, i in enumerate(cur) if not active[i]]
                write_back(gone, [cur[j] for j in gone])
                keep_t = self._index(keep, dev)
                kv = kv.index_select(2, keep_t)
                copied = True
                cur = [cur[j] for j in keep]
                tok, pos, rows = tok[keep_t], pos[keep_t], cols[: len(cur)].unsqueeze(1)
                if bias is not None:
                    bias_rows = self._index(cur, dev)
            hi = max(ctx_len[i] for i in cur) + k + 1
            if hi > kv.shape[4]:
                kv = widen(kv, hi)
            logits = self._runner(tok.unsqueeze(1), pos, kv, hi, None, cols, rows)
            pos = pos + 1
            k += 1

        # 5. Keep what was computed.
        if self.use_cache:
            write_back(list(range(len(cur))), cur)
            for e, r, f in zip(entries, batch, fed, strict=True):
                e.ids = list(r.context) + f
        return [
            GenResult(tokens=o, finish=f, prefill_tokens=len(s))
            for o, f, s in zip(out, finish, suffixes, strict=True)
        ]
