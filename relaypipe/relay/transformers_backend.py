"""The in-process backend: a Hugging Face causal LM decoding many requests as one stream.

:class:`TransformersBackend` keeps every request's keys/values in a slot of one store
(:mod:`.kv_store`) across calls, so a call prefills only what a request has not cached (the
longest common prefix with its cached tokens is reused; a context that diverges overwrites from
there). Decoding goes through a :class:`DecodeStream`: requests join it at any time
(:meth:`DecodeStream.add`), and every :meth:`DecodeStream.step` feeds each request what it has
to feed (a running request its newest token; one that just joined the part of its context it
has not cached) and samples its next token. The rows of a step are fed in as few padded
forwards as pay (:func:`feed_groups`): single-token rows and a row back with a few new tokens
share one forward, a long prompt gets its own. A request that finished (stop token, EOS,
``max_new_tokens``) leaves at once; nothing waits for the longest row.
:meth:`TransformersBackend.generate` is a stream run until its requests are done; the relay
decoder keeps one stream per model for a whole decode (continuous scheduling,
:mod:`relaypipe.relay.lanes`).

A request's tokens do not depend on its batch-mates beyond floating-point noise: the mask is
"column <= own position", sampling uses the request's own generator, and a row's padding sits
past what it has written, in columns its later tokens overwrite before anything
attends to them.

Memory follows what is decoded: the store gains columns in steps of ``kv_chunk`` (or by
doubling) as sequences lengthen, and it is freed once no request is cached (the relay decoder
releases every request when its decode ends). ``kv_bytes`` is what the store holds now,
``kv_peak_bytes`` the most held at once.

``stats`` counts what the forwards computed (:class:`ForwardStats`: forwards, rows, tokens fed
with their padding, seconds), so a schedule can be judged by what it made the model do
(``relaypipe bench`` reports it per model); :meth:`TransformersBackend.reset_stats` starts over.

``fast`` picks the forward (:mod:`.runners`): the lean Llama forward where supported (default),
else the model's own. Honours each request's ``logit_bias`` (:mod:`.sampling`), on both
forwards, cached or not.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from relaypipe.relay.backends import GenRequest, GenResult
from relaypipe.relay.kv_store import Entry, KVStore, SlotRows
from relaypipe.relay.runners import HFRunner, LlamaRunner, no_autocast, text_config
from relaypipe.relay.sampling import LogitBias, Sampling, check_logit_bias, sample_next

log = logging.getLogger(__name__)

# What one more forward costs, in tokens of input: the fixed part of a forward (reading the
# weights, launching kernels, the Python around it) over the cost of one more input token.
# Measured on the realistic pair on 2 CPU cores: about 28 for the student (a forward of 8
# single-token rows takes 21.7 ms, one more prefill token 0.63 ms). On a GPU it is larger.
FORWARD_OVERHEAD_TOKENS = 32


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def feed_groups(
    lengths: Sequence[int], overhead_tokens: float = FORWARD_OVERHEAD_TOKENS
) -> list[list[int]]:
    """Rows with ``lengths`` tokens to feed, grouped into padded forwards at the least cost.

    A forward of r rows padded to its longest row, T tokens, costs ``overhead_tokens + r * T``
    (the cheapest split of rows sorted by length is into consecutive runs, found exactly by
    dynamic programming). So single-token decode rows and a row that has just come back with a
    few new tokens share one forward, and a long prompt is not padded against short rows."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    n = len(order)
    best = [0.0] + [math.inf] * n  # best[j]: cost of feeding order[:j]
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):  # order[i:j] as one forward, padded to order[i]'s length
            cost = best[i] + overhead_tokens + (j - i) * lengths[order[i]]
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups: list[list[int]] = []
    j = n
    while j > 0:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]


@dataclass
class ForwardStats:
    """What a backend's forwards computed since its last :meth:`~TransformersBackend.reset_stats`:
    ``forwards`` (batched forwards run), ``rows`` (requests fed, summed over forwards),
    ``tokens`` (input positions, padding included) and ``seconds`` (wall time of the forwards
    and the sampling after each, which waits for the device)."""

    forwards: int = 0
    rows: int = 0
    tokens: int = 0
    seconds: float = 0.0

    @property
    def rows_per_forward(self) -> float:
        return self.rows / self.forwards if self.forwards else 0.0

    def to_dict(self) -> dict[str, float]:
        return {
            "forwards": self.forwards,
            "rows": self.rows,
            "tokens": self.tokens,
            "seconds": self.seconds,
            "rows_per_forward": self.rows_per_forward,
        }


