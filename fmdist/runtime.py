"""Process-level set-up shared by the driver and the workers: accelerator choice and logging."""

from __future__ import annotations

import logging
import os
import sys

FAIL_AT_STEP_ENV = "FMDIST_FAIL_AT_STEP"
"""Fault injection for recovery tests and drills: a fresh (not resumed) run raises after this step."""

HANG_AT_STEP_ENV = "FMDIST_HANG_AT_STEP"
"""Fault injection for hang drills: RANK:STEP makes that rank stop taking part after that step (it sleeps
and never enters another collective), as a rank stuck in a collective or a frozen process would."""

KILL_AT_STEP_ENV = "FMDIST_KILL_AT_STEP"
"""Fault injection for worker-loss drills: RANK:STEP makes that rank's process SIGKILL itself after that
step of a fresh (not resumed) run, as the OOM killer or a lost node would: no exception, no clean-up."""

KILL_MID_UPLOAD_ENV = "FMDIST_KILL_MID_UPLOAD"
"""Fault injection for torn-checkpoint drills: RANK:STEP makes that rank's process SIGKILL itself halfway
through uploading that step's checkpoint to run.storage_path (local or S3), leaving a torn checkpoint."""

RECORD_ROWS_ENV = "FMDIST_RECORD_ROWS"
"""Row recording for drills and tests: a directory where every worker appends the row ids it trains on
(one JSON line per real micro-batch, to rows_rank{r}.jsonl), so a test can check rows seen exactly once."""


def drill_step(env: str, rank: int) -> int | None:
    """The step at which this rank runs the drill `env` (one of the RANK:STEP drills above); None when
    it is unset or names another rank."""
    value = os.environ.get(env)
    if not value:
        return None
    drill_rank, step = (int(part) for part in value.split(":"))
    return step if drill_rank == rank else None


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def use_cpu_accelerator_if_no_gpu() -> None:
    """Point DeepSpeed at its CPU accelerator (gloo) when this process sees no GPU.

    DeepSpeed picks its accelerator once, at first use, from DS_ACCELERATOR; without a GPU its CUDA
    default fails at `deepspeed.initialize`, so this must run before deepspeed is first used.
    """
    if not cuda_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    use_one_ninja()


def use_one_ninja() -> None:
    """Put this Python's own bin directory (the venv's, with DeepSpeed's pip `ninja`) first on PATH.

    DeepSpeed JIT-builds its shm comm op with whichever `ninja` PATH finds first. Ray workers get the
    venv's bin directory on PATH, a plain `.venv/bin/fmdist` or pytest process may not, and two ninja
    versions do not read each other's build log: each switch rebuilt the op (34 s on 2 cores, at every
    DeepSpeed start-up where they alternate). One ninja for every process builds it once per machine.
    """
    bin_dir = os.path.dirname(sys.executable)
    if os.path.isfile(os.path.join(bin_dir, "ninja")):
        parts = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != bin_dir]
        os.environ["PATH"] = os.pathsep.join([bin_dir, *parts])


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_DATE_FORMAT = "%H:%M:%S"


def get_logger(name: str, rank: int = 0) -> logging.Logger:
    """A logger under "fmdist". Rank 0 logs at INFO; other ranks only speak when something is wrong (WARNING).

    Every fmdist logger writes through the one handler of the "fmdist" logger (stderr), which a Ray
    worker swaps for the console relay (train/console.py), so the launcher's console shows them.
    """
    parent = logging.getLogger("fmdist")
    if not parent.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT, LOG_DATE_FORMAT))
        parent.addHandler(handler)
        parent.propagate = False
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    return logger
