"""What ``relaypipe serve`` runs: a local model (:class:`ModelEngine`) or the relay system
(:class:`RelayEngine`), behind one small interface (:class:`Engine`).

Engines check a request's parameters against their own limits (:meth:`Engine.validate`, on the
event loop, before anything is queued) and then run batches of :class:`Job` on the worker
thread. A failure while decoding is kept to the request that caused it: a micro-batch that
raises is retried one request at a time, so its other requests still get their answers.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict
from collections.abc import Hashable, Iterable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from transformers import PreTrainedTokenizerBase

from relaypipe.relay.backends import GenRequest
from relaypipe.relay.decoder import MODES, RelayConfig, RelayDecoder
from relaypipe.relay.sampling import Sampling
from relaypipe.relay.trace import RelayTrace, Source, StopReason
from relaypipe.relay.transformers_backend import TransformersBackend, common_prefix
from relaypipe.serve.protocol import (
    MAX_SEED,
    ApiError,
    CompletionRequest,
    RelayOptions,
    ServeLimits,
    brief,
)
from relaypipe.tasks.grading import reader_text

log = logging.getLogger(__name__)

# RelayDecoder seeds request i of a decode with 2 * (seed * 1_000_003 + i) (+ 1), and torch
# seeds must fit in 64 bits: seeds past this bound overflow once scaled. The bound leaves room
# for i < 1_000_003 prompts in one request (far above any max_prompts).
RELAY_SEED_STRIDE = 1_000_003
RELAY_MAX_SEED = MAX_SEED // RELAY_SEED_STRIDE - 1

# Relay budgets an operator sets as ceilings (RelayConfig fields; None: unbounded).
RELAY_CAPS = ("max_teacher_tokens", "max_calls", "max_call_tokens", "max_turns")


@dataclass(frozen=True)
class CompletionParams:
    """The validated generation parameters of one request."""

    max_tokens: int
    sampling: Sampling
    seed: int | None = None
    stop_token_ids: frozenset[int] = frozenset()
    relay: RelayOptions | None = None
    # token id -> bias (OpenAI's logit_bias; a request of its own in a batch: GenRequest's)
    logit_bias: dict[int, float] | None = None

    def batch_key(self) -> tuple[Sampling, frozenset[int]]:
        return self.sampling, self.stop_token_ids

    @classmethod
    def from_request(cls, req: CompletionRequest, limits: ServeLimits) -> CompletionParams:
        top_k = req.top_k if req.top_k is not None and req.top_k > 0 else 0  # -1 / 0: no cut
        return cls(
            max_tokens=req.max_tokens if req.max_tokens is not None else limits.default_max_tokens,
            sampling=Sampling(
                temperature=req.temperature if req.temperature is not None else 1.0,
                top_p=req.top_p if req.top_p is not None else 1.0,
                top_k=top_k,
            ),
            seed=req.seed,
            stop_token_ids=frozenset(req.stop_token_ids or ()),
            relay=req.relay,
            logit_bias=req.token_logit_bias(),
        )


@dataclass
class Completion:
    """One choice, before it becomes JSON."""

    token_ids: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int
    cached_tokens: int = 0
    relay: dict[str, Any] | None = None
    stop_reason: int | None = None  # the stop token id that ended it (vLLM's stop_reason)


@dataclass
class Job:
    """One HTTP request's work, handed from the event loop to the worker thread."""

    prompts: list[list[int]]
    params: CompletionParams
    future: Future[list[Completion]] = field(default_factory=Future)


def settle(future: Future[Any], result: Any = None, error: BaseException | None = None) -> None:
    """Complete a job's future unless it already is (a cancelled request must not make the
    worker raise in the middle of its batch-mates' results)."""
    if future.done():
        return
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass


class Engine(Protocol):
    """What the app serves: a name, a tokenizer, and batch execution on the worker thread."""

    name: str
    tokenizer: PreTrainedTokenizerBase
    max_batch: int  # jobs the worker may hand over at once (1: strictly one at a time)
    max_seed: int  # largest request seed the engine can honour

    def validate(self, params: CompletionParams) -> None:
        """Raise :class:`ApiError` for parameters this engine cannot honour (before queueing)."""
        ...

    def run(self, jobs: list[Job]) -> None:
        """Complete every job's future (result or exception), each job on its own: one job's
        failure must not fail the others."""
        ...


