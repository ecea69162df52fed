"""Publish a stage's outputs together: every one of them, or none.

A stage that writes several outputs (a model folder, tables, a metrics file) must not leave a
new model beside stale metrics when it fails half-way, nor a new table beside the previous
run's metrics. :func:`together` gives the stage a :class:`Publication`: each output is first
written to a hidden staging folder beside its final path (``.<name>.publish-XXXXXXXX/<name>``,
so the final rename stays on one filesystem and the staged file keeps its real name and
suffix), and only when the whole ``with`` block has succeeded are they all renamed into place.
If the block raises, every staged output is deleted and every previous output is left
byte-identical, as are the folders around them (folders created only to hold staging are
removed again).

    with together() as pub:
        model.save_pretrained(pub.directory("data/models/warmup"))  # a staged, empty folder
        metrics = check(pub.staged("data/models/warmup"))  # read back what is staged
        pub.json("data/sft/metrics.json", metrics)
    # here both are in place

The renames at the end run in order; should one fail (which takes a broken filesystem), those
already done are undone and the previous outputs moved back before the error propagates. Built
on :mod:`relaypipe.io`: tables and JSON are written with its validating, atomic writers (inside
the staging folder), with the same bytes a direct write would give.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from relaypipe.io import write_json, write_table

__all__ = ["STAGED_MODEL_ENV", "Publication", "staged_by_launcher", "staged_for_launch", "together"]


@dataclass
class _Item:
    target: Path  # the final path
    holder: Path  # the hidden staging folder beside it
    staged: Path  # holder / target.name: what the stage writes
    previous: Path  # holder / ".previous": where the old output waits during the renames


def _fsync(path: Path) -> None:
    with contextlib.suppress(OSError):  # best effort: not every filesystem allows it
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


class Publication:
    """The outputs a stage is staging; see :func:`together`."""

    def __init__(self) -> None:
        self._items: dict[Path, _Item] = {}
        self._made: list[Path] = []  # folders created for staging, outermost first
        self.committed = False

    # -- staging -------------------------------------------------------------------------------

    def _stage(self, target: str | os.PathLike[str]) -> _Item:
        path = Path(target)
        key = Path(os.path.abspath(path))
        if key in self._items:
            raise ValueError(f"{path}: staged twice in one publication")
        missing = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
        for folder in reversed(missing):
            folder.mkdir(exist_ok=True)
            self._made.append(folder)
        holder = Path(tempfile.mkdtemp(prefix=f".{path.name}.publish-", dir=path.parent))
        item = _Item(path, holder, holder / path.name, holder / ".previous")
        self._items[key] = item
        return item

    def path(self, target: str | os.PathLike[str]) -> Path:
        """Where to write the file that becomes ``target`` (not created: the caller writes it)."""
        return self._stage(target).staged

    def directory(self, target: str | os.PathLike[str]) -> Path:
        """An empty staged folder that becomes ``target`` (e.g. for ``save_pretrained``)."""
        staged = self._stage(target).staged
        staged.mkdir()
        return staged

    def staged(self, target: str | os.PathLike[str]) -> Path:
        """The staged path of an output already staged (to read it back before publishing)."""
        return self._items[Path(os.path.abspath(target))].staged

    def table(self, df: pd.DataFrame, target: str | os.PathLike[str], schema: Any) -> None:
        """``relaypipe.io.write_table`` into staging: validated first, same bytes."""
        write_table(df, self.path(target), schema)

    def json(self, target: str | os.PathLike[str], obj: Any) -> None:
        """``relaypipe.io.write_json`` into staging (sorted keys, no NaN)."""
        write_json(self.path(target), obj)

    def text(self, target: str | os.PathLike[str], text: str) -> None:
        self.path(target).write_text(text, encoding="utf-8")

    def bytes(self, target: str | os.PathLike[str], data: bytes) -> None:
        self.path(target).write_bytes(data)

    # -- publishing ----------------------------------------------------------------------------

    def _commit(self) -> None:
        items = list(self._items.values())
        for item in items:
            if not os.path.lexists(item.staged):
                raise FileNotFoundError(
                    f"{item.target}: staged for publishing but nothing was written to "
                    f"{item.staged}; no output was published"
                )
            if item.staged.is_file():
                _fsync(item.staged)
        moved_aside: list[_Item] = []
        placed: list[_Item] = []
        try:
            for item in items:
                if os.path.lexists(item.target):
                    # rename(2) cannot replace a non-empty folder: move the old one aside first
                    # (kept until every output is in place, to move back on failure)
                    os.replace(item.target, item.previous)
                    moved_aside.append(item)
                os.replace(item.staged, item.target)
                placed.append(item)
        except BaseException:
            for item in reversed(placed):
                with contextlib.suppress(OSError):
                    os.replace(item.target, item.staged)
            for item in reversed(moved_aside):
                with contextlib.suppress(OSError):
                    os.replace(item.previous, item.target)
            raise
        self.committed = True
        for parent in {item.target.parent for item in items}:
            _fsync(parent)

    def _clean(self) -> None:
        for item in self._items.values():
            _remove(item.holder)  # the staged outputs (failure) or the previous ones (success)
        if not self.committed:
            for folder in reversed(self._made):  # innermost first; only if still empty
                with contextlib.suppress(OSError):
                    folder.rmdir()


@contextlib.contextmanager
def together() -> Iterator[Publication]:
    """Stage outputs in the block; rename them all into place once it has succeeded.

    On any exception (Ctrl-C included) nothing is published: the staged outputs are deleted
    and every previous output, and the folders around it, stay exactly as they were.
    """
    pub = Publication()
    try:
        yield pub
        pub._commit()
    finally:
        pub._clean()


# A training stage that trains in several processes (``num_processes > 1``) has its main
# launched process save the model: this variable tells it the staged folder to save into.
STAGED_MODEL_ENV = "RELAYPIPE_STAGED_MODEL"


@contextlib.contextmanager
def staged_for_launch(path: str | os.PathLike[str]) -> Iterator[None]:
    """Export ``path`` as :data:`STAGED_MODEL_ENV` for processes started in the block."""
    old = os.environ.get(STAGED_MODEL_ENV)
    os.environ[STAGED_MODEL_ENV] = os.fspath(path)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(STAGED_MODEL_ENV, None)
        else:
            os.environ[STAGED_MODEL_ENV] = old


def staged_by_launcher() -> Path | None:
    """In a launched training process: the staged folder to save the model into, if any."""
    value = os.environ.get(STAGED_MODEL_ENV)
    return Path(value) if value else None