def _params_version(params: Sequence[torch.Tensor]) -> tuple[int, ...]:
    """Changes whenever a parameter is updated in place (an optimiser step, a state-dict
    load). Parameters made under inference mode keep no version: taken as never changing."""
    try:
        return tuple(p._version for p in params)
    except RuntimeError:
        return ()


@dataclass
class _Row:
    """A request in a stream."""

    req: GenRequest
    entry: Entry
    suffix: list[int]  # context tokens to prefill (not cached); fed at the first step
    out: list[int] = field(default_factory=list)  # generated, the stop token included
    fed: list[int] = field(default_factory=list)  # generated and fed back (all but a last stop)
    next_pos: int = 0  # the column of the next token fed

    @property
    def end(self) -> int:
        """One past the last column this request can ever write."""
        return len(self.req.context) + self.req.max_new_tokens


class DecodeStream:
    """Requests decoding on one :class:`TransformersBackend` under one stop set and sampling;
    they join with :meth:`add` and leave when done (module docstring)."""

    def __init__(
        self, backend: TransformersBackend, stop_token_ids: frozenset[int], sampling: Sampling
    ) -> None:
        self.backend = backend
        self.stop_ids = frozenset(stop_token_ids)
        self.stops = self.stop_ids | backend.eos_token_ids
        self.sampling = sampling
        self._new: list[_Row] = []  # joined, not prefilled yet
        self._running: list[_Row] = []  # prefilled, their newest token not yet fed
        self._finished: list[tuple[Hashable, GenResult]] = []
        self._dev = backend._sync()

    def __len__(self) -> int:
        """Requests in the stream (joined and not yet returned by :meth:`step`)."""
        return len(self._new) + len(self._running) + len(self._finished)

    @property
    def running(self) -> int:
        """Requests past their first step (decoding), not counting those just joined."""
        return len(self._running) + len(self._finished)

    def add(self, req: GenRequest) -> None:
        """Join the stream; a request with no tokens to write is done at the next step."""
        if req.max_new_tokens <= 0:
            self._finished.append(
                (req.key, GenResult(tokens=[], finish="length", prefill_tokens=0))
            )
            return
        be = self.backend
        window = be._window
        if window and req.max_new_tokens + len(req.context) > window:
            raise ValueError(
                f"{be.name}: {len(req.context) + req.max_new_tokens} positions exceed the "
                f"model's sliding window ({window}); this backend's mask is full attention"
            )
        entry = be._entries.get(req.key) if be.use_cache else None
        if entry is None:
            entry = Entry(be._store_for(self._dev).acquire(), [])
            if be.use_cache:
                be._entries[req.key] = entry
        reuse = min(common_prefix(entry.ids, req.context), len(req.context) - 1)
        del entry.ids[reuse:]  # columns from reuse on get overwritten (also if a step fails)
        be._live += 1
        self._new.append(_Row(req, entry, list(req.context[reuse:]), next_pos=reuse))

    @torch.inference_mode()
    def step(self) -> list[tuple[Hashable, GenResult]]:
        """Feed every request what it has to feed (its newest token, or the context it has
        not cached yet when it just joined), in forwards grouped by :func:`feed_groups`, and
        sample each one's next token; the requests that finished, with their results."""
        rows = self._running + self._new
        self._running, self._new = [], []
        # In the weights' dtype even inside a caller's autocast: trl trains float32 weights
        # under bf16 autocast and calls the rollout from there, and the store (and so the
        # tokens) must not depend on the caller's context.
        with no_autocast(self._dev):
            feeds = [r.suffix if r.next_pos < len(r.req.context) else r.out[-1:] for r in rows]
            for group in feed_groups([len(f) for f in feeds], self.backend.overhead_tokens):
                self._feed([rows[i] for i in group], [feeds[i] for i in group])
        done, self._finished = self._finished, []
        return done

    def _feed(self, rows: list[_Row], feeds: list[list[int]]) -> None:
        """One forward: each row's tokens at its next columns (right-padded: the pads sit past
        what the row has written, where its later tokens overwrite them before anything
        attends to them), then each row's next token from its last real input."""
        start = time.perf_counter()
        t = max(len(f) for f in feeds)
        pad = self.backend.pad_id
        dev = self._dev
        ids = torch.tensor([f + [pad] * (t - len(f)) for f in feeds], device=dev)
        cols = self.backend._columns(t, dev)
        pos = torch.tensor([[r.next_pos] for r in rows], device=dev) + cols[:t]
        last = None if t == 1 else torch.tensor([len(f) - 1 for f in feeds], device=dev)
        logits = self._forward(rows, ids, pos, last)
        for r, f in zip(rows, feeds, strict=True):
            r.next_pos += len(f)
        self._sample(rows, logits)
        stats = self.backend.stats
        stats.forwards += 1
        stats.rows += len(rows)
        stats.tokens += ids.numel()
        stats.seconds += time.perf_counter() - start

    def _forward(
        self, rows: list[_Row], ids: torch.Tensor, pos: torch.Tensor, last: torch.Tensor | None
    ) -> torch.Tensor:
        be = self.backend
        hi = int(pos.max()) + 1
        store = be._store_for(self._dev)
        store.reserve(hi, cap=max(max(r.end for r in rows), hi))
        be.kv_peak_bytes = max(be.kv_peak_bytes, store.nbytes)
        slot_rows = SlotRows(store, [r.entry.slot for r in rows], pos, hi)
        return be._runner(ids, slot_rows, be._columns(hi, self._dev), last)

    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Each row's next token from its logits; rows that go on wait for the next step."""
        if any(r.req.logit_bias for r in rows):
            bias = LogitBias([r.req.logit_bias for r in rows], logits.shape[-1], logits.device)
            logits = bias(logits, torch.arange(len(rows), device=logits.device))
        if self.sampling.temperature == 0:
            toks = logits.argmax(dim=-1).tolist()
        else:
            toks = [
                sample_next(logits[j], self.sampling, r.req.generator) for j, r in enumerate(rows)
            ]
        for r, tok in zip(rows, toks, strict=True):
            r.out.append(tok)
            if tok in self.stops:
                self._finish(r, "stop" if tok in self.stop_ids else "eos")
            elif len(r.out) < r.req.max_new_tokens:
                r.fed.append(tok)
                self._running.append(r)
            else:
                self._finish(r, "length")

    def _finish(self, row: _Row, finish: str) -> None:
        be = self.backend
        be._live -= 1
        if be.use_cache:
            row.entry.ids = list(row.req.context) + row.fed
        elif be._store is not None:
            be._store.release(row.entry.slot)
        result = GenResult(tokens=row.out, finish=finish, prefill_tokens=len(row.suffix))
        self._finished.append((row.req.key, result))


