"""Loading models and tokenizers: a local directory, a hub id, or a GGUF file.

All three go through ``transformers`` so the rest of relaypipe sees ordinary
``PreTrainedModel``/``PreTrainedTokenizerBase`` objects. The call tags are added to any
tokenizer that lacks them (and the embedding matrix grown to match), so a pretrained model
can learn the command in warm-up.

``dtype`` is one per stage (``params.yaml:<stage>.dtype``): ``auto`` keeps the dtype the model
was saved in (its config's ``dtype``), so a bfloat16 student stays bfloat16 from stage to stage
instead of silently doubling to float32; ``float32``/``bfloat16``/``float16`` cast on load.

A GGUF file is always loaded *dequantised* (``GgufConfig(dequantize=True)``): the weights are
unpacked into plain float tensors, so the model trains, saves to safetensors and reloads like
any other. Without it transformers may keep the weights in GGUF blocks (when a matmul kernel
is installed), and such a model can be neither trained nor saved.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from relaypipe.relay.grammar import CALL_CLOSE, CALL_OPEN

log = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "bfloat16", "float16")


def check_dtype(dtype: str) -> str:
    """For a stage's ``__post_init__``: one of :data:`DTYPES`, or an error saying which."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    return dtype


# (trainer flag, its value) -> the weight dtypes it agrees with
_AGREES = {
    ("bf16", True): (torch.bfloat16, torch.float32),
    ("bf16", False): (torch.float32, torch.float16),
    ("fp16", True): (torch.float32,),  # fp16 weights: transformers cannot unscale fp16 grads
    ("fp16", False): (torch.float32, torch.bfloat16, torch.float16),
}


def trainer_precision(model: PreTrainedModel, trainer: dict, section: str) -> dict:
    """``use_cpu``/``bf16``/``fp16`` for trl's ``SFTConfig``/``GRPOConfig`` that agree with
    the model's dtype (the stage's ``dtype``), checked against what ``trainer`` sets.

    By default trl is told bf16 exactly when the weights are bfloat16 (on the CPU too: such a
    model exists only because the stage's dtype asked for it), and never fp16. Set by hand, a
    flag that contradicts the weights is refused: bf16/fp16 autocast over float16/bfloat16
    weights, or ``bf16: false`` over bfloat16 weights, which would train in bfloat16 all the
    same while the record says otherwise. The one mix allowed is the classic mixed precision,
    float32 weights with ``bf16: true`` or ``fp16: true`` (autocast; the optimiser updates
    float32 weights, so small learning rates are not rounded away).
    """
    dtype = next(model.parameters()).dtype
    flags = {
        "use_cpu": model.device.type == "cpu",
        "bf16": dtype == torch.bfloat16,
        "fp16": False,
    }
    name = str(dtype).removeprefix("torch.")
    for flag in ("bf16", "fp16"):
        if flag not in trainer:
            continue
        asked = bool(trainer[flag])
        if dtype not in _AGREES[flag, asked]:
            raise ValueError(
                f"{section}.trainer.{flag}: {str(asked).lower()} contradicts the model's {name} "
                f"weights ({section}.dtype): drop {section}.trainer.{flag} (the default follows "
                f"the weights) or set {section}.dtype: float32 for mixed precision"
            )
        if asked and dtype == torch.float32:
            log.info("%s: mixed precision (float32 weights, %s autocast)", section, flag)
    return flags


