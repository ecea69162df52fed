"""Loading models and tokenizers: a local directory, a hub id, or a GGUF file.

All three go through ``transformers`` so the rest of relaypipe sees ordinary
``PreTrainedModel``/``PreTrainedTokenizerBase`` objects. The call tags are added to any
tokenizer that lacks them (and the embedding matrix grown to match), so a pretrained model
can learn the command in warm-up.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
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
    """Make ``<call>``/``</call>`` single special tokens; returns how many were added."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in (CALL_OPEN, CALL_CLOSE) if t not in vocab]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    if model is not None and model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return len(missing)


def load_tokenizer(source: str, *, gguf_file: str | None = None) -> PreTrainedTokenizerBase:
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
    path = Path(source)
    if gguf_file is None and path.suffix == ".gguf":
        source, gguf_file = str(path.parent), path.name
    elif not path.exists() and (source.startswith((".", "/")) or source.count("/") > 1):
        raise FileNotFoundError(f"model directory {source!r} does not exist")
    kwargs: dict = {"dtype": getattr(torch, dtype)}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    try:
        tok = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as err:
        raise OSError(
            f"could not load model {source!r}{f' (gguf {gguf_file})' if gguf_file else ''}: "
            f"{err}. Without network access use a local directory (e.g. data/models/...)."
        ) from err
    add_call_tokens(tok, model)
    model.to(pick_device(device)).eval()
    return model, tok
