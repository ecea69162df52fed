"""Backends: something that continues token contexts. The relay decoder talks only to this.

A backend receives, per request, the *whole* context in its own view (the student's view with
commands, or the teacher's view without) and returns up to ``max_new_tokens`` new tokens. It
may keep per-request state between calls under the request's ``key``; the in-process backend
keeps each request's KV cache, so a call prefills only the tokens it has not seen yet (the
longest common prefix with what it cached is reused). An HTTP backend fits the same interface.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import DynamicCache, PreTrainedModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    """How to pick the next token. ``temperature == 0`` is greedy decoding."""

    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


@dataclass
class GenRequest:
    key: Hashable  # identity of the request; state cached under it until release(key)
    context: list[int]  # the full context in this backend's view
    max_new_tokens: int
    generator: torch.Generator | None = None  # per-request RNG: results independent of batching


@dataclass
class GenResult:
    tokens: list[int]  # new tokens, including a final stop/EOS token if one was produced
    finish: str  # "stop" (a stop token), "eos", "length", or "error"
    prefill_tokens: int  # context tokens processed before the first new token
    error: str | None = None


class Backend(Protocol):
    """What the relay decoder needs from a model."""

    eos_token_ids: frozenset[int]

    def generate(
        self,
        requests: Sequence[GenRequest],
        *,
        stop_token_ids: frozenset[int] = frozenset(),
        sampling: Sampling = Sampling(),
    ) -> list[GenResult]: ...

    def release(self, key: Hashable) -> None: ...


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


@dataclass
class _CacheEntry:
    ids: list[int]  # tokens whose keys/values are cached, in order
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [H, L, D]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class TransformersBackend:
    """An in-process Hugging Face causal LM with per-request KV caches kept across calls.

    Requests of one call are decoded together as a batch. Each request's cached keys/values
    are stitched into one batch cache (left-padded), its unseen suffix is prefilled (also
    left-padded, so the last column is every row's newest token), and after decoding each
    row's real positions are gathered back into a compact per-request cache. Padding is
    masked out and never cached, so a request's tokens do not depend on its batch-mates
    beyond floating-point noise.
    """

    def __init__(self, model: PreTrainedModel, *, use_cache: bool = True, name: str = "model"):
        self.model = model.eval()
        self.name = name
        self.use_cache = use_cache
        cfg = model.config
        eos = cfg.eos_token_id if cfg.eos_token_id is not None else []
        self.eos_token_ids = frozenset([eos] if isinstance(eos, int) else eos)
        pad = cfg.pad_token_id
        self.pad_id = int(pad if pad is not None else next(iter(self.eos_token_ids), 0))
        self._caches: dict[Hashable, _CacheEntry] = {}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def release(self, key: Hashable) -> None:
        self._caches.pop(key, None)

    def cached_tokens(self, key: Hashable) -> int:
        entry = self._caches.get(key)
        return len(entry.ids) if entry else 0

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
        for r in requests:
            if not r.context:
                raise ValueError(f"request {r.key!r}: empty context (a prompt needs a token)")
        dev = self.device
        n_layers = self.model.config.get_text_config().num_hidden_layers
        stops = stop_token_ids | self.eos_token_ids

        # 1. What each request already has cached, and the suffix it still has to prefill.
        reuse: list[int] = []
        for r in requests:
            entry = self._caches.get(r.key) if self.use_cache else None
            c = _common_prefix(entry.ids, r.context) if entry else 0
            reuse.append(min(c, len(r.context) - 1))  # feed at least one token for logits
        suffixes = [r.context[c:] for r, c in zip(requests, reuse, strict=True)]
        B, Lc, Ls = len(requests), max(reuse), max(len(s) for s in suffixes)

        # 2. Stitch the batch cache: [B, H, Lc, D] per layer, real entries right-aligned.
        cache = DynamicCache()
        mask_cols: list[torch.Tensor] = []
        cached_mask = torch.zeros((B, Lc), dtype=torch.long)
        if Lc:
            donor = next(self._caches[r.key] for r, c in zip(requests, reuse, strict=True) if c)
            for layer in range(n_layers):
                ks, vs = [], []
                for r, c in zip(requests, reuse, strict=True):
                    entry = self._caches[r.key] if c else donor
                    k, v = entry.kv[layer]
                    k, v = k[:, :c], v[:, :c]
                    pad = Lc - c
                    if pad:
                        k = torch.nn.functional.pad(k, (0, 0, pad, 0))
                        v = torch.nn.functional.pad(v, (0, 0, pad, 0))
                    ks.append(k)
                    vs.append(v)
                cache.update(torch.stack(ks), torch.stack(vs), layer)
            for i, c in enumerate(reuse):
                cached_mask[i, Lc - c :] = 1
        mask_cols.append(cached_mask)

        # 3. Prefill the unseen suffixes, left-padded to a common width.
        input_ids = torch.full((B, Ls), self.pad_id, dtype=torch.long)  # [B, Ls]
        suffix_mask = torch.zeros((B, Ls), dtype=torch.long)  # [B, Ls]
        positions = torch.zeros((B, Ls), dtype=torch.long)  # [B, Ls]
        for i, (s, c) in enumerate(zip(suffixes, reuse, strict=True)):
            input_ids[i, Ls - len(s) :] = torch.tensor(s)
            suffix_mask[i, Ls - len(s) :] = 1
            positions[i, Ls - len(s) :] = torch.arange(c, c + len(s))
        mask_cols.append(suffix_mask)
        next_pos = torch.tensor([len(r.context) for r in requests])  # [B]

        out = [list[int]() for _ in requests]
        finish = ["length"] * B
        active = [r.max_new_tokens > 0 for r in requests]
        for i, a in enumerate(active):
            if not a:
                finish[i] = "length"
        fed_new = [list[int]() for _ in requests]  # generated tokens whose KV got cached
        step_ids, step_pos = input_ids, positions
        while any(active):
            attn = torch.cat(mask_cols, dim=1).to(dev)
            logits = self._forward(step_ids.to(dev), attn, step_pos.to(dev), cache)
            last = logits[:, -1, :]  # [B, V]
            nxt = torch.full((B, 1), self.pad_id, dtype=torch.long)
            col = torch.zeros((B, 1), dtype=torch.long)
            for i, r in enumerate(requests):
                if not active[i]:
                    continue
                tok = sample_next(last[i], sampling, r.generator)
                out[i].append(tok)
                if tok in stops:
                    finish[i] = "stop" if tok in stop_token_ids else "eos"
                    active[i] = False
                elif len(out[i]) >= r.max_new_tokens:
                    active[i] = False
                else:
                    nxt[i, 0] = tok
                    col[i, 0] = 1
                    fed_new[i].append(tok)
            if not any(active):
                break
            mask_cols.append(col)
            step_ids, step_pos = nxt, next_pos.unsqueeze(1).clone()
            next_pos = next_pos + col[:, 0]

        # 4. Gather each row's real positions back into a compact per-request cache.
        if self.use_cache:
            full_mask = torch.cat(mask_cols, dim=1)  # [B, total] (last column may be unfed)
            for i, r in enumerate(requests):
                idx = torch.nonzero(full_mask[i, : self._cache_len(cache)], as_tuple=True)[0]
                idx = idx.to(dev)
                kv = []
                for layer in range(n_layers):
                    k, v = self._layer_kv(cache, layer)
                    kv.append((k[i].index_select(1, idx), v[i].index_select(1, idx)))
                self._caches[r.key] = _CacheEntry(ids=list(r.context) + fed_new[i], kv=kv)

        return [
            GenResult(tokens=o, finish=f, prefill_tokens=len(s))
            for o, f, s in zip(out, finish, suffixes, strict=True)
        ]

    def _forward(
        self, ids: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor, cache: DynamicCache
    ) -> torch.Tensor:
        return self.model(
            input_ids=ids, attention_mask=attn, position_ids=pos, cache=cache, use_cache=True
        ).logits

    @staticmethod
    def _layer_kv(cache: DynamicCache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        lay = cache.layers[layer]
        return lay.keys, lay.values

    def _cache_len(self, cache: DynamicCache) -> int:
        return cache.get_seq_length()
