"""relaypipe: RelayLLM-style token-level collaborative decoding between two language models."""

__version__ = "0.1.0"
