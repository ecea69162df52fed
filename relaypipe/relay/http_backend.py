"""A teacher or a student behind an OpenAI-compatible ``/v1/completions`` server.

:class:`HTTPBackend` implements the :class:`~relaypipe.relay.backends.Backend` protocol, so the
relay decoder can borrow tokens from vLLM, SGLang, llama.cpp, a hosted API or
``relaypipe serve`` exactly as it does from an in-process model, and so can the student it
decodes with (``role="student"``). What the decoder relies on, and how this backend keeps it
true over a network:

* **Exact token boundaries.** With ``prompt_format="tokens"`` (the default, for a server whose
  tokenizer is ours) the context is sent as token ids and the server is asked for the ids it
  generated (``return_token_ids``, understood by vLLM >= 0.10.2 and ``relaypipe serve``); only
  if it does not send them is the returned text re-tokenized. With ``prompt_format="text"``
  (a teacher with a different tokenizer) the context is decoded to text and the returned text
  re-tokenized with our tokenizer; boundaries are then only as exact as the round trip.
* **EOS is visible.** The decoder ends a request when the teacher's result finishes with
  ``"eos"``, and training expects that EOS token in the trace (the in-process backend includes
  it). Servers report ``finish_reason="stop"`` but often drop the EOS token from ``text`` (and
  sometimes from ids), so on ``"stop"`` the tokenizer's EOS id is appended when the returned
  tokens do not already end in one (unless that would exceed ``max_new_tokens``).
* **Stop tokens are kept.** The student is asked to stop at ``</call>`` (and ``<call>`` under a
  call bias) with vLLM's ``stop_token_ids`` extension, and the decoder needs that token at the
  end of the result (``finish="stop"``: the student's view keeps its own command). vLLM
  (v0 ``StopChecker`` and v1 ``check_stop``) stops *after* appending the token, so it is the
  last of the returned ``token_ids``; the text leaves it out (call tags are special tokens),
  and ``stop_reason`` names its id (``None`` for EOS). What this backend relies on, in order:
  a returned id list ending in a stop id is ``"stop"`` whatever ``finish_reason`` says (vLLM
  reports ``"length"`` when the stop token was also the ``max_tokens``-th); a ``"stop"`` whose
  ``stop_reason`` is one of our stop ids but whose ids lack it gets it appended; a server
  that ignored ``stop_token_ids`` and ran past one is cut right after the first stop id
  (logged once). A student needs the generated ids: its commands are special tokens that no
  text carries, so a student server that returns text only is a configuration error.
* **Logit bias.** A request's ``logit_bias`` (the relay's ``call_bias``) is sent as OpenAI's
  ``logit_bias`` (string token-id keys). OpenAI-style servers (vLLM, ``relaypipe serve``) take
  values in [-100, 100] (vLLM clamps, OpenAI and ``relaypipe serve`` refuse the rest), so larger
  values, ``+inf`` (force) and ``-inf`` (ban) included, are sent as +-100: no logit gap of a
  real model comes near 100, so the pick is the in-process one in practice, but a ban or a
  force is then only a very strong push.
* **Accounting is what came back.** ``tokens`` are the returned tokens, never the
  ``max_tokens`` asked for; ``prefill_tokens`` is ``usage.prompt_tokens`` less
  ``usage.prompt_tokens_details.cached_tokens`` (the server's prefix cache, like our
  in-process KV cache), falling back to the prompt length when the server reports no usage.
* **Reproducible sampling.** With ``temperature > 0`` each request sends a ``seed`` drawn from
  its own ``GenRequest.generator`` (or hashed from its key and context length), so a seeded
  relay decode sends the same seeds whatever the batching, and a retry repeats the same seed.
* **Failures stay per request.** The requests of one ``generate`` call are posted
  concurrently (at most ``concurrency`` in flight, over one pooled ``httpx.Client``). Transient
  failures (connect errors, timeouts, resets, 429, 5xx, truncated or malformed bodies) are
  retried with exponential backoff; other 4xx are not. A request that still fails either
  raises :class:`TeacherUnavailable` (``on_failure="fail"``, after the whole batch has
  finished) or comes back as ``GenResult(tokens=[], finish="error", error=...)``
  (``on_failure="skip"``), which the decoder records as a ``teacher_error`` event before
  handing the pen back to the student. 401/403/404 mean the backend is misconfigured (wrong
  key, URL or model name): they raise :class:`TeacherConfigError` under either policy, since
  skipping would silently turn a whole run teacher-free. A student has nobody to skip to:
  ``role="student"`` only fails. The exceptions keep their (historical) teacher names for
  callers that catch them; their ``role`` and message say which side failed.
* **Threads.** ``generate`` may be called from several threads at once (one-request lists
  run in the caller's thread): the pooled client is thread-safe, everything drawn from
  shared state is drawn under a lock or from the request's own generator, and at most
  ``concurrency`` connections are open (further callers wait for one, within ``timeout_s``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import threading
import time
from collections.abc import Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import torch
from transformers import PreTrainedTokenizerBase

from relaypipe.relay.backends import GenRequest, GenResult
from relaypipe.relay.sampling import Sampling, check_logit_bias

log = logging.getLogger(__name__)

PromptFormat = Literal["tokens", "text"]
OnFailure = Literal["fail", "skip"]
Role = Literal["teacher", "student"]
ROLES = ("teacher", "student")

# OpenAI's logit_bias range; vLLM clamps to it, OpenAI and relaypipe serve refuse values past it
MAX_LOGIT_BIAS = 100.0

_SEED_RANGE = 2**31 - 1
_CONFIG_STATUSES = frozenset({401, 403, 404})
_RETRY_STATUSES = frozenset({408, 409, 425, 429})  # plus every 5xx


class TeacherUnavailable(RuntimeError):
    """A request to a remote model failed for good (after its retries).

    The name is historical: the model may be the student (``role``, which the message names
    too). ``failures`` maps every failed request key of the batch to its last error, so a
    caller can see that the others succeeded (they are not returned: the batch is abandoned).
    """

    def __init__(
        self,
        message: str,
        *,
        url: str,
        key: Hashable,
        last_error: str,
        attempts: int,
        failures: dict[Hashable, str] | None = None,
        role: str = "teacher",
    ):
        super().__init__(message)
        self.role = role
        self.url = url
        self.key = key
        self.last_error = last_error
        self.attempts = attempts
        self.failures = failures or {key: last_error}


class TeacherConfigError(TeacherUnavailable):
    """The server refused us as a client (401/403/404: a wrong key, URL or model name), or
    cannot serve the role (a student server that returns no token ids)."""


# Role-neutral names for new code; the old ones stay the classes themselves.
ServerUnavailable = TeacherUnavailable
ServerConfigError = TeacherConfigError


@dataclass
class _Call:
    """One prepared POST: everything drawn from shared state (the RNG) is fixed here."""

    key: Hashable
    body: dict[str, Any]
    context_len: int
    max_new_tokens: int
    stop_token_ids: frozenset[int]


@dataclass
class _Failure:
    key: Hashable
    error: str
    attempts: int
    config: bool = False  # 401/403/404: misconfiguration, raised under any policy


class _Retry(Exception):
    """A transient failure worth another attempt."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class _GiveUp(Exception):
    """A failure that another attempt would repeat (4xx other than 429)."""

    def __init__(self, message: str, *, config: bool = False):
        super().__init__(message)
        self.config = config


