"""The HTTP face of ``relaypipe serve``: routes, auth, body limits, and server start-up.

The event loop only reads, parses, validates and waits; all model work happens on the
:class:`~relaypipe.serve.batching.MicroBatcher`'s thread. Every answer is JSON: OpenAI-style
``{"error": {"message", "type", "param", "code"}}`` bodies for 401 (key), 404 (route or
model), 405, 413 (body size) and 400 (anything else malformed); 502 when a relay server's
remote student or teacher is down (the message says which); and a JSON 500 only for a
failure of the server itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from relaypipe.relay.http_backend import TeacherUnavailable
from relaypipe.serve.batching import MicroBatcher
from relaypipe.serve.engines import Completion, CompletionParams, Engine, Job
from relaypipe.serve.protocol import (
    ApiError,
    AsciiJSONResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    CompletionUsage,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    RequestContext,
    ServeLimits,
    brief,
    decode_json_body,
    parse_completion_request,
)

log = logging.getLogger(__name__)


class _Api:
    """Request handling: auth, size limits, validation, and the hop to the worker thread."""

    def __init__(
        self,
        engine: Engine,
        api_key: str | None,
        limits: ServeLimits,
        frame_prompt: Callable[[str], str] | None = None,
        card: dict[str, Any] | None = None,
    ):
        self.engine = engine
        self.api_key = api_key
        self.limits = limits
        self.frame_prompt = frame_prompt  # a string prompt -> the text the model reads
        self.card = card
        self.worker = MicroBatcher(engine, limits)
        self.created = int(time.time())
        self.vocab_size = len(engine.tokenizer)
        self.context = RequestContext(vocab_size=self.vocab_size, limits=limits)

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

    async def read_body(self, request: Request) -> bytes:
        limit = self.limits.max_body_bytes
        too_large = ApiError(413, f"request body over {limit} bytes", type="request_too_large")
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                raise ApiError(400, "invalid Content-Length header") from None
            if size > limit:
                raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    # ---------------------------------------------------------------- validation
    def tokenize(self, req: CompletionRequest) -> list[list[int]]:
        """Token ids of each prompt (validated by the request model), within the length cap."""
        items = req.prompt_items()
        prompts = []
        for k, item in enumerate(items):
            where = "'prompt'" if len(items) == 1 else f"'prompt[{k}]'"
            if isinstance(item, str):
                try:
                    text = self.frame_prompt(item) if self.frame_prompt else item
                    ids = list(self.engine.tokenizer(text, add_special_tokens=False).input_ids)
                except Exception as err:  # the tokenizer's trouble with the client's text
                    raise ApiError(
                        400, f"{where} could not be tokenized: {type(err).__name__}", "prompt"
                    ) from None
                if not ids:
                    raise ApiError(400, f"{where} is empty (it has no tokens)", "prompt")
            else:
                ids = item
            if len(ids) > self.limits.max_prompt_tokens:
                raise ApiError(
                    400,
                    f"{where} has {len(ids)} tokens; this server accepts at most "
                    f"{self.limits.max_prompt_tokens}",
                    param="prompt",
                    code="context_length_exceeded",
                )
            prompts.append(ids)
        return prompts

    def parse(self, body: dict) -> Job:
        """A validated job, or :class:`ApiError`: nothing invalid ever reaches a batch."""
        req = parse_completion_request(body, self.context)
        if req.model is not None and req.model != self.engine.name:
            raise ApiError(
                404,
                f"model {brief(req.model)} does not exist; this server serves {self.engine.name!r}",
                type="not_found_error",
                param="model",
                code="model_not_found",
            )
        prompts = self.tokenize(req)
        params = CompletionParams.from_request(req, self.limits)
        if params.seed is not None and params.seed > self.engine.max_seed:
            raise ApiError(
                400,
                f"'seed' must be in [0, {self.engine.max_seed}] on this server, "
                f"got {brief(params.seed)}",
                "seed",
            )
        self.engine.validate(params)
        return Job(prompts, params)

    # ---------------------------------------------------------------- endpoints
    async def completions(self, request: Request) -> JSONResponse:
        self.check_auth(request)
        body = decode_json_body(await self.read_body(request))
        job = self.parse(body)
        try:
            completions = await asyncio.wrap_future(self.worker.submit(job))
        except ApiError:
            raise
        except TeacherUnavailable as err:  # relay mode: a remote student or teacher is down
            raise ApiError(502, f"{err.role} unavailable: {err}", type="upstream_error") from None
        except Exception as err:
            raise ApiError(
                500, f"generation failed: {type(err).__name__}: {err}", type="server_error"
            ) from None
        return AsciiJSONResponse(self._response(completions))

    def _response(self, completions: list[Completion]) -> dict:
        prompt_tokens = sum(c.prompt_tokens for c in completions)
        completion_tokens = sum(len(c.token_ids) for c in completions)
        return CompletionResponse(
            id=f"cmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=self.engine.name,
            choices=[
                CompletionChoice(
                    index=i,
                    text=c.text,
                    finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason,
                    token_ids=c.token_ids,
                    relay=c.relay,
                )
                for i, c in enumerate(completions)
            ],
            usage=CompletionUsage(
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                total_tokens=prompt_tokens + completion_tokens,
                prompt_tokens_details=PromptTokensDetails(
                    cached_tokens=sum(c.cached_tokens for c in completions)
                ),
            ),
        ).to_json()

    async def models(self, request: Request) -> JSONResponse:
        self.check_auth(request)
        card = ModelCard(id=self.engine.name, created=self.created, relay=self.card)
        data = ModelList(data=[card]).model_dump()
        for item in data["data"]:
            if item["relay"] is None:
                del item["relay"]
        return AsciiJSONResponse(data)

    async def health(self, request: Request) -> JSONResponse:
        return AsciiJSONResponse({"status": "ok", "model": self.engine.name})


def make_app(
    engine: Engine,
    *,
    api_key: str | None = None,
    limits: ServeLimits | None = None,
    frame_prompt: Callable[[str], str] | None = None,
    card: dict[str, Any] | None = None,
) -> Starlette:
    """The ASGI app serving ``engine``: ``/v1/completions``, ``/v1/models`` and ``/health``.

    ``frame_prompt``: turns each string prompt into the text the model reads (``relaypipe
    serve`` frames questions as a relay student was trained; token-id prompts never are);
    ``card``: a ``relay`` field for the ``/v1/models`` card (the caps and prompt format)."""
    api = _Api(engine, api_key, limits or ServeLimits(), frame_prompt, card)

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

    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        # a bug of ours, never a client's doing: still JSON, and logged by Starlette
        return ApiError(
            500, f"internal error: {type(exc).__name__}", type="server_error"
        ).response()

    app = Starlette(
        routes=[
            Route("/v1/completions", api.completions, methods=["POST"]),
            Route("/v1/models", api.models, methods=["GET"]),
            Route("/health", api.health, methods=["GET"]),
        ],
        exception_handlers={
            ApiError: api_error,
            HTTPException: http_error,
            Exception: server_error,
        },
        lifespan=lifespan,
    )
    app.state.api = api
    return app


# ---------------------------------------------------------------------------- running
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
