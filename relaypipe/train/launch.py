"""Training stages in several processes: ``num_processes > 1`` re-runs the stage's training
under ``accelerate launch``.

DVC runs one command per stage (``python -m flows.stages sft``), so a stage that should train
on N GPUs starts the N processes itself. :func:`train_in_processes` writes the stage's params
(the values this run was built from) to a temporary file and runs

    python -m accelerate.commands.launch --multi_gpu --num_processes N --num_machines 1 \\
        --main_process_port <free port> -m relaypipe.stages.<stage> --params <that file>

with ``RELAYPIPE_LAUNCHED=1``. Each launched process builds the same params and, seeing
:func:`launched`, only trains (the stage's ``run`` checks it first); the launching process waits,
then runs the stage's single-process check and writes its metrics. ``--multi_gpu`` is
accelerate's name for its torchrun launcher, which starts the processes whatever the device;
with ``device: cpu`` the trainers talk over gloo (measured with trl's SFTTrainer and with the
GRPOTrainer and our rollout_func, tests/test_accelerate.py).

Inside the launched processes only the main one writes: the checkpoint fingerprint, DVCLive
curves, the saved model, the result handed back (:func:`hand_back`). One machine only (the
params file lives in a local temporary directory).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

LAUNCHED_ENV = "RELAYPIPE_LAUNCHED"
RESULT_ENV = "RELAYPIPE_LAUNCH_RESULT"


def launched() -> bool:
    """Whether this process is one of those :func:`train_in_processes` started."""
    return os.environ.get(LAUNCHED_ENV) == "1"


def check_num_processes(num_processes: int, device: str) -> None:
    """For a stage's ``__post_init__``: a process count the launch can honour."""
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    if num_processes > 1 and device not in ("auto", "cuda", "cpu"):
        raise ValueError(
            f"num_processes {num_processes} puts each process on its own GPU: device must be "
            f"auto, cuda or cpu, not {device!r}"
        )


def process_device(device: str) -> str:
    """The stage's ``device`` for this process: in a launched process on CUDA, its own GPU
    (``LOCAL_RANK``), so the student (and an in-process teacher) never pile up on GPU 0."""
    if launched() and device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(module: str, params_file: Path, num_processes: int) -> list[str]:
    """The ``accelerate launch`` command line that runs ``module`` in ``num_processes``."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(num_processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",  # the trainer config's bf16/fp16 decide; this only silences accelerate's notice
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        "-m",
        module,
        "--params",
        str(params_file),
    ]


def train_in_processes(module: str, section: str, params: Any, num_processes: int) -> Any:
    """Run ``module``'s training in ``num_processes`` processes; what its main process handed back.

    ``params`` is the stage's params dataclass: written as ``{section: asdict(params)}`` so
    every process builds exactly these values (a JSON file is a YAML file). A failed launch
    raises with its exit code; its processes' output has already gone to this process's.
    """
    with tempfile.TemporaryDirectory(prefix=f"relaypipe-{section}-") as tmp:
        params_file = Path(tmp) / "params.yaml"
        params_file.write_text(json.dumps({section: asdict(params)}))
        result = Path(tmp) / "result.json"
        cmd = launch_command(module, params_file, num_processes)
        env = {**os.environ, LAUNCHED_ENV: "1", RESULT_ENV: str(result)}
        log.info("%s: training in %d processes: %s", section, num_processes, " ".join(cmd))
        proc = subprocess.run(cmd, env=env, check=False)
        if proc.returncode != 0:
            raise RuntimeError(
                f"{section}: training in {num_processes} processes ({section}.num_processes) "
                f"failed with exit code {proc.returncode}; the processes' output is above"
            )
        if not result.is_file():
            raise RuntimeError(f"{section}: the launched training handed back no result")
        return json.loads(result.read_text())


def resume_point(args: Any, directory: str, fingerprint: dict[str, Any]) -> str | None:
    """The checkpoint to resume from, decided once: the main process prepares ``directory``
    (:func:`relaypipe.train.checkpoints.prepare_checkpoint_dir` may clear a stale run and writes
    the fingerprint), the others wait for it and then only read the last checkpoint.

    ``args`` is the built trainer config (its ``main_process_first`` is the barrier).
    """
    from transformers.trainer_utils import get_last_checkpoint

    from relaypipe.train.checkpoints import prepare_checkpoint_dir

    with args.main_process_first(local=False, desc=f"checkpoints in {directory}"):
        if args.process_index == 0:
            return prepare_checkpoint_dir(directory, fingerprint)
        return get_last_checkpoint(directory)


def hand_back(value: Any) -> None:
    """In a launched process: the main one (rank 0) passes its training's result back; then
    every process leaves its process group, since one torn down at interpreter exit can abort
    with "terminate called without an active exception" after training succeeded (seen with
    gloo on CPU in 1 of 3 test runs)."""
    if os.environ.get("RANK", "0") == "0" and (path := os.environ.get(RESULT_ENV)):
        Path(path).write_text(json.dumps(value))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
