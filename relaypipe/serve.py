"""``relaypipe serve``: an OpenAI-compatible ``/v1/completions`` server.

Two engines sit behind the same protocol:

* :class:`ModelEngine` (mode ``model``) serves one local transformers model, so a teacher can
  live on another machine (or GPU) and be reached with :class:`~relaypipe.relay.http_backend.
  HTTPBackend`. Requests that arrive together are micro-batched into one
  :class:`~relaypipe.relay.backends.TransformersBackend` call, and the KV caches of recent
  requests are kept in a few slots: a request whose prompt extends an earlier one (the relay
  decoder's next hand-off for the same problem) prefills only its new tokens, reported as
  ``usage.prompt_tokens_details.cached_tokens`` like vLLM's prefix cache.
* :class:`RelayEngine` (mode ``relay``) serves the relay system itself: the student decodes
  and borrows tokens from the teacher, and each choice carries the provenance of its tokens
  in an extra ``relay`` field.

The app (:func:`make_app`) validates every request before any model work and answers
problems with OpenAI-style ``{"error": {"message", "type", "param", "code"}}`` bodies: 401
without the API key, 413 for an oversized body, 404 for an unknown model, 400 for anything
else malformed. Models are not thread-safe, so one worker thread runs all model work; the
event loop only parses, validates and waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import queue
import socket
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from transformers import PreTrainedTokenizerBase

from relaypipe.relay.backends import GenRequest, Sampling, TransformersBackend
from relaypipe.relay.decoder import RelayConfig, RelayDecoder
from relaypipe.relay.http_backend import TeacherUnavailable
from relaypipe.relay.trace import RelayTrace, Source, StopReason
from relaypipe.tasks.grading import reader_text

log = logging.getLogger(__name__)

# Request fields we do not implement, with the value that means "not used". Anything else is
# refused with a 400 rather than silently ignored.
_NEUTRAL = {
    "stream": (None, False),
    "n": (None, 1),
    "best_of": (None, 1),
    "echo": (None, False),
    "logprobs": (None, 0, False),
    "suffix": (None, ""),
    "stop": (None, [], ""),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
}
_RELAY_FIELDS = (
    "mode",
    "router_p",
    "max_calls",
    "max_teacher_tokens",
    "max_call_tokens",
    "max_turns",
    "fixed_n",
)


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask for; past these the server answers 4xx, never works."""

    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int = 8192
    max_tokens: int = 4096  # cap on a request's max_tokens
    max_prompts: int = 64  # prompts in one request (a list of prompts)
    max_batch: int = 16  # micro-batch size (model mode)
    batch_wait_s: float = 0.002  # how long the worker waits for batch-mates


@dataclass(frozen=True)
class CompletionParams:
    """The validated generation parameters of one request."""

    max_tokens: int
    sampling: Sampling
    seed: int | None = None
    stop_token_ids: frozenset[int] = frozenset()
    relay: dict[str, Any] = field(default_factory=dict)

    def batch_key(self) -> tuple[Sampling, frozenset[int]]:
        return self.sampling, self.stop_token_ids


@dataclass
class Completion:
    """One choice, before it becomes JSON."""

    token_ids: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int
    cached_tokens: int = 0
    relay: dict[str, Any] | None = None


@dataclass
class Job:
    """One HTTP request's work, handed from the event loop to the worker thread."""

    prompts: list[list[int]]
    params: CompletionParams
    future: Future[list[Completion]] = field(default_factory=Future)


class Engine(Protocol):
    """What the app serves: a name, a tokenizer, and batch execution on the worker thread."""

    name: str
    tokenizer: PreTrainedTokenizerBase
    max_batch: int  # jobs the worker may hand over at once (1: strictly one at a time)

    def validate(self, params: CompletionParams) -> None:
        """Raise :class:`ApiError` for parameters this engine cannot honour (before queueing)."""
        ...

    def run(self, jobs: list[Job]) -> None:
        """Complete every job's future (result or exception)."""
        ...


