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

The package, by idea:

* :mod:`~relaypipe.serve.protocol`: operator limits (:class:`ServeLimits`), the pydantic
  request/response models, JSON body decoding, and OpenAI-style errors (:class:`ApiError`).
* :mod:`~relaypipe.serve.engines`: :class:`ModelEngine`, :class:`RelayEngine` (with the relay
  budgets an operator sets as ceilings), :func:`build_model_engine`.
* :mod:`~relaypipe.serve.batching`: the :class:`MicroBatcher` worker thread.
* :mod:`~relaypipe.serve.app`: routes, auth and body limits (:func:`make_app`),
  :func:`run_server`, :class:`ServerThread`.

Every request is validated before any model work, and every problem is answered with an
OpenAI-style ``{"error": {"message", "type", "param", "code"}}`` body: 401 without the API key,
413 for an oversized body, 404 for an unknown model or route, 400 for anything else malformed.
A request's failure never fails the other requests of its micro-batch.
"""

from relaypipe.serve.app import ServerThread, make_app, run_server
from relaypipe.serve.batching import MicroBatcher
from relaypipe.serve.engines import (
    RELAY_CAPS,
    RELAY_MAX_SEED,
    Completion,
    CompletionParams,
    Engine,
    Job,
    ModelEngine,
    RelayEngine,
    build_model_engine,
)
from relaypipe.serve.protocol import (
    DEFAULT_MAX_TOKENS,
    MAX_SEED,
    ApiError,
    CompletionRequest,
    CompletionResponse,
    RelayOptions,
    ServeLimits,
)

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "MAX_SEED",
    "RELAY_CAPS",
    "RELAY_MAX_SEED",
    "ApiError",
    "Completion",
    "CompletionParams",
    "CompletionRequest",
    "CompletionResponse",
    "Engine",
    "Job",
    "MicroBatcher",
    "ModelEngine",
    "RelayEngine",
    "RelayOptions",
    "ServeLimits",
    "ServerThread",
    "build_model_engine",
    "make_app",
    "run_server",
]
