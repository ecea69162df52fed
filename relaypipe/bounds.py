"""The relay bounds, and what a trained model remembers of how it was trained (``relay.json``).

:class:`RelayBounds` is the one description of how far a relay decode may go: the most tokens
one call is granted, the per-request teacher-token and call budgets, the student's rounds. The
stages name it as a nested section (``grpo.bounds``, ``evaluate.bounds``) and turn it into
:class:`~relaypipe.relay.decoder.RelayConfig` arguments with :meth:`RelayBounds.relay_kwargs`.

A student is trained under some bounds and prompt format, and decoding it under others measures
something else. So the training stages write ``relay.json`` beside the weights
(:func:`write_relay_record`, into the folder that is published with the model):

* grpo (``data/models/relay``): its ``bounds``, its prompt format (``chat_template``,
  ``chat_template_kwargs``, and for the record the plain template and the chat instruction of
  :mod:`relaypipe.tasks.base`) and its ``max_new_tokens``;
* sft (``data/models/warmup``): its prompt format; ``bounds`` null (SFT trains under none).

Who reads it (:func:`read_relay_record`): ``relaypipe decode``, ``relaypipe serve`` and
``relaypipe bench`` default to the student folder's recorded bounds and prompt format (a flag
overrides each one; a folder without the file keeps the commands' own defaults,
:data:`DECODER_DEFAULTS`), and the evaluate stage with ``bounds: null`` / ``chat_template: null``
decodes under the relay model's record (and says which bounds it used in ``models.json``).

The call bias (``RelayConfig.call_bias``) is picked the same way: ``--call-bias``, else the
student folder's ``call_bias.json`` (written by ``relaypipe calibrate``), else 0; that part
lives in :func:`relaypipe.calibrate.resolve_command` (the stages that import this module have no
use for it), and ``CommandDecoding`` carries the result and its note says which.

This module imports only the standard library and light relaypipe modules: the command line's
``--help`` imports it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from relaypipe.cli_args import int_at_least
from relaypipe.tasks.base import CHAT_INSTRUCTION, PROMPT_TEMPLATE, check_prompt_options

log = logging.getLogger(__name__)

__all__ = [
    "BOUND_NAMES",
    "DECODER_DEFAULTS",
    "MOVED_BOUNDS",
    "RELAY_RECORD",
    "TRAINING_RECORD",
    "UNBOUNDED",
    "PromptFormat",
    "RelayBounds",
    "RelayRecord",
    "add_call_bias_argument",
    "bias_json",
    "budget_arg",
    "call_bias_arg",
    "format_bias",
    "join_negative_values",
    "pick_bounds",
    "pick_prompt",
    "positive_arg",
    "read_relay_record",
    "write_relay_record",
]

RELAY_RECORD = "relay.json"  # beside the weights of a model a training stage wrote
TRAINING_RECORD = "training.json"  # beside them too: that stage's metrics (and warnings)
RECORD_VERSION = 1
BOUND_NAMES = ("max_call_tokens", "max_teacher_tokens", "max_calls", "max_turns")
# the stages' old key for the bounds section (relaypipe.config names the new one in its error)
MOVED_BOUNDS = {"relay": "bounds"}


# Decoder modes that are baselines for the relay, decoded without its per-request teacher
# budgets (RelayBounds.relay_kwargs).
UNBUDGETED = frozenset({"teacher", "random_router"})


@dataclass(frozen=True)
class RelayBounds:
    """How far one relay decode may go; the bounds a student is trained and decoded under."""

    max_call_tokens: int = 16  # the most tokens one call is granted (a larger n is clipped)
    max_teacher_tokens: int | None = None  # teacher tokens per request (None: unbounded)
    max_calls: int | None = None  # calls (hand-offs) per request (None: unbounded)
    max_turns: int = 16  # student rounds per request

    def __post_init__(self) -> None:
        for name in ("max_call_tokens", "max_turns"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_teacher_tokens", "max_calls"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0 or null (unbounded), got {value}")

    def relay_kwargs(self, mode: str | None = None) -> dict[str, int | None]:
        """The :class:`~relaypipe.relay.decoder.RelayConfig` arguments these bounds set.

        With a decoder ``mode`` among :data:`UNBUDGETED` (the teacher alone, the random
        router: baselines), without the per-request teacher budgets, which are the relay's:
        the decoder enforces them in every mode, and the teacher alone would otherwise stop
        after the relay's budget.
        """
        kwargs = {name: getattr(self, name) for name in BOUND_NAMES}
        if mode in UNBUDGETED:
            kwargs.update(max_teacher_tokens=None, max_calls=None)
        return kwargs

    def describe(self) -> str:
        """``max_call_tokens 8, max_teacher_tokens 12, max_calls none, max_turns 16``."""
        return ", ".join(
            f"{name} {'none' if value is None else value}"
            for name, value in self.relay_kwargs().items()
        )


# The decoder's own defaults (RelayConfig's; tests/test_bounds.py checks that they agree): what
# the commands decode under when neither a flag nor the student's relay.json says otherwise.
DECODER_DEFAULTS = RelayBounds(
    max_call_tokens=64, max_teacher_tokens=None, max_calls=None, max_turns=32
)


@dataclass(frozen=True)
class PromptFormat:
    """How a question becomes the prompt (:func:`relaypipe.tasks.base.format_prompt`)."""

    chat_template: bool = False  # the tokenizer's chat template (else the plain template)
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    # for the record: the texts format_prompt used when the model was trained
    template: str = PROMPT_TEMPLATE
    chat_instruction: str = CHAT_INSTRUCTION

    def __post_init__(self) -> None:
        check_prompt_options(self.chat_template, self.chat_template_kwargs)

    def format_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``format_prompt`` (and of the stages' decode helpers)."""
        return {
            "chat_template": self.chat_template,
            "chat_template_kwargs": dict(self.chat_template_kwargs),
        }

    def describe(self) -> str:
        if not self.chat_template:
            return f"plain {self.template!r}"
        kwargs = self.chat_template_kwargs
        kwargs = f" with {json.dumps(kwargs, sort_keys=True)}" if kwargs else ""
        return f"the tokenizer's chat template{kwargs}"

    def differs_from_code(self) -> list[str]:
        """Which recorded texts this code's format_prompt no longer uses (empty: none)."""
        out = []
        if self.template != PROMPT_TEMPLATE:
            out.append(f"plain template {self.template!r} (now {PROMPT_TEMPLATE!r})")
        if self.chat_template and self.chat_instruction != CHAT_INSTRUCTION:
            out.append(f"chat instruction {self.chat_instruction!r} (now {CHAT_INSTRUCTION!r})")
        return out