def completions_url(base_url: str) -> str:
    """``.../v1/completions`` for a base URL given with or without the ``/v1`` suffix."""
    url = base_url.rstrip("/")
    if url.endswith("/completions"):
        return url
    if not url.endswith("/v1"):
        url += "/v1"
    return url + "/completions"


class HTTPBackend:
    """A :class:`~relaypipe.relay.backends.Backend` over an OpenAI-compatible completions API.

    Args:
        base_url: the server, e.g. ``http://127.0.0.1:8000`` or ``https://host/v1``.
        model: the ``model`` field sent with every request.
        tokenizer: our tokenizer; decodes contexts (text format), re-tokenizes returned text
            and supplies the EOS id and vocabulary size used to validate returned ids.
        prompt_format: ``"tokens"`` (ids in, ids out; the tokenizers must match) or ``"text"``.
        api_key: sent as ``Authorization: Bearer``; if None, read from env var ``api_key_env``.
        timeout_s: per-attempt timeout (connect, read, write and pool wait each).
        max_retries: further attempts after the first, for transient failures only.
        backoff_s: first retry delay; doubles per attempt (with jitter), capped at
            ``max_backoff_s``; a ``Retry-After`` header can lengthen it up to that cap.
        concurrency: the most requests in flight at once (threads and pooled connections).
        on_failure: ``"fail"`` raises :class:`TeacherUnavailable`; ``"skip"`` returns an
            ``"error"`` result for the failed request and lets the relay continue.
        return_token_ids: ask the server for generated ids (tokens format only).
        role: ``"teacher"`` or ``"student"``: named in errors and logs; a student needs the
            tokens format, returned ids and ``on_failure="fail"`` (module docstring).
    """

    supports_logit_bias = True  # sent as OpenAI logit_bias, clamped to +-100 (module doc)
    # generate may run from several threads at once: the relay decoder sends each request as
    # its own call (relaypipe.relay.lanes.ThreadLane), and the server's engine batches them
    concurrent = True

    def __init__(
        self,
        base_url: str,
        model: str,
        tokenizer: PreTrainedTokenizerBase,
        *,
        prompt_format: PromptFormat = "tokens",
        api_key: str | None = None,
        api_key_env: str | None = None,
        timeout_s: float = 60.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        concurrency: int = 8,
        on_failure: OnFailure = "fail",
        return_token_ids: bool = True,
        skip_special_tokens: bool = True,
        role: Role = "teacher",
    ):
        if role not in ROLES:
            raise ValueError(f"role must be 'teacher' or 'student', got {role!r}")
        if role == "student" and (
            prompt_format != "tokens" or not return_token_ids or on_failure != "fail"
        ):
            raise ValueError(
                "a student server needs prompt_format='tokens', return_token_ids and "
                "on_failure='fail': its view holds its own commands (special tokens no text "
                "carries), and nobody else can write its tokens when it fails"
            )
        if prompt_format not in ("tokens", "text"):
            raise ValueError(f"prompt_format must be 'tokens' or 'text', got {prompt_format!r}")
        if on_failure not in ("fail", "skip"):
            raise ValueError(f"on_failure must be 'fail' or 'skip', got {on_failure!r}")
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if max_retries < 0 or timeout_s <= 0 or backoff_s < 0:
            raise ValueError("need max_retries >= 0, timeout_s > 0 and backoff_s >= 0")
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token_id; the decoder needs one")
        self.role: Role = role
        self.url = completions_url(base_url)
        self.model = model
        self.tokenizer = tokenizer
        self.prompt_format: PromptFormat = prompt_format
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.concurrency = concurrency
        self.on_failure: OnFailure = on_failure
        self.return_token_ids = return_token_ids and prompt_format == "tokens"
        self.skip_special_tokens = skip_special_tokens
        self.eos_token_ids = frozenset([int(tokenizer.eos_token_id)])
        self._eos_id = int(tokenizer.eos_token_id)
        self._vocab_size = len(tokenizer)
        if api_key is None and api_key_env:
            api_key = os.environ.get(api_key_env)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(timeout_s),
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        )
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix=f"http-{role}")
        self._jitter = random.Random()
        self._jitter_lock = threading.Lock()
        self._warned_stops = False  # logged once: the server ran past a stop token

    # ------------------------------------------------------------------ Backend protocol
    def generate(
        self,
        requests: Sequence[GenRequest],
        *,
        stop_token_ids: frozenset[int] = frozenset(),
        sampling: Sampling = Sampling(),
    ) -> list[GenResult]:
        """One POST per request, concurrently; results in request order (see module doc)."""
        if not requests:
            return []
        if stop_token_ids and self.prompt_format == "text":
            raise ValueError("stop_token_ids need prompt_format='tokens' (ids are ours)")
        calls = [self._prepare(r, stop_token_ids, sampling) for r in requests]
        if len(calls) == 1:
            outcomes = [self._run(calls[0])]
        else:
            outcomes = list(self._pool.map(self._run, calls))

        failures = [o for o in outcomes if isinstance(o, _Failure)]
        if failures:
            summary = {f.key: f.error for f in failures}
            first = next((f for f in failures if f.config), None)
            if first is not None or self.on_failure == "fail":
                first = first or failures[0]
                cls = TeacherConfigError if first.config else TeacherUnavailable
                also = f" ({len(failures)} of {len(calls)} failed)" if len(calls) > 1 else ""
                raise cls(
                    f"{self.role} server {self.model!r} at {self.url} failed request "
                    f"{first.key!r} after {first.attempts} attempt(s): {first.error}{also}",
                    url=self.url,
                    key=first.key,
                    last_error=first.error,
                    attempts=first.attempts,
                    failures=summary,
                    role=self.role,
                )
        return [
            o
            if isinstance(o, GenResult)
            else GenResult(
                tokens=[],
                finish="error",
                prefill_tokens=0,
                error=f"{self.role} at {self.url}: {o.error} (after {o.attempts} attempt(s))",
            )
            for o in outcomes
        ]

    def release(self, key: Hashable) -> None:
        """Nothing to free: the server's own prefix cache (if any) manages itself."""

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._client.close()

    def __enter__(self) -> HTTPBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check(self) -> list[str]:
        """The model ids the server lists; raises :class:`TeacherConfigError` if ours is absent.

        Cheap to call once at start-up, so a wrong URL, key or model name fails before the
        first hand-off instead of in the middle of a run.
        """
        url = self.url.rsplit("/completions", 1)[0] + "/models"
        try:
            resp = self._client.get(url)
            resp.raise_for_status()
            ids = [m["id"] for m in resp.json()["data"]]
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as err:
            raise TeacherConfigError(
                f"{self.role} server: cannot list models at {url}: {err}",
                url=url,
                key=None,
                last_error=str(err),
                attempts=1,
                role=self.role,
            ) from err
        if self.model not in ids:
            raise TeacherConfigError(
                f"{self.role} server: model {self.model!r} is not served at {url} (it serves "
                f"{ids})",
                url=url,
                key=None,
                last_error="unknown model",
                attempts=1,
                role=self.role,
            )
        return ids

    # ------------------------------------------------------------------ internals
    def _prepare(
        self, req: GenRequest, stop_token_ids: frozenset[int], sampling: Sampling
    ) -> _Call:
        if not req.context:
            raise ValueError(f"request {req.key!r}: empty context (a prompt needs a token)")
        try:
            check_logit_bias(req.logit_bias, self._vocab_size)
        except ValueError as err:
            raise ValueError(f"request {req.key!r}: {err}") from None
        prompt: str | list[int]
        if self.prompt_format == "tokens":
            prompt = [int(t) for t in req.context]
        else:
            prompt = self.tokenizer.decode(
                req.context, skip_special_tokens=self.skip_special_tokens
            )
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": int(req.max_new_tokens),
            "temperature": float(sampling.temperature),
            "top_p": float(sampling.top_p),
        }
        if sampling.top_k:
            body["top_k"] = int(sampling.top_k)  # vLLM/SGLang/llama.cpp extension
        if sampling.temperature > 0:
            body["seed"] = self._seed(req)
        if self.return_token_ids:
            body["return_token_ids"] = True
        if stop_token_ids:
            body["stop_token_ids"] = sorted(stop_token_ids)  # vLLM extension
        if req.logit_bias:
            body["logit_bias"] = {str(t): _wire_bias(v) for t, v in req.logit_bias.items()}
        return _Call(req.key, body, len(req.context), int(req.max_new_tokens), stop_token_ids)

    @staticmethod
    def _seed(req: GenRequest) -> int:
        """A per-call seed: from the request's own RNG, else from its key and position."""
        if req.generator is not None:
            return int(torch.randint(_SEED_RANGE, (1,), generator=req.generator))
        digest = hashlib.blake2b(f"{req.key!r}/{len(req.context)}".encode(), digest_size=4)
        return int.from_bytes(digest.digest(), "big") % _SEED_RANGE

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        base = min(self.backoff_s * 2**attempt, self.max_backoff_s)
        with self._jitter_lock:
            delay = base * (0.5 + 0.5 * self._jitter.random())
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_backoff_s))
        return delay

    def _run(self, call: _Call) -> GenResult | _Failure:
        """All attempts of one request; never raises, so one request cannot sink a batch."""
        last, retry_after = "no attempt made", None
        attempts = 0
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self._delay(attempt - 1, retry_after))
            attempts += 1
            try:
                return self._attempt(call)
            except _Retry as err:
                last, retry_after = str(err), err.retry_after
                log.info("%s request %r attempt %d: %s", self.role, call.key, attempts, last)
            except _GiveUp as err:
                log.warning("%s request %r failed: %s", self.role, call.key, err)
                return _Failure(call.key, str(err), attempts, config=err.config)
            except Exception as err:  # a bug or an unexpected reply: still only this request
                log.exception("%s request %r: unexpected error", self.role, call.key)
                return _Failure(call.key, f"{type(err).__name__}: {err}", attempts)
        log.warning(
            "%s request %r gave up after %d attempts: %s", self.role, call.key, attempts, last
        )
        return _Failure(call.key, last, attempts)

    def _attempt(self, call: _Call) -> GenResult:
        try:
            resp = self._client.post(self.url, json=call.body)
        except httpx.TimeoutException as err:
            raise _Retry(f"{type(err).__name__} after {self.timeout_s}s") from err
        except httpx.RequestError as err:  # connect errors, resets, truncated bodies
            raise _Retry(f"{type(err).__name__}: {err or 'connection failed'}") from err
        status = resp.status_code
        if status != 200:
            message = f"HTTP {status}: {_error_message(resp)}"
            if status >= 500 or status in _RETRY_STATUSES:
                raise _Retry(message, _retry_after(resp))
            raise _GiveUp(message, config=status in _CONFIG_STATUSES)
        try:
            data = resp.json()
        except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
            raise _Retry(f"malformed JSON body ({err}): {resp.text[:80]!r}") from err
        return self._parse(call, data)

    def _parse(self, call: _Call, data: Any) -> GenResult:
        """The GenResult for a 200 reply; malformed replies are retried (``_Retry``)."""
        try:
            choice = data["choices"][0]
            finish_reason = choice.get("finish_reason")
            stop_reason = choice.get("stop_reason")  # vLLM: the stop token id, None for EOS
            ids = choice.get("token_ids") if self.prompt_format == "tokens" else None
            text = choice.get("text")
        except (KeyError, IndexError, TypeError, AttributeError) as err:
            raise _Retry(f"malformed completion (no choices[0]): {str(data)[:80]!r}") from err
        if ids is not None:
            if not isinstance(ids, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < self._vocab_size
                for t in ids
            ):
                raise _Retry(f"malformed token_ids: {str(ids)[:80]!r}")
            tokens = list(ids)
        elif self.role == "student" and isinstance(text, str):
            raise _GiveUp(
                "the student server returned text without token_ids: a student's commands are "
                "special tokens that text does not carry; serve it where return_token_ids is "
                "understood (vLLM >= 0.10.2, relaypipe serve)",
                config=True,
            )
        elif isinstance(text, str):
            tokens = self.tokenizer(text, add_special_tokens=False).input_ids
        else:
            raise _Retry("completion has neither token_ids nor text")
        if finish_reason not in ("stop", "eos", "length"):
            raise _Retry(f"unexpected finish_reason {finish_reason!r}")

        stops = call.stop_token_ids
        cut = next((i for i, t in enumerate(tokens) if t in stops), len(tokens))
        if cut < len(tokens) - 1:  # the server ignored stop_token_ids and went on
            if not self._warned_stops:
                self._warned_stops = True
                log.warning(
                    "%s server at %s generated past a stop token id (does it ignore "
                    "stop_token_ids?); cutting each reply after its first one",
                    self.role,
                    self.url,
                )
            tokens = tokens[: cut + 1]
        finish = "length" if finish_reason == "length" else "eos"
        if len(tokens) > call.max_new_tokens:
            log.warning(
                "%s returned %d tokens for max_tokens=%d; keeping the first %d",
                self.role,
                len(tokens),
                call.max_new_tokens,
                call.max_new_tokens,
            )
            tokens, finish = tokens[: call.max_new_tokens], "length"
        room = len(tokens) < call.max_new_tokens
        if tokens and tokens[-1] in stops:
            finish = "stop"  # also when the stop token was the last one allowed ("length")
        elif tokens and tokens[-1] in self.eos_token_ids:
            finish = "eos"
        elif finish == "eos" and room:  # a stop whose token the server left out
            if _is_id(stop_reason) and stop_reason in stops:
                tokens.append(stop_reason)
                finish = "stop"
            else:
                tokens.append(self._eos_id)  # the decoder needs the EOS it ended at

        prefill = call.context_len if self.prompt_format == "tokens" else None
        usage = data.get("usage") if isinstance(data, dict) else None
        if isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int):
            prefill = usage["prompt_tokens"]
            details = usage.get("prompt_tokens_details")
            if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
                prefill = max(0, prefill - details["cached_tokens"])
        if prefill is None:  # text format without usage: our own count of the prompt
            prefill = len(self.tokenizer(call.body["prompt"], add_special_tokens=False).input_ids)
        return GenResult(tokens=tokens, finish=finish, prefill_tokens=prefill)


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _wire_bias(value: float) -> float:
    """A logit bias as OpenAI-style servers take it: within [-100, 100] (+-inf included)."""
    return max(-MAX_LOGIT_BIAS, min(MAX_LOGIT_BIAS, float(value)))


def _error_message(resp: httpx.Response) -> str:
    """The server's ``error.message`` if it sent one, else the start of the body."""
    try:
        err = resp.json().get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
    except (ValueError, AttributeError):
        pass
    return resp.text[:200] or resp.reason_phrase


def _retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff
