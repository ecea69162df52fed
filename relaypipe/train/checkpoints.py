"""Resumable training: checkpoints outside DVC's outs, keyed by a fingerprint of the run.

DVC deletes a stage's outputs before running it, so checkpoints live in a separate,
git-ignored directory (``data/checkpoints/<stage>``). A checkpoint is reused only when the
fingerprint (params + input hashes) matches the run being started, so changing a knob never
resumes from a stale run; a matching one resumes where a crash or Ctrl-C left it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from dvclive import Live
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

log = logging.getLogger(__name__)
FINGERPRINT = "fingerprint.json"


def file_digest(path: str | Path) -> str:
    """sha256 of a file, or of every file under a directory (names and contents)."""
    h = hashlib.sha256()
    p = Path(path)
    files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    for f in files:
        h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def prepare_checkpoint_dir(directory: str | Path, fingerprint: dict[str, Any]) -> str | None:
    """Make ``directory`` ready for this run; return the checkpoint to resume from, if any."""
    d = Path(directory)
    want = json.dumps(fingerprint, sort_keys=True, default=str)
    marker = d / FINGERPRINT
    if d.exists() and (not marker.exists() or marker.read_text() != want):
        log.info("checkpoints in %s belong to another run; starting fresh", d)
        shutil.rmtree(d)
    d.mkdir(parents=True, exist_ok=True)
    marker.write_text(want)
    last = get_last_checkpoint(str(d))
    if last:
        log.info("resuming from %s", last)
    return last


class LiveCallback(TrainerCallback):
    """Send the trainer's logged scalars to DVCLive, one DVCLive step per logging step."""

    def __init__(self, live: Any):
        self.live = live

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.live.step = state.global_step
        for key, value in (logs or {}).items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                self.live.log_metric(key.replace("/", "_"), float(value))
        self.live.make_summary()


def training_live(out_dir: str, resume: object) -> Live:
    """The DVCLive logger of a training stage's curves (``<out_dir>/live``), continuing the
    curves of the run being resumed; DVC, not DVCLive, records the experiment."""
    return Live(
        dir=str(Path(out_dir) / "live"), resume=bool(resume), save_dvc_exp=False, dvcyaml=None
    )
