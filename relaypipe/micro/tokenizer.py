"""A character-level tokenizer for the micro models, saved like any Hugging Face tokenizer.

Every printable ASCII character is one token, so digits, and thus the ``n`` of a call
command, are single tokens. ``<call>`` and ``</call>`` are added special tokens from the
start: the student can learn to emit them and the relay decoder can stop on ``</call>``.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from relaypipe.relay.grammar import CALL_CLOSE, CALL_OPEN

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, CALL_OPEN, CALL_CLOSE]
CHARSET = string.digits + string.ascii_letters + string.punctuation + " \n"


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in CHARSET:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # One token per character; Fuse joins them back without separators when decoding.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        additional_special_tokens=[CALL_OPEN, CALL_CLOSE],
        clean_up_tokenization_spaces=False,
    )
    fast.padding_side = "left"
    return fast
