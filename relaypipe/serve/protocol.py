"""The wire protocol of ``relaypipe serve``: operator limits, the request and response models,
and OpenAI-style errors.

Every request body is parsed (:func:`decode_json_body`) and validated
(:func:`parse_completion_request`) here, before anything is queued for a model, so a malformed
request is answered with a 4xx of its own and never reaches a micro-batch. Errors name the
field (``param``, dotted for relay options: ``relay.max_teacher_tokens``) and the bad value.

Unknown fields are **rejected** (400, ``code: unrecognized_argument``), as OpenAI's API does
("Unrecognized request argument supplied"), rather than ignored as vLLM does: a typo
(``max_token``) or an unsupported knob (``repetition_penalty``) would otherwise be answered
with something other than what was asked. OpenAI fields this server does not implement
(``stream``, ``n``, ``stop``, ``logprobs``, ...) are accepted only at their "off" value.

``logit_bias`` is OpenAI's: token-id strings (``"17"``) to numbers in [-100, 100], added to
those logits at every step (model mode; relay mode has ``relay.call_bias`` instead). Values
past the range are refused, as OpenAI does (vLLM clamps them).

Types are strict: a JSON ``true`` is not an integer, ``4.0`` / ``"4"`` are not integers, and
``NaN`` / ``Infinity`` (which Python's ``json`` lets through) are not numbers. One exception:
``relay.call_bias`` takes ``Infinity`` / ``-Infinity`` (or a number too large for a double,
``1e999``) as the infinite biases "always call" / "never call"; ``NaN`` stays refused.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError
from starlette.responses import JSONResponse

# the sampling bounds are Sampling's own, so a request the server accepts always samples
from relaypipe.relay.sampling import MAX_TEMPERATURE, MAX_TOP_K, MIN_TEMPERATURE, MIN_TOP_P

MAX_INT64 = 2**63 - 1
MAX_SEED = MAX_INT64  # seeds are in [0, 2**63); engines may narrow this (see RelayEngine)
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS_ENTRIES = 1024
MAX_LOGIT_BIAS = 100.0  # OpenAI's range: [-100, 100]
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions, lowered to the server's cap


# ---------------------------------------------------------------------------- operator limits
@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask for; past these the server answers 4xx and does no work.

    Every request-facing limit is a ceiling: a request may ask for less, never more, and a
    request that leaves a field out (or sends ``null``) gets the operator's value, never
    "unbounded". The relay engine's own ceilings (teacher tokens, calls, ...) live in its
    :class:`~relaypipe.relay.decoder.RelayConfig` (see :class:`~relaypipe.serve.RelayEngine`).
    """

    max_body_bytes: int = 1 << 20  # larger bodies: 413
    max_prompt_tokens: int = 8192  # per prompt, after tokenisation
    max_tokens: int = 4096  # cap on a request's max_tokens (absent: min(16, this))
    max_prompts: int = 64  # prompts in one request (a list of prompts)
    max_batch: int = 16  # micro-batch size (model mode); not a request field
    batch_wait_s: float = 0.002  # how long the worker waits for batch-mates

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_prompt_tokens", "max_tokens", "max_prompts"):
            if type(getattr(self, name)) is not int or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if type(self.max_batch) is not int or self.max_batch < 1:
            raise ValueError(f"max_batch must be an integer >= 1, got {self.max_batch!r}")
        if not (math.isfinite(self.batch_wait_s) and self.batch_wait_s >= 0):
            raise ValueError(f"batch_wait_s must be a finite number >= 0, got {self.batch_wait_s}")

    @property
    def default_max_tokens(self) -> int:
        return min(DEFAULT_MAX_TOKENS, self.max_tokens)


# ---------------------------------------------------------------------------- errors
class ApiError(Exception):
    """A request's failure, answered as an OpenAI-style JSON error body."""

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

    def body(self) -> dict[str, Any]:
        detail = ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorResponse(error=detail).model_dump()

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return AsciiJSONResponse(self.body(), status_code=self.status, headers=headers)


class AsciiJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped, for every answer: an error may quote a client's string,
    and a lone surrogate in it cannot be encoded as UTF-8 (Starlette's default), which would
    turn a 400 into a 500."""

    def render(self, content: Any) -> bytes:
        return json.dumps(
            content, ensure_ascii=True, allow_nan=False, separators=(",", ":")
        ).encode("ascii")


def brief(value: Any, limit: int = 60) -> str:
    """A short description of a client's value for an error message (never recursive)."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, int):
        text = str(value) if value.bit_length() < 200 else f"an integer of {len(str(value))} digits"
    elif isinstance(value, float):
        text = repr(value)
    elif isinstance(value, str):
        text = repr(value[:limit]) + ("..." if len(value) > limit else "")
    elif isinstance(value, list):
        text = f"a list of {len(value)} item{'s' * (len(value) != 1)}"
    elif isinstance(value, dict):
        text = f"an object with {len(value)} key{'s' * (len(value) != 1)}"
    else:
        text = f"a {type(value).__name__}"
    return text if len(text) <= 2 * limit else text[: 2 * limit] + "..."


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    return {int: "integer", float: "number", str: "string", list: "list", dict: "object"}.get(
        type(value), type(value).__name__
    )


def _fail(message: str) -> PydanticCustomError:
    """A validation error with exactly this message (no template expansion of its text)."""
    return PydanticCustomError("request", "{message}", {"message": message})


# ---------------------------------------------------------------------------- JSON body
def decode_json_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 (never a 500: deep nesting, bad UTF-8,
    integers beyond Python's digit limit and non-objects are all the client's problem)."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise ApiError(400, "request body is nested too deeply", code="invalid_json") from None
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        raise ApiError(
            400, f"request body is not valid JSON: {str(err)[:200]}", code="invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise ApiError(400, f"request body must be a JSON object, got a {_json_type(body)}")
    return body


# ---------------------------------------------------------------------------- requests
@dataclass(frozen=True)
class RequestContext:
    """What validation needs to know about the server (passed as pydantic's context)."""

    vocab_size: int
    limits: ServeLimits


def _ctx(info: ValidationInfo) -> RequestContext:
    ctx = info.context
    if not isinstance(ctx, RequestContext):
        raise TypeError("validate requests with parse_completion_request (it needs a context)")
    return ctx


def _has_lone_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


class RelayOptions(BaseModel):
    """Per-request relay options (relay-mode servers only). ``null`` / absent: the server's
    value. The budgets are ceilings set by the operator: a request may lower them only."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    mode: str | None = None
    router_p: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False)
    max_calls: int | None = Field(None, ge=0, le=MAX_INT64)
    max_teacher_tokens: int | None = Field(None, ge=0, le=MAX_INT64)
    max_call_tokens: int | None = Field(None, ge=1, le=MAX_INT64)
    max_turns: int | None = Field(None, ge=1, le=MAX_INT64)
    fixed_n: int | None = Field(None, ge=1, le=MAX_TOP_K)
    # a default, not a ceiling: added to the student's <call> logit (RelayConfig.call_bias);
    # finite or +-inf, never NaN
    call_bias: float | None = Field(None, allow_inf_nan=True)

    @field_validator("call_bias", mode="after")
    @classmethod
    def _check_call_bias(cls, value: float | None) -> float | None:
        if value is not None and math.isnan(value):
            raise _fail("'relay.call_bias' must be a number, Infinity or -Infinity, got NaN")
        return value

    def is_empty(self) -> bool:
        return all(getattr(self, name) is None for name in type(self).model_fields)


# OpenAI fields this server does not implement, accepted only at the value meaning "off".
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "stream": (None, False),
    "n": (None, 1),
    "best_of": (None, 1),
    "echo": (None, False),
    "logprobs": (None, 0, False),
    "suffix": (None, ""),
    "stop": (None, [], ""),
    "presence_penalty": (None, 0.0),
    "frequency_penalty": (None, 0.0),
}


def _is_neutral(value: Any, neutrals: tuple[Any, ...]) -> bool:
    # by type as well as value: True == 1 and 0.0 == 0 in Python, not here
    return any(
        type(value) is type(n) or (isinstance(n, float) and type(value) is int)
        for n in neutrals
        if value == n
    )


class CompletionRequest(BaseModel):
    """A ``/v1/completions`` request body. Validate with :func:`parse_completion_request`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    # a string, a list of token ids, or a list of strings / token-id lists; normalised by the
    # validator to a non-empty list of (str | list[int])
    prompt: Any
    max_tokens: int | None = Field(None, ge=1, le=MAX_INT64)
    temperature: float | None = Field(None, allow_inf_nan=False)
    top_p: float | None = Field(None, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=-1, le=MAX_TOP_K)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    return_token_ids: bool | None = None
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    # token id (a decimal string) -> bias in [-100, 100]; see the module docstring
    logit_bias: dict[str, Any] | None = Field(None, max_length=MAX_LOGIT_BIAS_ENTRIES)
    relay: RelayOptions | None = None
    user: str | None = None  # OpenAI's end-user id: accepted and ignored
    # OpenAI fields accepted only when "off" (see _NEUTRAL)
    stream: bool | None = None
    n: int | None = None
    best_of: int | None = None
    echo: bool | None = None
    logprobs: Any = None
    suffix: str | None = None
    stop: Any = None
    presence_penalty: float | None = Field(None, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, allow_inf_nan=False)

    @field_validator("prompt", mode="after")
    @classmethod
    def _check_prompt(cls, raw: Any, info: ValidationInfo) -> list[str | list[int]]:
        ctx = _ctx(info)
        if raw is None:
            raise _fail("missing required field 'prompt'")
        shape = (
            "'prompt' must be a string, a list of token ids, or a list of strings / "
            f"token-id lists; got {brief(raw)}"
        )
        if isinstance(raw, str) or (isinstance(raw, list) and raw and type(raw[0]) is int):
            items: list[Any] = [raw]
        elif isinstance(raw, list) and raw:
            items = raw
        elif isinstance(raw, list):
            raise _fail("'prompt' is an empty list")
        else:
            raise _fail(shape)
        if len(items) > ctx.limits.max_prompts:
            raise _fail(
                f"{len(items)} prompts in one request; the limit is {ctx.limits.max_prompts}"
            )
        for k, item in enumerate(items):
            where = "'prompt'" if len(items) == 1 else f"'prompt[{k}]'"
            if isinstance(item, str):
                if not item:
                    raise _fail(f"{where} is empty (it needs at least one token)")
                if _has_lone_surrogate(item):
                    raise _fail(f"{where} is not valid Unicode (it has a lone surrogate)")
            elif isinstance(item, list):
                if not item:
                    raise _fail(f"{where} is empty (it needs at least one token)")
                for j, t in enumerate(item):
                    if type(t) is not int:
                        raise _fail(f"{shape} ({where} item {j} is {brief(t)})")
                    if not 0 <= t < ctx.vocab_size:
                        raise _fail(
                            f"token id {brief(t)} in {where} is outside the vocabulary "
                            f"[0, {ctx.vocab_size})"
                        )
            else:
                raise _fail(shape)
        return items

    @field_validator("max_tokens", mode="after")
    @classmethod
    def _check_max_tokens(cls, value: int | None, info: ValidationInfo) -> int | None:
        cap = _ctx(info).limits.max_tokens
        if value is not None and value > cap:
            raise _fail(f"'max_tokens' {brief(value)} is over this server's cap of {cap}")
        return value

    @field_validator("temperature", mode="after")
    @classmethod
    def _check_temperature(cls, value: float | None) -> float | None:
        if value is not None and not (value == 0 or MIN_TEMPERATURE <= value <= MAX_TEMPERATURE):
            raise _fail(
                f"'temperature' must be in [0, {MAX_TEMPERATURE:g}] (0 is greedy; a positive "
                f"one at least {MIN_TEMPERATURE:g}), got {brief(value)}"
            )
        return value

    @field_validator("top_p", mode="after")
    @classmethod
    def _check_top_p(cls, value: float | None) -> float | None:
        if value is not None and not MIN_TOP_P <= value <= 1:
            raise _fail(f"'top_p' must be in [{MIN_TOP_P:g}, 1], got {brief(value)}")
        return value

    @field_validator("stop_token_ids", mode="after")
    @classmethod
    def _check_stop_ids(cls, value: list[int] | None, info: ValidationInfo) -> list[int] | None:
        vocab = _ctx(info).vocab_size
        for j, t in enumerate(value or ()):
            if not 0 <= t < vocab:
                raise _fail(
                    f"'stop_token_ids[{j}]' {brief(t)} is outside the vocabulary [0, {vocab})"
                )
        return value

    @field_validator("logit_bias", mode="after")
    @classmethod
    def _check_logit_bias(
        cls, value: dict[str, Any] | None, info: ValidationInfo
    ) -> dict[str, Any] | None:
        vocab = _ctx(info).vocab_size
        for key, bias in (value or {}).items():
            if not (key.isascii() and key.isdigit() and len(key) <= 12):
                raise _fail(f"'logit_bias' keys are token ids (decimal strings), got {brief(key)}")
            if int(key) >= vocab:
                raise _fail(f"'logit_bias' token id {key} is outside the vocabulary [0, {vocab})")
            number = type(bias) is int or (type(bias) is float and math.isfinite(bias))
            if not number or abs(bias) > MAX_LOGIT_BIAS:
                raise _fail(
                    f"'logit_bias' of token {key} must be a number in [-100, 100], "
                    f"got {brief(bias)}"
                )
        return value

    def token_logit_bias(self) -> dict[int, float] | None:
        """``logit_bias`` with integer keys and float values (validated); None when empty."""
        if not self.logit_bias:
            return None
        return {int(k): float(v) for k, v in self.logit_bias.items()}

    @field_validator(*_NEUTRAL, mode="after")
    @classmethod
    def _check_unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        name = info.field_name
        assert name is not None
        neutrals = _NEUTRAL[name]
        if not _is_neutral(value, neutrals):
            allowed = " or ".join(json.dumps(n) for n in neutrals)
            raise _fail(
                f"'{name}' is not supported by this server (only {allowed}), got {brief(value)}"
            )
        return value

    def prompt_items(self) -> list[str | list[int]]:
        return self.prompt  # type: ignore[no-any-return]


_REQUEST_FIELDS = tuple(CompletionRequest.model_fields)
_RELAY_FIELDS = tuple(RelayOptions.model_fields)


def _where(loc: tuple[int | str, ...]) -> tuple[str, str]:
    """(param, display name) of an error location: ``relay.max_calls``, ``stop_token_ids[3]``."""
    if not loc:
        return "", "request"
    param = str(loc[0])
    rest = list(loc[1:])
    if param == "relay" and rest and rest[0] in _RELAY_FIELDS:
        param = f"relay.{rest.pop(0)}"
    shown = param + "".join(f"[{p}]" if isinstance(p, int) else f"[{p!r}]" for p in rest)
    return param, shown


def _message(err: dict[str, Any]) -> str:
    kind, value = err["type"], err.get("input")
    ctx = err.get("ctx") or {}
    _, name = _where(tuple(err["loc"]))
    got = f"got {brief(value)}"
    if kind == "request":  # our own validators: the message is complete
        return str(ctx.get("message", err["msg"]))
    if kind == "missing":
        return f"missing required field '{name}'"
    if kind == "extra_forbidden":
        if name.startswith("relay."):
            option = name[len("relay.") :]
            return f"unknown relay option '{option}'; allowed: {', '.join(_RELAY_FIELDS)}"
        return f"unrecognized request argument supplied: '{name}'"
    if kind == "int_type" or kind.startswith("int_"):
        return f"'{name}' must be an integer, {got}"
    if kind == "float_type" and type(value) is int:
        return f"'{name}' is out of range, {got}"
    if kind in ("float_type", "float_parsing"):
        return f"'{name}' must be a number, {got}"
    if kind == "finite_number":
        return f"'{name}' must be a finite number, {got}"
    if kind == "bool_type":
        return f"'{name}' must be a boolean, {got}"
    if kind == "string_type":
        return f"'{name}' must be a string, {got}"
    if kind == "list_type":
        return f"'{name}' must be a list, {got}"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"'{name}' must be an object, {got}"
    bounds = {
        "greater_than_equal": (">=", "ge"),
        "greater_than": (">", "gt"),
        "less_than_equal": ("<=", "le"),
        "less_than": ("<", "lt"),
    }
    if kind in bounds:
        op, key = bounds[kind]
        return f"'{name}' must be {op} {ctx.get(key)}, {got}"
    if kind == "too_long":
        return f"'{name}' has {ctx.get('actual_length')} items; at most {ctx.get('max_length')}"
    return f"'{name}': {err['msg']}, {got}"


def validation_error(err: ValidationError) -> ApiError:
    """The first problem of a failed validation as a 400 naming the field and the value."""
    errors = err.errors(include_url=False)
    first = errors[0]
    param, _ = _where(tuple(first["loc"]))
    message = _message(first)
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' * (len(errors) > 2)})"
    code = "unrecognized_argument" if first["type"] == "extra_forbidden" else None
    return ApiError(400, message, param=param or None, code=code)


def parse_completion_request(body: dict[str, Any], context: RequestContext) -> CompletionRequest:
    """Validate a decoded body; every problem is an :class:`ApiError` (400)."""
    try:
        return CompletionRequest.model_validate(body, context=context)
    except ValidationError as err:
        raise validation_error(err) from None
    except RecursionError:  # pydantic-core guards itself; this is a last resort
        raise ApiError(400, "request body is nested too deeply") from None


# ---------------------------------------------------------------------------- responses
class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(_Out):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Out):
    error: ErrorDetail


class CompletionChoice(_Out):
    index: int
    text: str
    logprobs: None = None
    finish_reason: str
    # vLLM's: the stop token id that ended the choice (kept as the last of token_ids); None
    # for EOS, a length cut, or relay mode
    stop_reason: int | None = None
    token_ids: list[int]  # generated ids (vLLM's return_token_ids)
    relay: dict[str, Any] | None = None  # relay mode: provenance of the tokens


class PromptTokensDetails(_Out):
    cached_tokens: int = 0


class CompletionUsage(_Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class CompletionResponse(_Out):
    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage

    def to_json(self) -> dict[str, Any]:
        data = self.model_dump()
        for choice in data["choices"]:
            if choice["relay"] is None:
                del choice["relay"]
        return data


class ModelCard(_Out):
    id: str
    object: str = "model"
    created: int
    owned_by: str = "relaypipe"
    # relay mode: the caps and prompt format the server decodes under, and where they came
    # from (the student's relay.json or the flags); left out of the JSON in model mode
    relay: dict[str, Any] | None = None


class ModelList(_Out):
    object: str = "list"
    data: list[ModelCard]
