"""trl trainer configs from a stage's ``trainer:`` section, checked before anything runs.

``sft.trainer`` and ``grpo.trainer`` pass straight through to trl's ``SFTConfig`` /
``GRPOConfig``, so every trl knob is at hand; but a key the installed trl does not know
(``warmup_ratio`` is gone from transformers 5) used to fail only when the stage built its config,
hours into a paper-scale run. So the checks come as early as each can:

* when the params are parsed (the stage's ``__post_init__``), :func:`check_trainer_keys` refuses
  any key that is not a field of the config class, naming ``<stage>.trainer.<key>``;
* the stage builds the whole config with :func:`build_trainer_config` before it loads a model,
  so a bad value (an unknown scheduler, bf16 on a GPU without it) fails in seconds too.

SFT also needs ``max_length`` to fit its table: trl's default (1024 tokens, keep-start
truncation) silently cuts a long warm-up row before its answer and its EOS, so the student
would learn to stop mid-solution. :func:`example_lengths` measures every row as trl will
tokenize it and :func:`fit_max_length` makes ``max_length`` hold the longest, or fails.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from relaypipe.config import ConfigError

# Keys the stage sets itself, and the stage param to set instead.
RESERVED = {"output_dir": "checkpoint_dir"}
# Keys older trl/transformers releases had, and what replaced them (shown in the error).
RENAMED = {
    "warmup_ratio": "warmup_steps (a float below 1 is a ratio of the total steps)",
    "max_seq_length": "max_length",
    "evaluation_strategy": "eval_strategy",
}


def check_trainer_keys(section: Mapping[str, Any], config_cls: type, stage: str) -> None:
    """Every key of ``<stage>.trainer`` must be a field of ``config_cls`` (trl's config class).

    Cheap (no config is built, no device is touched), so the params' ``__post_init__`` calls
    it: a typo or a removed key fails when the params are parsed, not after earlier stages ran.
    """
    fields = {f.name for f in dataclasses.fields(config_cls) if f.init}
    for key in section:
        if key in RESERVED:
            raise ValueError(
                f"{stage}.trainer.{key} is set by the stage from {stage}.{RESERVED[key]}; "
                f"set that instead"
            )
        if key in fields:
            continue
        if key in RENAMED:
            hint = f"; use {RENAMED[key]}"
        else:
            close = difflib.get_close_matches(key, fields, n=3)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise ValueError(
            f"{stage}.trainer.{key} is not a field of {config_cls.__name__} in the installed "
            f"{_version_of(config_cls)}{hint}"
        )


def build_trainer_config(
    config_cls: type,
    section: Mapping[str, Any],
    *,
    stage: str,
    output_dir: str,
    device_type: str,
    defaults: Mapping[str, Any],
    overrides: Mapping[str, Any] | None = None,
) -> Any:
    """``config_cls(output_dir, **defaults, **section, **overrides)``, failing with the stage.

    ``defaults`` are the stage's own (``section`` wins over them); ``overrides`` are values the
    stage worked out and that win over ``section`` (SFT's fitted ``max_length``). On a CPU
    device ``use_cpu`` is forced: a config that asks for a GPU the stage will not use would
    only fail later. Building touches accelerate's process state (a launched process finds
    its rank here), so stages build it before they load a model.
    """
    check_trainer_keys(section, config_cls, stage)
    values = {**defaults, **section, **(overrides or {})}
    if device_type == "cpu":
        values["use_cpu"] = True
    try:
        return config_cls(output_dir=output_dir, **values)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{stage}.trainer: {config_cls.__name__} refused it: {err}") from err


def example_lengths(
    prompts: Sequence[str], completions: Sequence[str], tokenizer: Any
) -> list[int]:
    """Tokens per prompt/completion row exactly as trl's SFTTrainer counts them.

    trl appends the EOS token to a completion that does not end with it, then tokenizes
    ``prompt + completion`` with the tokenizer's defaults (special tokens included): so do we.
    """
    eos = tokenizer.eos_token
    texts = [
        p + c if eos is None or c.endswith(eos) else p + c + eos
        for p, c in zip(prompts, completions, strict=True)
    ]
    return [len(ids) for ids in tokenizer(text=texts)["input_ids"]]


def fit_max_length(section: Mapping[str, Any], lengths: Sequence[int], where: str) -> int | None:
    """The ``max_length`` for SFT on rows of these ``lengths``: never one that truncates a row.

    Unset: the longest row. ``max_length: null``: None (trl then never truncates). An explicit
    value below the longest row fails, naming the key and the row (``where`` names the table).
    """
    if not lengths:
        raise ValueError(f"{where} has no rows to train on")
    longest = max(lengths)
    if "max_length" not in section:
        return longest
    wanted = section["max_length"]
    if wanted is not None and wanted < longest:
        row = lengths.index(longest)
        too_long = sum(n > wanted for n in lengths)
        raise ConfigError(
            f"sft.trainer.max_length is {wanted}, but row {row} of {where} is {longest} tokens "
            f"(prompt + completion + EOS) and {too_long} of {len(lengths)} rows are longer than "
            f"{wanted}: trl would cut them before their answer and EOS. Raise max_length to at "
            f"least {longest}, or leave it unset to fit the data"
        )
    return wanted


def _version_of(config_cls: type) -> str:
    package = config_cls.__module__.split(".")[0]
    try:
        return f"{package} {version(package)}"
    except PackageNotFoundError:
        return package