class TransformersBackend:
    """An in-process Hugging Face causal LM with per-request KV caches kept across calls
    (module docstring).

    ``use_cache=False`` prefills every request's whole context at every call (the reference
    the cache is tested against).
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
        overhead_tokens: float = FORWARD_OVERHEAD_TOKENS,
    ):
        if fast and not LlamaRunner.supports(model):
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
        use_fast = LlamaRunner.supports(model) if fast is None else fast
        self._runner = LlamaRunner(model) if use_fast else HFRunner(model)
        text = text_config(model)
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
        self.overhead_tokens = overhead_tokens  # feed_groups' price of one more forward
        self.kv_peak_bytes = 0
        self.stats = ForwardStats()
        self._estimate_logged = 0  # the largest memory estimate logged at info level
        self._store: KVStore | None = None
        self._entries: dict[Hashable, Entry] = {}
        self._live = 0  # requests decoding in some stream now (they hold slots)
        # the parameters as of now: updates in place are noticed, replaced modules are not
        self._params = list(model.parameters())
        self._version = _params_version(self._params)
        self._cols = torch.empty(0, dtype=torch.long)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def fast(self) -> bool:
        return isinstance(self._runner, LlamaRunner)

    @property
    def kv_bytes_per_token(self) -> int:
        """Keys and values of one token: layers x kv_heads x head_dim x 2 x dtype size."""
        layers, heads, dim = self._geometry
        return layers * heads * dim * 2 * self._params[0].element_size()

    @property
    def kv_bytes(self) -> int:
        """Bytes the key/value store holds now (0 when no request is cached)."""
        return self._store.nbytes if self._store is not None else 0

    def reset_stats(self) -> ForwardStats:
        """The forward counts so far (:class:`ForwardStats`); counting starts again at zero."""
        stats, self.stats = self.stats, ForwardStats()
        return stats

    def release(self, key: Hashable) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None and self._store is not None:
            self._store.release(entry.slot)
        if not self._entries and not self._live:
            self._store = None  # nothing cached: give the memory back until the next call

    def cached_tokens(self, key: Hashable) -> int:
        entry = self._entries.get(key)
        return len(entry.ids) if entry else 0

    def open_stream(
        self, stop_token_ids: frozenset[int] = frozenset(), sampling: Sampling = Sampling()
    ) -> DecodeStream:
        """A stream requests can join at any step (module docstring)."""
        return DecodeStream(self, stop_token_ids, sampling)

    def check(self, req: GenRequest) -> None:
        """Refuse a request no step could run, before it joins (a ValueError naming it)."""
        if not req.context:
            raise ValueError(f"request {req.key!r}: empty context (a prompt needs a token)")
        try:
            check_logit_bias(req.logit_bias, self.vocab_size)
        except ValueError as err:
            raise ValueError(f"request {req.key!r}: {err}") from None

    def generate(
        self,
        requests: Sequence[GenRequest],
        *,
        stop_token_ids: frozenset[int] = frozenset(),
        sampling: Sampling = Sampling(),
    ) -> list[GenResult]:
        """Decode ``requests`` together until each has stopped; results in their order."""
        if not requests:
            return []
        seen: set[Hashable] = set()
        for r in requests:
            self.check(r)
            if r.key in seen:
                raise ValueError(f"request key {r.key!r} appears twice in one call")
            seen.add(r.key)
        stream = self.open_stream(stop_token_ids, sampling)
        live = [r for r in requests if r.max_new_tokens > 0]
        if live and not self._entries and not self._live:  # a decode starts
            self.log_memory_estimate(
                len(live), sum(len(r.context) + r.max_new_tokens for r in live)
            )
        for r in requests:
            stream.add(r)
        results: dict[Hashable, GenResult] = {}
        while stream:
            results.update(stream.step())
        return [results[r.key] for r in requests]

    # ------------------------------------------------------------------ internals
    def _store_for(self, dev: torch.device) -> KVStore:
        if self._store is None:
            p = self._params[0]
            self._store = KVStore(*self._geometry, dtype=p.dtype, device=dev, chunk=self.kv_chunk)
        return self._store

    def _sync(self) -> torch.device:
        """Follow the model: new weights invalidate cached keys/values, a move the store."""
        dev, dtype = self._params[0].device, self._params[0].dtype
        version = _params_version(self._params)
        if version != self._version:
            self._version = version
            for entry in self._entries.values():
                entry.ids = []
        store = self._store
        if store is not None and (store.data.device != dev or store.data.dtype != dtype):
            if self._live:
                raise RuntimeError(f"{self.name}: the model moved while requests were decoding")
            self._store = None
            store = self._store_for(dev)
            for entry in self._entries.values():
                entry.slot, entry.ids = store.acquire(), []
        self._runner.refresh(version)
        return dev

    def _columns(self, n: int, dev: torch.device) -> torch.Tensor:
        """An arange of at least ``n`` (kept, grown by doubling)."""
        if len(self._cols) < n or self._cols.device != dev:
            self._cols = torch.arange(max(n, 2 * len(self._cols), 256), device=dev)
        return self._cols

    def log_memory_estimate(self, n_requests: int, tokens: int) -> None:
        """Before a decode starts: how much key/value memory ``n_requests`` requests of
        ``tokens`` context and new tokens in all may take, at most. Logged at info level when
        it is the largest so far, else at debug level."""
        per_token = self.kv_bytes_per_token
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
            n_requests,
            tokens,
            per_token,
            layers,
            heads,
            dim,
            self._params[0].element_size(),
        )
