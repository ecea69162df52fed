"""Resumable training: checkpoints outside DVC's outs, keyed by a fingerprint of the run.

DVC deletes a stage's outputs before running it, so checkpoints live in a separate,
git-ignored directory (``data/checkpoints/<stage>``). A checkpoint is reused only when the
fingerprint (params + input hashes) matches the run being started, so changing a knob never
resumes from a stale run; a matching one resumes where a crash or Ctrl-C left it.

Training curves go through transformers' DVCLive callback (:class:`LiveCallback`, on the
trainer's global step) into ``<out_dir>/live``: ``plots/metrics/<name>.tsv`` per logged metric
(trl's ``a/b`` names in subfolders, e.g. ``relay/call_rate.tsv``), ``metrics.json`` (the last
values and the end-of-training summary, e.g. ``train.loss``) and ``params.yaml`` (the
trainer's arguments).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import numbers
import os
import re
import shutil
from pathlib import Path
from typing import Any

from dvclive import Live
from dvclive.plots import Metric
from dvclive.utils import standardize_metric_name
from transformers.integrations import DVCLiveCallback
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


# Keys of the one log the Trainer writes at the end of training (Trainer._finalize_training):
# a summary of the run, not a point of a curve. Those that are not wall-clock go into the
# live summary (metrics.json) only.
TRAINER_SUMMARY = frozenset(
    {
        "train_runtime",
        "train_samples_per_second",
        "train_steps_per_second",
        "train_tokens_per_second",
        "total_flos",
        "train_loss",
        "epoch",
    }
)
# Timings and memory deltas of this particular run (transformers' speed and memory metrics,
# trl's step_time): kept out of every file DVC hashes, so two identical runs give identical
# curves and summaries. The trainer's log_history (in its checkpoints) still has them.
RUN_SPECIFIC = re.compile(r"(?:_runtime|_per_second|step_time)$|_mem_")
# TrainingArguments that say where this run writes, not how it trains: left out of the live
# params so that two identical runs in different directories give identical files.
WHERE_KEYS = frozenset({"output_dir", "logging_dir", "resume_from_checkpoint"})


def _scalar(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def drop_points_after(metrics_dir: str | Path, step: int) -> None:
    """Cut every curve (DVCLive ``.tsv``) under ``metrics_dir`` back to its points at or before
    ``step``: what a crashed run logged after its last checkpoint is logged again on resuming."""
    for path in sorted(Path(metrics_dir).rglob("*.tsv")):
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f, delimiter="\t"))
        if not rows or "step" not in rows[0]:
            continue
        at = rows[0].index("step")
        kept = [rows[0], *(r for r in rows[1:] if len(r) > at and int(r[at]) <= step)]
        if len(kept) < len(rows):
            with open(path, "w", encoding="utf-8", newline="") as f:
                csv.writer(f, delimiter="\t", lineterminator=os.linesep).writerows(kept)


class LiveCallback(DVCLiveCallback):
    """transformers' DVCLive callback, with the curves on the trainer's global step.

    What it changes (transformers' callback does the rest: metric names standardized for
    ``dvclive.huggingface``, ``eval_x`` -> ``eval/x``, the args logged as params, ``live.end()``
    at the end of training):

    * the x axis is ``state.global_step``, not the count of log calls, so that it matches the
      trainer's steps whatever ``logging_steps`` is, and a resumed run continues its curves:
      points a crashed run logged after its last checkpoint are dropped on resuming, as the
      resumed run logs those steps again (no step twice, none restarted from 0);
    * the trainer's end-of-training summary (``train_loss``, ``total_flos``, ``epoch``) goes
      into the live summary (``metrics.json``) only, not as one-point curves;
    * wall-clock and memory metrics (:data:`RUN_SPECIFIC`) and the args that are paths
      (:data:`WHERE_KEYS`) are left out, so two identical runs write identical files;
    * no model is logged (``log_model=False``, whatever ``HF_DVCLIVE_LOG_MODEL`` says): DVC
      records the stage's model as an output.
    """

    def __init__(self, live: Live):
        super().__init__(live=live, log_model=False)

    def setup(self, args, state, model):
        self._initialized = True
        if state.is_world_process_zero:
            params = {k: v for k, v in args.to_dict().items() if k not in WHERE_KEYS}
            self.live.log_params(params)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero and state.global_step > 0:  # resuming a checkpoint
            drop_points_after(Path(self.live.plots_dir) / Metric.subfolder, state.global_step)
        super().on_train_begin(args, state, control, model=model, **kwargs)

    def on_log(self, args, state, control, model=None, logs=None, **kwargs):
        if not self._initialized:
            self.setup(args, state, model)
        if not state.is_world_process_zero:
            return
        scalars = {
            k: v for k, v in (logs or {}).items() if _scalar(v) and not RUN_SPECIFIC.search(k)
        }
        self.live.step = state.global_step
        if "train_runtime" in (logs or {}):  # the end-of-training summary
            for key in sorted(TRAINER_SUMMARY & scalars.keys()):
                name = standardize_metric_name(key, "dvclive.huggingface")
                self.live.log_metric(name, scalars.pop(key), plot=False)
            if not scalars:
                self.live.make_summary()
                return
            # left: trl's averages over the steps after the last logging step, a real point
        super().on_log(args, state, control, model=model, logs=scalars, **kwargs)


def training_live(out_dir: str, resume: object) -> Live:
    """The DVCLive logger of a training stage's curves (``<out_dir>/live``), continuing the
    curves of the run being resumed; DVC, not DVCLive, records the experiment."""
    return Live(
        dir=str(Path(out_dir) / "live"), resume=bool(resume), save_dvc_exp=False, dvcyaml=None
    )