# ---------------------------------------------------------------------------- engines
def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class ModelEngine:
    """One local causal LM, micro-batched, with a prefix cache of recent requests.

    ``cache_slots`` KV caches are kept (LRU); a prompt that continues a cached one reuses it
    (see :meth:`_pick_slot`). Give it at least as many slots as relay requests in flight
    (the decoder's batch size), or hand-offs evict each other and prefill from scratch.
    0 disables the cache.
    """

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
        if params.relay:
            raise ApiError(400, "'relay' options need a relay-mode server", "relay")

    def run(self, jobs: list[Job]) -> None:
        groups: dict[tuple[Sampling, frozenset[int]], list[Job]] = {}
        for job in jobs:
            groups.setdefault(job.params.batch_key(), []).append(job)
        for (sampling, stops), group in groups.items():
            try:
                results = self._generate(group, sampling, stops)
            except Exception as err:
                log.exception("generation failed for a batch of %d requests", len(group))
                for job in group:
                    job.future.set_exception(err)
                continue
            for job, completions in zip(group, results, strict=True):
                job.future.set_result(completions)

    def _generate(
        self, jobs: list[Job], sampling: Sampling, stops: frozenset[int]
    ) -> list[list[Completion]]:
        items = [(job, i, p) for job in jobs for i, p in enumerate(job.prompts)]
        taken: set[Hashable] = set()
        reqs = []
        for job, i, prompt in items:
            key = self._pick_slot(prompt, taken)
            gen = None
            if job.params.seed is not None and sampling.temperature > 0:
                gen = torch.Generator(device=self.backend.device).manual_seed(job.params.seed + i)
            reqs.append(GenRequest(key, prompt, job.params.max_tokens, gen))
        try:
            results = self.backend.generate(reqs, stop_token_ids=stops, sampling=sampling)
        except Exception:
            for r in reqs:  # the caches of a failed batch are in an unknown state
                self.backend.release(r.key)
                self._slots.pop(r.key, None)
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
            return ("once", self._next_slot)
        best, best_len = None, 0
        for key, ids in self._slots.items():
            if key in taken:
                continue
            n = _common_prefix(ids, prompt)
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


_SOURCE_NAMES = {int(s): s.name.lower() for s in Source}
_FINISH = {
    StopReason.STUDENT_EOS: "stop",
    StopReason.TEACHER_EOS: "stop",
    StopReason.MAX_NEW_TOKENS: "length",
    StopReason.MAX_TURNS: "length",
}


class RelayEngine:
    """The relay system: a student that borrows tokens from a teacher, one request at a time.

    One request (possibly several prompts) is one ``RelayDecoder.decode`` call. Requests are
    not merged, because the decoder seeds each request by its position in the batch: merging
    would make a seeded request's result depend on what else arrived with it.

    ``text`` is the answer with command tokens removed; ``token_ids`` are all generated ids in
    the student's view (commands included), aligned with ``relay.sources``.
    """

    max_batch = 1

    def __init__(self, decoder: RelayDecoder, name: str, config: RelayConfig | None = None):
        self.decoder = decoder
        self.tokenizer = decoder.tokenizer
        self.name = name
        self.config = config or decoder.config

    def config_for(self, params: CompletionParams) -> RelayConfig:
        """The server's config with this request's bounds, sampling and relay options."""
        return dataclasses.replace(
            self.config,
            max_new_tokens=params.max_tokens,
            student_sampling=params.sampling,
            teacher_sampling=params.sampling,
            seed=params.seed if params.seed is not None else self.config.seed,
            **params.relay,
        )

    def validate(self, params: CompletionParams) -> None:
        if params.stop_token_ids:
            raise ApiError(400, "'stop_token_ids' is not supported in relay mode", "stop_token_ids")
        try:
            self.config_for(params)  # RelayConfig checks the relay options
        except (ValueError, TypeError) as err:
            raise ApiError(400, f"invalid relay options: {err}", "relay") from None

    def run(self, jobs: list[Job]) -> None:
        for job in jobs:
            try:
                traces = self.decoder.decode(job.prompts, self.config_for(job.params))
                job.future.set_result([self._completion(t) for t in traces])
            except Exception as err:
                log.exception("relay decode failed")
                job.future.set_exception(err)

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


# ---------------------------------------------------------------------------- worker
class _Worker:
    """The one thread that touches the model; gathers jobs arriving together into a batch."""

    def __init__(self, engine: Engine, limits: ServeLimits):
        self.engine = engine
        self.max_batch = max(1, min(limits.max_batch, engine.max_batch))
        self.wait_s = limits.batch_wait_s
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="relaypipe-serve", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout=30)
        while True:  # anything still queued will never run
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None and not job.future.done():
                job.future.set_exception(RuntimeError("server shutting down"))

    def submit(self, job: Job) -> Future[list[Completion]]:
        self._queue.put(job)
        return job.future

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            batch = [job]
            deadline = time.monotonic() + self.wait_s
            stop = False
            while len(batch) < self.max_batch:
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            log.debug("running %d job(s)", len(batch))
            try:
                self.engine.run(batch)
            except Exception as err:  # engines set their own errors; this is a last resort
                log.exception("engine failed")
                for j in batch:
                    if not j.future.done():
                        j.future.set_exception(err)
            if stop:
                return