def pick_device(device: str = "auto") -> torch.device:
    """ "auto" means CUDA when present, else CPU; anything else is passed to torch."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def add_call_tokens(
    tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | None = None
) -> int:
    """Make ``<call>``/``</call>`` single special tokens; returns how many were added.

    With ``model``, its embedding matrix grows to the tokenizer's length if it is shorter, and
    the rows of the tokens added here (and of any rows the growth created) are set to the mean
    of the rows of the real vocabulary, the tokenizer as it was before (input and, when untied,
    output embeddings). Also when the matrix already had spare rows: Qwen3 has 151,936 rows for
    about 151,669 tokens, so the tags land on padding rows that no training ever touched. An
    import then gives the same weights every time (transformers' default draws them at random),
    and the new tokens start out with an average logit, so an untrained model rarely emits them.
    """
    real = len(tokenizer)  # the vocabulary before the call tags: rows that were trained
    vocab = tokenizer.get_vocab()
    missing = [t for t in (CALL_OPEN, CALL_CLOSE) if t not in vocab]
    if missing:
        # Extend, not replace, the extra special tokens: replacing would un-flag a chat
        # model's own specials (<|im_start|>, ...) and skip_special_tokens would keep them.
        tokenizer.add_special_tokens(
            {"additional_special_tokens": missing}, replace_extra_special_tokens=False
        )
    if model is not None:
        rows = model.get_input_embeddings().num_embeddings
        if rows < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        new = {*range(rows, len(tokenizer)), *tokenizer.convert_tokens_to_ids(missing)}
        if new:
            _mean_rows(model, sorted(new), min(real, rows))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return len(missing)


@torch.no_grad()
def _mean_rows(model: PreTrainedModel, ids: list[int], real: int) -> None:
    """Rows ``ids`` of the embeddings (and of an untied head) := the mean of rows ``:real``,
    computed in float32 (a bfloat16 sum over 150k rows would lose most of its digits)."""
    inp = model.get_input_embeddings().weight
    index = torch.tensor(ids, device=inp.device)
    inp[index] = inp[:real].float().mean(dim=0).to(inp.dtype)
    out = model.get_output_embeddings()
    if out is not None and out.weight.data_ptr() != inp.data_ptr():  # untied head
        out.weight[index] = out.weight[:real].float().mean(dim=0).to(out.weight.dtype)
        if getattr(out, "bias", None) is not None:
            out.bias[index] = out.bias[:real].float().mean().to(out.bias.dtype)


def split_gguf(source: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """``(directory or hub repo, GGUF file name or None)`` for a model source.

    A source ending in ``.gguf`` is a local GGUF file: it must exist (a typo would otherwise
    turn into a hub lookup of its parent directory and a confusing network error).
    """
    path = Path(source)
    if gguf_file is None and path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {source!r} does not exist")
        return str(path.parent), path.name
    return source, gguf_file


def load_tokenizer(source: str, *, gguf_file: str | None = None) -> PreTrainedTokenizerBase:
    """A tokenizer (directory, hub id or GGUF file) with the call tags added."""
    source, gguf_file = split_gguf(source, gguf_file)
    tok = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    add_call_tokens(tok)
    return tok


def load_model(
    source: str,
    *,
    gguf_file: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM and its tokenizer, with the call tags known to both.

    ``source`` is a local directory or a hub id; with ``gguf_file`` it is the directory (or
    hub repo) holding that GGUF file, which is dequantised so the model can be trained and
    saved like any other. ``dtype``: one of :data:`DTYPES` (``auto``: as saved). The model is
    placed on ``device`` once, here, in that dtype.
    """
    check_dtype(dtype)
    source, gguf_file = split_gguf(source, gguf_file)
    path = Path(source)
    if not path.exists() and (source.startswith((".", "/")) or source.count("/") > 1):
        raise FileNotFoundError(f"model directory {source!r} does not exist")
    kwargs: dict = {"dtype": dtype if dtype == "auto" else getattr(torch, dtype)}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
        # Dequantise on load: a model left in GGUF blocks cannot be trained or saved.
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    try:
        tok = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as err:
        raise OSError(
            f"could not load model {source!r}{f' (gguf {gguf_file})' if gguf_file else ''}: "
            f"{str(err).rstrip('. ')}. Without network access use a local directory (e.g. "
            "data/models/...), a .gguf file, or `relaypipe import --smollm2`."
        ) from err
    add_call_tokens(tok, model)
    model.to(pick_device(device)).eval()
    log.info(
        "loaded %s: %s on %s (dtype %s)", source, type(model).__name__, model.device, model.dtype
    )
    return model, tok