@dataclass(frozen=True)
class RelayRecord:
    """``relay.json``: how the model in its folder was trained."""

    stage: str  # the stage that trained it: grpo | sft
    prompt: PromptFormat
    bounds: RelayBounds | None = None  # None: trained under no relay bounds (sft)
    max_new_tokens: int | None = None  # tokens per request in training (for the record)
    version: int = RECORD_VERSION

    KNOWN_STAGES: ClassVar[tuple[str, ...]] = ("grpo", "sft")

    def __post_init__(self) -> None:
        if self.stage not in self.KNOWN_STAGES:
            raise ValueError(f"stage must be one of {', '.join(self.KNOWN_STAGES)}")
        if self.version != RECORD_VERSION:
            raise ValueError(
                f"version {self.version} is not this code's {RECORD_VERSION}: re-run the stage"
            )


def write_relay_record(folder: str | Path, record: RelayRecord) -> Path:
    """Write ``folder/relay.json`` (the staged model folder, published with the model)."""
    from relaypipe.io import write_json  # numpy and pandas: only when a stage writes

    path = Path(folder) / RELAY_RECORD
    write_json(path, dataclasses.asdict(record))
    return path


def read_relay_record(folder: str | Path | None) -> RelayRecord | None:
    """The record in ``folder`` (None when the folder has no ``relay.json``: a model no stage
    trained, or one trained before the file existed). A malformed file fails, naming it and
    the key (a :class:`~relaypipe.config.ConfigError`: a line or two on the command line)."""
    from relaypipe.config import ConfigError, build

    if folder is None:
        return None
    path = Path(folder) / RELAY_RECORD
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(
            f"{path}: not readable JSON ({err}); re-run the stage that wrote it"
        ) from err
    record = build(RelayRecord, data, str(path))
    stale = record.prompt.differs_from_code()
    if stale:
        log.warning(
            "%s: the model was trained with a prompt this code no longer writes: %s",
            path,
            "; ".join(stale),
        )
    return record