# ---------------------------------------------------------------------------- the app
class ApiError(Exception):
    """A client error, answered as an OpenAI-style JSON error body."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type
        self.code = code

    def response(self) -> JSONResponse:
        body = {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(body, status_code=self.status, headers=headers)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


class _Api:
    """Request handling: auth, size limits, validation, and the hop to the worker thread."""

    def __init__(self, engine: Engine, api_key: str | None, limits: ServeLimits):
        self.engine = engine
        self.api_key = api_key
        self.limits = limits
        self.worker = _Worker(engine, limits)
        self.created = int(time.time())
        self.vocab_size = len(engine.tokenizer)

    def check_auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(
                401,
                "missing API key: send 'Authorization: Bearer <key>'",
                type="authentication_error",
                code="invalid_api_key",
            )
        if not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(
                401, "invalid API key", type="authentication_error", code="invalid_api_key"
            )

    async def read_json(self, request: Request) -> dict[str, Any]:
        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                if int(declared) > limit:
                    raise ApiError(
                        413, f"request body over {limit} bytes", type="request_too_large"
                    )
            except ValueError:
                raise ApiError(400, "invalid Content-Length header") from None
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"request body over {limit} bytes", type="request_too_large")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as err:
            raise ApiError(400, f"request body is not valid JSON: {err}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object")
        return body

    # ---------------------------------------------------------------- validation
    def parse_prompts(self, body: dict[str, Any]) -> list[list[int]]:
        if "prompt" not in body or body["prompt"] is None:
            raise ApiError(400, "missing required field 'prompt'", param="prompt")
        raw = body["prompt"]
        shape_msg = (
            "'prompt' must be a string, a list of token ids, or a list of strings / "
            f"token-id lists; got {type(raw).__name__}"
        )
        if isinstance(raw, str) or (isinstance(raw, list) and raw and _is_int(raw[0])):
            items: list[Any] = [raw]
        elif isinstance(raw, list) and raw:
            items = raw
        elif isinstance(raw, list):
            raise ApiError(400, "'prompt' is an empty list", param="prompt")
        else:
            raise ApiError(400, shape_msg, param="prompt")
        if len(items) > self.limits.max_prompts:
            raise ApiError(
                400,
                f"{len(items)} prompts in one request; the limit is {self.limits.max_prompts}",
                param="prompt",
            )
        prompts = []
        for item in items:
            if isinstance(item, str):
                ids = self.engine.tokenizer(item, add_special_tokens=False).input_ids
            elif isinstance(item, list) and all(_is_int(t) for t in item):
                bad = [t for t in item if not 0 <= t < self.vocab_size]
                if bad:
                    raise ApiError(
                        400,
                        f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})",
                        param="prompt",
                    )
                ids = list(item)
            else:
                raise ApiError(400, shape_msg, param="prompt")
            if not ids:
                raise ApiError(400, "'prompt' is empty (it needs at least one token)", "prompt")
            if len(ids) > self.limits.max_prompt_tokens:
                raise ApiError(
                    400,
                    f"prompt has {len(ids)} tokens; this server accepts at most "
                    f"{self.limits.max_prompt_tokens}",
                    param="prompt",
                    code="context_length_exceeded",
                )
            prompts.append(ids)
        return prompts

    def parse_params(self, body: dict[str, Any]) -> CompletionParams:
        for name, neutral in _NEUTRAL.items():
            if name in body and body[name] not in neutral:
                raise ApiError(400, f"'{name}' is not supported by this server", param=name)

        def number(name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
            value = body.get(name)
            if value is None:
                return default
            if not _is_number(value):
                raise ApiError(400, f"'{name}' must be a number", param=name)
            if not (lo < value if lo_open else lo <= value) or value > hi:
                bounds = f"{'(' if lo_open else '['}{lo}, {hi}]"
                raise ApiError(400, f"'{name}' must be in {bounds}, got {value}", param=name)
            return float(value)

        max_tokens = body.get("max_tokens", 16)
        if max_tokens is None:
            max_tokens = 16
        if not _is_int(max_tokens):
            raise ApiError(400, "'max_tokens' must be an integer", param="max_tokens")
        if max_tokens < 1:
            raise ApiError(400, f"'max_tokens' must be >= 1, got {max_tokens}", "max_tokens")
        if max_tokens > self.limits.max_tokens:
            raise ApiError(
                400,
                f"'max_tokens' {max_tokens} is over this server's cap of {self.limits.max_tokens}",
                param="max_tokens",
            )
        temperature = number("temperature", 1.0, 0.0, 100.0)
        top_p = number("top_p", 1.0, 0.0, 1.0, lo_open=True)
        top_k = body.get("top_k")
        if top_k is None or top_k == -1:
            top_k = 0
        if not _is_int(top_k) or top_k < 0:
            raise ApiError(400, "'top_k' must be a non-negative integer (or -1)", "top_k")
        seed = body.get("seed")
        if seed is not None and not _is_int(seed):
            raise ApiError(400, "'seed' must be an integer", param="seed")
        if "return_token_ids" in body and not isinstance(
            body["return_token_ids"], bool | type(None)
        ):
            raise ApiError(400, "'return_token_ids' must be a boolean", "return_token_ids")

        stops: frozenset[int] = frozenset()
        raw_stops = body.get("stop_token_ids")
        if raw_stops:
            if not isinstance(raw_stops, list) or not all(_is_int(t) for t in raw_stops):
                raise ApiError(400, "'stop_token_ids' must be a list of integers", "stop_token_ids")
            stops = frozenset(raw_stops)

        relay: dict[str, Any] = {}
        raw_relay = body.get("relay")
        if raw_relay is not None:
            if not isinstance(raw_relay, dict):
                raise ApiError(400, "'relay' must be an object", param="relay")
            unknown = sorted(set(raw_relay) - set(_RELAY_FIELDS))
            if unknown:
                raise ApiError(
                    400,
                    f"unknown relay option(s) {unknown}; allowed: {list(_RELAY_FIELDS)}",
                    param="relay",
                )
            relay = dict(raw_relay)
        params = CompletionParams(
            max_tokens=max_tokens,
            sampling=Sampling(temperature=temperature, top_p=top_p, top_k=top_k),
            seed=seed,
            stop_token_ids=stops,
            relay=relay,
        )
        self.engine.validate(params)
        return params

    # ---------------------------------------------------------------- endpoints
    async def completions(self, request: Request) -> JSONResponse:
        self.check_auth(request)
        body = await self.read_json(request)
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise ApiError(400, "'model' must be a string", param="model")
        if model is not None and model != self.engine.name:
            raise ApiError(
                404,
                f"model {model!r} does not exist; this server serves {self.engine.name!r}",
                type="not_found_error",
                param="model",
                code="model_not_found",
            )
        prompts = self.parse_prompts(body)
        params = self.parse_params(body)
        job = Job(prompts, params)
        try:
            completions = await asyncio.wrap_future(self.worker.submit(job))
        except TeacherUnavailable as err:  # relay mode: the remote teacher is down
            raise ApiError(502, f"teacher unavailable: {err}", type="upstream_error") from None
        except Exception as err:
            raise ApiError(
                500, f"generation failed: {type(err).__name__}: {err}", type="server_error"
            ) from None
        return JSONResponse(self._response(completions))

    def _response(self, completions: list[Completion]) -> dict[str, Any]:
        choices = []
        for i, c in enumerate(completions):
            choice: dict[str, Any] = {
                "index": i,
                "text": c.text,
                "logprobs": None,
                "finish_reason": c.finish_reason,
                "token_ids": c.token_ids,
            }
            if c.relay is not None:
                choice["relay"] = c.relay
            choices.append(choice)
        prompt_tokens = sum(c.prompt_tokens for c in completions)
        completion_tokens = sum(len(c.token_ids) for c in completions)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.engine.name,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "prompt_tokens_details": {
                    "cached_tokens": sum(c.cached_tokens for c in completions)
                },
            },
        }

    async def models(self, request: Request) -> JSONResponse:
        self.check_auth(request)
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {
                        "id": self.engine.name,
                        "object": "model",
                        "created": self.created,
                        "owned_by": "relaypipe",
                    }
                ],
            }
        )

    async def health(self, request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "model": self.engine.name})


def make_app(
    engine: Engine, *, api_key: str | None = None, limits: ServeLimits | None = None
) -> Starlette:
    """The ASGI app serving ``engine``: ``/v1/completions``, ``/v1/models`` and ``/health``."""
    api = _Api(engine, api_key, limits or ServeLimits())

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        api.worker.start()
        try:
            yield
        finally:
            api.worker.stop()

    async def api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return exc.response()

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return ApiError(exc.status_code, str(exc.detail), type=kind).response()

    app = Starlette(
        routes=[
            Route("/v1/completions", api.completions, methods=["POST"]),
            Route("/v1/models", api.models, methods=["GET"]),
            Route("/health", api.health, methods=["GET"]),
        ],
        exception_handlers={ApiError: api_error, HTTPException: http_error},
        lifespan=lifespan,
    )
    app.state.api = api
    return app


# ---------------------------------------------------------------------------- building & running
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


def run_server(
    app: Starlette, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info"
) -> None:
    """Serve until interrupted. Binds loopback unless told otherwise."""
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: reachable from other machines; set an API key", host)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)


class ServerThread:
    """Run an app on a loopback port in a background thread (tests, benchmarks, notebooks).

    ``with ServerThread(app) as srv: ...`` binds a free port, waits until the server accepts
    connections, and shuts it down (lifespan included) on exit.
    """

    def __init__(self, app: Starlette, host: str = "127.0.0.1", port: int = 0):
        self.app, self.host, self.port = app, host, port
        self.server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> ServerThread:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app, log_level="warning", access_log=False, timeout_graceful_shutdown=2
        )
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"server on {self.url} did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.server is not None and self._thread is not None
        self.server.should_exit = True
        self._thread.join(timeout=10)
