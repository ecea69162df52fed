"""Backends: something that continues token contexts. The relay decoder talks only to this.

A backend receives, per request, the *whole* context in its own view (the student's view with
commands, or the teacher's view without) and returns up to ``max_new_tokens`` new tokens. It
may keep per-request state between calls under the request's ``key``; the in-process backend
(:mod:`relaypipe.relay.transformers_backend`) keeps each request's KV cache, so a call
prefills only the tokens it has not seen yet. :class:`~relaypipe.relay.http_backend.HTTPBackend`
fits the same interface over an OpenAI-compatible server.

Two optional capabilities:

* ``supports_logit_bias = True``: ``generate`` honours each request's ``logit_bias``
  (:mod:`relaypipe.relay.sampling`); a backend without the attribute may ignore the field, so a
  caller that needs a bias checks the flag first (the relay decoder does, for its
  ``call_bias``). ``None`` or ``{}`` is no bias.
* ``open_stream(stop_token_ids, sampling)``: a :class:`Stream` that requests join and leave one
  step at a time (continuous batching); the relay decoder uses it where a backend has it, and
  otherwise calls ``generate`` (:mod:`relaypipe.relay.lanes`).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from relaypipe.relay.sampling import Sampling

__all__ = ["Backend", "GenRequest", "GenResult", "Sampling", "Stream"]


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


class Stream(Protocol):
    """Requests decoding together, joining and leaving at any step (optional; see the module
    docstring). ``step`` advances every request in it by one token (prefilling the ones that
    just joined) and returns those that finished; ``len`` counts the requests not returned."""

    def add(self, request: GenRequest) -> None: ...

    def step(self) -> list[tuple[Hashable, GenResult]]: ...

    def __len__(self) -> int: ...