# ------------------------------------------------------------------------ command lines
UNBOUNDED = "none"  # a budget flag's value for "no budget" (absent: the recorded one)


positive_arg = int_at_least(1)  # argparse type: an integer >= 1


def budget_arg(text: str) -> int | str:
    """argparse type: an integer >= 0, or ``none`` (unbounded)."""
    if text.strip().lower() == UNBOUNDED:
        return UNBOUNDED
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer or {UNBOUNDED!r}: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 or {UNBOUNDED!r}, got {value}")
    return value


budget_arg.__name__ = f"integer >= 0 or {UNBOUNDED!r}"


CALIBRATION_FILE = "call_bias.json"  # relaypipe.calibrate.CALIBRATION_FILE (for help texts)


def call_bias_arg(text: str) -> float:
    """argparse type: a number, ``inf`` or ``-inf`` (never NaN): a call bias."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number, inf or -inf: {text!r}") from None
    if math.isnan(value):
        raise argparse.ArgumentTypeError("NaN is no call bias: give a number, inf or -inf")
    return value


call_bias_arg.__name__ = "number, inf or -inf"

# a value argparse would take for an option ("-inf", "-1e3"); see join_negative_values
_NEGATIVE_VALUE = re.compile(r"-(inf(inity)?|(\d+\.?\d*|\.\d+)(e[+-]?\d+)?)", re.IGNORECASE)


def join_negative_values(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    """``--call-bias -inf`` as ``--call-bias=-inf``: argparse reads a value that starts with a
    dash and is not a plain negative number (``-inf``, ``-1e3``) as an option and refuses it."""
    out: list[str] = []
    k = 0
    while k < len(argv):
        arg = argv[k]
        if arg in flags and k + 1 < len(argv) and _NEGATIVE_VALUE.fullmatch(argv[k + 1]):
            out.append(f"{arg}={argv[k + 1]}")
            k += 2
            continue
        out.append(arg)
        k += 1
    return out


def format_bias(value: float) -> str:
    """``+1.25``, ``0``, ``-inf``: a call bias for a note."""
    if value == 0:
        return "0"
    if math.isinf(value):
        return "+inf" if value > 0 else "-inf"
    return f"{value:+.4g}"


def bias_json(value: float) -> float | str:
    """A call bias for JSON (which has no infinity): the number, or ``"inf"`` / ``"-inf"``."""
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return float(value)


def add_call_bias_argument(group: Any, *, server: bool = False) -> None:
    """``--call-bias``: absent, the student's call_bias.json (else 0); see
    :func:`relaypipe.calibrate.resolve_command`. ``server``: worded as a server default a
    request may change."""
    what = (
        "the call bias of requests that name none (a request's relay.call_bias overrides it)"
        if server
        else "added to the student's <call> logit where it could call (relay and fixed_help "
        "modes): > 0 calls more, < 0 less, -inf never"
    )
    group.add_argument(
        "--call-bias",
        type=call_bias_arg,
        default=None,
        metavar="X",
        help=f"{what}; a number, inf or -inf (default: the student's {CALIBRATION_FILE}, written "
        "by 'relaypipe calibrate', else 0)",
    )


def bound_help(name: str, what: str) -> str:
    """Help text of a bound flag: its default is the recorded value, else the decoder's."""
    fallback = getattr(DECODER_DEFAULTS, name)
    fallback = UNBOUNDED if fallback is None else fallback
    extra = f"; {UNBOUNDED}: unbounded" if name in ("max_teacher_tokens", "max_calls") else ""
    return f"{what}{extra} (default: the student's {RELAY_RECORD}, else {fallback})"


