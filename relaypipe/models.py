"""Loading models and tokenizers: a local directory, a hub id, or a GGUF file.

All three go through ``transformers`` so the rest of relaypipe sees ordinary
``PreTrainedModel``/``PreTrainedTokenizerBase`` objects. The call tags are added to any
tokenizer that lacks them (and the embedding matrix grown to match), so a pretrained model
can learn the command in warm-up.

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


def pick_device(device: str = "auto") -> torch.device:
    """ "auto" means CUDA when present, else CPU; anything else is passed to torch."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def add_call_tokens(
    tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | None = None
) -> int:
    """Make ``<call>``/``</call>`` single special tokens; returns how many were added.

    With ``model``, its embedding matrix grows to the tokenizer's length. The new rows are set
    to the mean of the existing ones (input and, when untied, output embeddings): an import
    then gives the same weights every time (transformers' default draws them at random), and
    the new tokens start out with an average logit, so an untrained model rarely emits them.
    """
    vocab = tokenizer.get_vocab()
    missing = [t for t in (CALL_OPEN, CALL_CLOSE) if t not in vocab]
    if missing:
        # Extend, not replace, the extra special tokens: replacing would un-flag a chat
        # model's own specials (<|im_start|>, ...) and skip_special_tokens would keep them.
        tokenizer.add_special_tokens(
            {"additional_special_tokens": missing}, replace_extra_special_tokens=False
        )
    if model is not None:
        old = model.get_input_embeddings().num_embeddings
        if old < len(tokenizer):
            _grow_embeddings(model, old, len(tokenizer))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return len(missing)


@torch.no_grad()
def _grow_embeddings(model: PreTrainedModel, old: int, new: int) -> None:
    model.resize_token_embeddings(new, mean_resizing=False)
    inp = model.get_input_embeddings().weight
    inp[old:] = inp[:old].mean(dim=0, keepdim=True)
    out = model.get_output_embeddings()
    if out is not None and out.weight.data_ptr() != inp.data_ptr():  # untied head
        out.weight[old:] = out.weight[:old].mean(dim=0, keepdim=True)
        if getattr(out, "bias", None) is not None:
            out.bias[old:] = out.bias[:old].mean()


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
    dtype: str = "float32",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM and its tokenizer, with the call tags known to both.

    ``source`` is a local directory or a hub id; with ``gguf_file`` it is the directory (or
    hub repo) holding that GGUF file, which is dequantised so the model can be trained and
    saved like any other.
    """
    source, gguf_file = split_gguf(source, gguf_file)
    path = Path(source)
    if not path.exists() and (source.startswith((".", "/")) or source.count("/") > 1):
        raise FileNotFoundError(f"model directory {source!r} does not exist")
    kwargs: dict = {"dtype": getattr(torch, dtype)}
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
    return model, tok