# ---------------------------------------------------------------------------- model engine
class ModelEngine:
    """One local causal LM, micro-batched, with a prefix cache of recent requests.

    ``cache_slots`` KV caches are kept (LRU); a prompt that continues a cached one reuses it
    (see :meth:`_pick_slot`). Give it at least as many slots as relay requests in flight
    (the decoder's batch size), or hand-offs evict each other and prefill from scratch.
    0 disables the cache.
    """

    max_seed = MAX_SEED  # request i of a job is seeded with seed + i < 2**64

    def __init__(
        self,
        backend: TransformersBackend,
        tokenizer: PreTrainedTokenizerBase,
        name: str,
        *,
        max_batch: int = 16,
        cache_slots: int = 64,
    ):
        self.backend = backend
        self.tokenizer = tokenizer
        self.name = name
        self.max_batch = max_batch
        self.cache_slots = cache_slots
        self._slots: OrderedDict[Hashable, list[int]] = OrderedDict()  # key -> tokens seen
        self._next_slot = 0

    def validate(self, params: CompletionParams) -> None:
        if params.relay is not None and not params.relay.is_empty():
            raise ApiError(400, "'relay' options need a relay-mode server", "relay")

    def run(self, jobs: list[Job]) -> None:
        groups: dict[tuple[Sampling, frozenset[int]], list[Job]] = {}
        for job in jobs:
            groups.setdefault(job.params.batch_key(), []).append(job)
        for (sampling, stops), group in groups.items():
            self._run_group(group, sampling, stops)

    def _run_group(self, group: list[Job], sampling: Sampling, stops: frozenset[int]) -> None:
        try:
            results = self._generate(group, sampling, stops)
        except Exception as err:
            if len(group) > 1:  # find the culprit: every request again, alone
                log.warning(
                    "a batch of %d requests failed (%s: %s); running them one at a time",
                    len(group),
                    type(err).__name__,
                    err,
                )
                for job in group:
                    self._run_group([job], sampling, stops)
                return
            log.exception("generation failed for one request")
            settle(group[0].future, error=err)
            return
        for job, completions in zip(group, results, strict=True):
            settle(job.future, completions)

    def _generate(
        self, jobs: list[Job], sampling: Sampling, stops: frozenset[int]
    ) -> list[list[Completion]]:
        items = [(job, i, p) for job in jobs for i, p in enumerate(job.prompts)]
        taken: set[Hashable] = set()
        reqs = []
        try:
            for job, i, prompt in items:
                key = self._pick_slot(prompt, taken)
                gen = None
                if job.params.seed is not None and sampling.temperature > 0:
                    gen = torch.Generator(device=self.backend.device).manual_seed(
                        job.params.seed + i
                    )
                reqs.append(
                    GenRequest(key, prompt, job.params.max_tokens, gen, job.params.logit_bias)
                )
            results = self.backend.generate(reqs, stop_token_ids=stops, sampling=sampling)
        except Exception:
            for key in taken:  # the caches of a failed batch are in an unknown state
                self.backend.release(key)
                self._slots.pop(key, None)
            raise
        out: dict[int, list[Completion]] = {id(job): [] for job in jobs}
        for (job, _, prompt), req, res in zip(items, reqs, results, strict=True):
            if req.key[0] == "slot":
                self._slots[req.key] = prompt + res.tokens[:-1]  # the last one is never fed
                self._slots.move_to_end(req.key)
            else:
                self.backend.release(req.key)
            out[id(job)].append(
                Completion(
                    token_ids=list(res.tokens),
                    text=self.tokenizer.decode(res.tokens, skip_special_tokens=True),
                    finish_reason="length" if res.finish == "length" else "stop",
                    prompt_tokens=len(prompt),
                    cached_tokens=len(prompt) - res.prefill_tokens,
                    stop_reason=res.tokens[-1] if res.finish == "stop" else None,
                )
            )
        return [out[id(job)] for job in jobs]

    def _pick_slot(self, prompt: list[int], taken: set[Hashable]) -> Hashable:
        """The cache slot for a prompt.

        A slot is reused only when one of (its cached tokens, the prompt) is a prefix of the
        other: the prompt continues that conversation (the relay's next hand-off) or repeats it
        (a retry). A merely shared opening ("Q: ") is no reason to overwrite another request's
        cache, so anything else gets a fresh slot, or the least recently used one when full.
        """
        if not self.cache_slots:
            self._next_slot += 1
            key: Hashable = ("once", self._next_slot)
            taken.add(key)
            return key
        best, best_len = None, 0
        for key, ids in self._slots.items():
            if key in taken:
                continue
            n = common_prefix(ids, prompt)
            if n >= min(len(ids), len(prompt)) and n > best_len:
                best, best_len = key, n
        if best is None:
            fresh = sum(1 for k in taken if k not in self._slots and k[0] == "slot")
            if len(self._slots) + fresh < self.cache_slots:
                self._next_slot += 1
                best = ("slot", self._next_slot)
            else:
                best = next((k for k in self._slots if k not in taken), None)
                if best is None:  # more prompts in this batch than slots: an uncached one
                    self._next_slot += 1
                    best = ("once", self._next_slot)
                else:
                    self.backend.release(best)
                    del self._slots[best]
        taken.add(best)
        return best


def build_model_engine(
    source: str,
    *,
    name: str | None = None,
    device: str = "auto",
    dtype: str = "float32",
    cache_slots: int = 64,
    max_batch: int = 16,
) -> ModelEngine:
    from relaypipe.models import load_model

    model, tok = load_model(source, device=device, dtype=dtype)
    return ModelEngine(
        TransformersBackend(model, name=name or source),
        tok,
        name or source,
        cache_slots=cache_slots,
        max_batch=max_batch,
    )


# ---------------------------------------------------------------------------- relay engine
_SOURCE_NAMES = {int(s): s.name.lower() for s in Source}
_FINISH = {
    StopReason.STUDENT_EOS: "stop",
    StopReason.TEACHER_EOS: "stop",
    StopReason.MAX_NEW_TOKENS: "length",
    StopReason.MAX_TURNS: "length",
    StopReason.MAX_TEACHER_TOKENS: "length",  # teacher mode: its budget ran out
    StopReason.MAX_CALLS: "length",
}


class RelayEngine:
    """The relay system: a student that borrows tokens from a teacher, one request at a time.

    One request (possibly several prompts) is one ``RelayDecoder.decode`` call. Requests are
    not merged, because the decoder seeds each request by its position in the batch: merging
    would make a seeded request's result depend on what else arrived with it.

    ``config`` is the operator's: its mode, seed and ``call_bias`` are defaults (a request's
    ``relay.call_bias`` replaces the bias, in either direction), and its budgets
    (``max_teacher_tokens``, ``max_calls``, ``max_call_tokens``, ``max_turns``; ``None``:
    unbounded) are ceilings that a request's ``relay`` options may lower but never raise; an
    absent or ``null`` option means the operator's value. ``allowed_modes`` (default: all) are
    the modes a request may ask for.

    The budgets are the decoder's to enforce, in every mode (see :mod:`relaypipe.relay.decoder`):
    a request's ``max_tokens`` is its ``max_new_tokens`` as asked, in ``random_router`` mode too
    (once the teacher budget is spent the student writes the rest). Mode ``teacher`` with a
    budget of 0 (``max_teacher_tokens`` or ``max_calls``) could write nothing and is a 400.

    ``text`` is the answer with command tokens removed; ``token_ids`` are all generated ids in
    the student's view (commands included), aligned with ``relay.sources``.
    """

    max_batch = 1
    max_seed = RELAY_MAX_SEED

    def __init__(
        self,
        decoder: RelayDecoder,
        name: str,
        config: RelayConfig | None = None,
        *,
        allowed_modes: Iterable[str] | None = None,
    ):
        self.decoder = decoder
        self.tokenizer = decoder.tokenizer
        self.name = name
        self.config = config or decoder.config
        self.allowed_modes = tuple(MODES if allowed_modes is None else allowed_modes)
        unknown = [m for m in self.allowed_modes if m not in MODES]
        if unknown or not self.allowed_modes:
            raise ValueError(f"allowed modes must be some of {', '.join(MODES)}; got {unknown}")
        if self.config.mode not in self.allowed_modes:
            raise ValueError(
                f"the server's mode {self.config.mode!r} is not among the allowed modes "
                f"{', '.join(self.allowed_modes)}"
            )
        if not 0 <= self.config.seed <= RELAY_MAX_SEED:
            raise ValueError(f"seed must be in [0, {RELAY_MAX_SEED}], got {self.config.seed}")

    def config_for(self, params: CompletionParams) -> RelayConfig:
        """The operator's config with this request's bounds, sampling and relay options;
        :class:`ApiError` for anything the request may not have."""
        opts = params.relay or RelayOptions()
        base = self.config
        mode = base.mode if opts.mode is None else opts.mode
        if mode not in MODES:
            raise ApiError(
                400,
                f"'relay.mode' must be one of {', '.join(MODES)}; got {brief(mode)}",
                "relay.mode",
            )
        if mode not in self.allowed_modes:
            raise ApiError(
                400,
                f"mode {mode!r} is not allowed on this server; allowed: "
                f"{', '.join(self.allowed_modes)}",
                "relay.mode",
            )
        caps: dict[str, int | None] = {}
        for name in RELAY_CAPS:
            cap, asked = getattr(base, name), getattr(opts, name)
            if asked is not None and cap is not None and asked > cap:
                raise ApiError(
                    400,
                    f"'relay.{name}' {brief(asked)} is over this server's cap of {cap}",
                    f"relay.{name}",
                )
            caps[name] = cap if asked is None else asked
        seed = base.seed if params.seed is None else params.seed
        if seed > RELAY_MAX_SEED:
            raise ApiError(
                400,
                f"'seed' must be in [0, {RELAY_MAX_SEED}] on a relay server "
                f"(it is scaled by {RELAY_SEED_STRIDE}), got {brief(seed)}",
                "seed",
            )
        if mode == "teacher" and caps["max_calls"] == 0:
            raise ApiError(
                400, "mode 'teacher' needs one call; 'relay.max_calls' is 0", "relay.max_calls"
            )
        if mode == "teacher" and caps["max_teacher_tokens"] == 0:
            raise ApiError(
                400,
                "mode 'teacher' needs teacher tokens; 'relay.max_teacher_tokens' is 0",
                "relay.max_teacher_tokens",
            )
        try:
            return dataclasses.replace(
                base,
                mode=mode,
                max_new_tokens=params.max_tokens,
                student_sampling=params.sampling,
                teacher_sampling=params.sampling,
                seed=seed,
                router_p=base.router_p if opts.router_p is None else opts.router_p,
                fixed_n=base.fixed_n if opts.fixed_n is None else opts.fixed_n,
                call_bias=base.call_bias if opts.call_bias is None else opts.call_bias,
                **caps,
            )
        except (ValueError, TypeError) as err:
            raise ApiError(400, f"invalid relay options: {err}", "relay") from None

    def validate(self, params: CompletionParams) -> None:
        if params.stop_token_ids:
            raise ApiError(400, "'stop_token_ids' is not supported in relay mode", "stop_token_ids")
        if params.logit_bias:
            raise ApiError(
                400,
                "'logit_bias' is not supported in relay mode (relay.call_bias biases the "
                "student's calls)",
                "logit_bias",
            )
        self.config_for(params)

    def run(self, jobs: list[Job]) -> None:
        for job in jobs:  # each job is one decode of its own
            try:
                traces = self.decoder.decode(job.prompts, self.config_for(job.params))
                settle(job.future, [self._completion(t) for t in traces])
            except ApiError as err:
                settle(job.future, error=err)
            except Exception as err:
                log.exception("relay decode failed")
                settle(job.future, error=err)

    def _completion(self, tr: RelayTrace) -> Completion:
        return Completion(
            token_ids=list(tr.token_ids),
            text=reader_text(self.tokenizer, tr.token_ids),
            finish_reason=_FINISH.get(tr.stop_reason, "stop"),
            prompt_tokens=len(tr.prompt_ids),
            relay={
                "sources": [_SOURCE_NAMES[int(s)] for s in tr.sources],
                "calls": tr.calls,
                "teacher_tokens": tr.n_teacher,
                "student_tokens": tr.n_student,
                "command_tokens": tr.n_command,
                "stop_reason": tr.stop_reason,
                "events": [dataclasses.asdict(e) for e in tr.events],
                "handoffs": [dataclasses.asdict(h) for h in tr.handoffs],
            },
        )