def pick_bounds(
    record: RelayRecord | None,
    given: dict[str, int | str | None],
    fallback: RelayBounds = DECODER_DEFAULTS,
) -> tuple[RelayBounds, str]:
    """The bounds a command decodes under, and where they came from (for a note).

    ``given``: the flags (None: not given; :data:`UNBOUNDED`: no budget); each one given
    overrides the recorded value, which in turn overrides ``fallback``."""
    recorded = record.bounds if record is not None else None
    base = recorded or fallback
    flags = {k: (None if v == UNBOUNDED else v) for k, v in given.items() if v is not None}
    unknown = set(flags) - set(BOUND_NAMES)
    if unknown:
        raise ValueError(f"not relay bounds: {', '.join(sorted(unknown))}")
    bounds = dataclasses.replace(base, **flags)
    source = RELAY_RECORD if recorded is not None else "defaults"
    if flags:
        source += f", overridden by --{', --'.join(n.replace('_', '-') for n in sorted(flags))}"
    return bounds, source


def pick_prompt(
    record: RelayRecord | None,
    chat_template: bool | None,
    chat_template_kwargs: dict[str, Any] | None,
) -> tuple[PromptFormat, str]:
    """The prompt format a command frames questions with, and where it came from.

    ``chat_template`` / ``chat_template_kwargs``: the flags (None: not given). Not given, the
    record's; given, they override it (``chat_template`` alone keeps the recorded kwargs when
    the record used the chat template too)."""
    base = record.prompt if record is not None else PromptFormat()
    if chat_template is None and chat_template_kwargs is None:
        return base, RELAY_RECORD if record is not None else "defaults"
    use_chat = base.chat_template if chat_template is None else chat_template
    if chat_template_kwargs is not None:
        kwargs = chat_template_kwargs
    else:
        kwargs = dict(base.chat_template_kwargs) if use_chat and base.chat_template else {}
    fmt = PromptFormat(chat_template=use_chat, chat_template_kwargs=kwargs)
    return fmt, "flags" if record is None else f"{RELAY_RECORD}, overridden by flags"


def json_object_arg(text: str) -> dict[str, Any]:
    """argparse type: a JSON object (``{"enable_thinking": false}``)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err}): {text!r}") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"expected a JSON object like '{{\"a\": 1}}', got {text!r}"
        )
    return value


json_object_arg.__name__ = "JSON object"


def add_bound_arguments(group: Any, *, caps: bool = False, int_type: Any = int) -> None:
    """``--max-turns``, ``--max-call-tokens``, ``--max-teacher-tokens``, ``--max-calls``: absent,
    the student's recorded bounds (else :data:`DECODER_DEFAULTS`); see :func:`pick_bounds`.
    ``caps``: worded as a server's ceilings (``relaypipe serve``)."""
    cap = "cap on " if caps else ""
    group.add_argument(
        "--max-turns",
        type=int_type,
        default=None,
        help=bound_help("max_turns", f"{cap}student rounds per prompt"),
    )
    group.add_argument(
        "--max-call-tokens",
        type=int_type,
        default=None,
        help=bound_help("max_call_tokens", f"{cap}tokens one call is granted (larger n: clipped)"),
    )
    group.add_argument(
        "--max-teacher-tokens",
        type=budget_arg,
        default=None,
        metavar="N|none",
        help=bound_help("max_teacher_tokens", f"{cap}teacher tokens per prompt"),
    )
    group.add_argument(
        "--max-calls",
        type=budget_arg,
        default=None,
        metavar="N|none",
        help=bound_help("max_calls", f"{cap}calls per prompt"),
    )


def add_prompt_arguments(group: Any) -> None:
    """``--chat-template/--no-chat-template`` and ``--chat-template-kwargs``: absent, the
    student's recorded prompt format (else the plain template); see :func:`pick_prompt`."""
    group.add_argument(
        "--chat-template",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="frame each question with the student tokenizer's chat template (the stages' "
        "chat_template: true); --no-chat-template: the plain Q:/A: template "
        f"(default: the student's {RELAY_RECORD}, else plain)",
    )
    group.add_argument(
        "--chat-template-kwargs",
        type=json_object_arg,
        default=None,
        metavar="JSON",
        help="variables for the chat template, e.g. '{\"enable_thinking\": false}' for Qwen3 "
        "(the stages' chat_template_kwargs); needs the chat template "
        f"(default: the student's {RELAY_RECORD}, else none)",
    )


@dataclass(frozen=True)
class CommandDecoding:
    """What a command decodes a student under: bounds, prompt format, call bias, and where
    each came from."""

    bounds: RelayBounds
    prompt: PromptFormat
    record: RelayRecord | None
    bounds_from: str
    prompt_from: str
    path: str  # the student's relay.json (whether or not it exists)
    call_bias: float = 0.0
    call_bias_from: str = "default"
    calibration: Any = None  # the student's call_bias.json (a CalibrationResult), if any

    @property
    def worth_a_note(self) -> bool:
        """Whether anything came from the student folder or a call-bias flag (else the
        commands say nothing: the defaults)."""
        return self.record is not None or self.call_bias_from != "default"

    def note(self) -> str:
        """One line for stderr or the log."""
        parts = [
            f"bounds {self.bounds.describe()} ({self.bounds_from})",
            f"prompts framed as {self.prompt.describe()} ({self.prompt_from})",
        ]
        if self.record is not None:
            parts.append(f"recorded in {self.path}")
        source = self.call_bias_from
        if source == "default":
            source = f"default: no {CALIBRATION_FILE}"
        parts.append(f"call bias {format_bias(self.call_bias)} ({source})")
        return "; ".join(parts)

    def bias_json(self) -> dict[str, Any]:
        """The call bias and where it came from, for a JSON record (bench, serve's card)."""
        return {"call_bias": bias_json(self.call_bias), "call_bias_from": self.call_bias_from}


def resolve_for_command(student: str, args: argparse.Namespace) -> CommandDecoding:
    """The bounds and prompt format for a command on ``student``: each flag given, else the
    student folder's relay.json, else the decoder's defaults and the plain template (the call
    bias is 0 here: :func:`relaypipe.calibrate.resolve_command` adds the student's).
    ``ValueError`` for flags that do not fit (a bound out of range, kwargs without the chat
    template)."""
    path = Path(student) / RELAY_RECORD
    record = read_relay_record(student) if Path(student).is_dir() else None
    given = {name: getattr(args, name, None) for name in BOUND_NAMES}
    bounds, bounds_from = pick_bounds(record, given)
    kwargs = getattr(args, "chat_template_kwargs", None)
    try:
        prompt, prompt_from = pick_prompt(record, getattr(args, "chat_template", None), kwargs)
    except ValueError:
        raise ValueError(
            "--chat-template-kwargs needs --chat-template (or a student whose "
            f"{RELAY_RECORD} uses the chat template)"
        ) from None
    if record is not None:
        bounds_from = bounds_from.replace(RELAY_RECORD, "recorded", 1)
        prompt_from = prompt_from.replace(RELAY_RECORD, "recorded", 1)
    return CommandDecoding(bounds, prompt, record, bounds_from, prompt_from, str(path))
