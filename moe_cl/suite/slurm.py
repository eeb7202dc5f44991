"""``--launcher slurm``: a suite's runs as SLURM job arrays, through submitit (the optional
extra: ``pip install 'moe-cl[slurm]'``); imported only for that launcher.

Each array task runs one run. Preempted, or at its time limit, it is requeued with the same
arguments (submitit's checkpointing; up to 3 times for time limits): it resumes from its run
folder's checkpoint, taking over the lock its earlier start left (same SLURM job). Logs and
submitit's files go to ``OUT/slurm/``.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import submitit
from submitit.core.utils import FailedJobError, UncompletedJobError

from moe_cl.suite.launch import Launch, RunDied

# submitit's executor; tests use its "local" one (the same array, in subprocesses here).
CLUSTER = "slurm"
LOG_FOLDER = "slurm"


def problem() -> str | None:
    """Why no array can be submitted from here; None when one can."""
    if CLUSTER == "slurm" and shutil.which("sbatch") is None:
        return "--launcher slurm: sbatch not found; submit from a SLURM login node"
    return None


class RequeuedCall(submitit.helpers.Checkpointable):
    """``fn(spec)`` in an array task; requeued with the same arguments (Checkpointable's
    default), which is all a run needs to resume."""

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        self.fn = fn

    def __call__(self, spec: Any) -> Any:
        return self.fn(spec)


class SlurmArray:
    """Every batch of runs submitted is one job array; at most ``--jobs`` tasks run at once."""

    capacity = sys.maxsize
    poll_s = 2.0

    def __init__(self, out: Path, launch: Launch) -> None:
        self._executor = submitit.AutoExecutor(folder=out / LOG_FOLDER, cluster=CLUSTER)
        parameters = {"name": "moe-cl", "timeout_min": launch.slurm_time,
                      "cpus_per_task": launch.slurm_cpus_per_task,
                      "slurm_partition": launch.slurm_partition,
                      "slurm_gpus_per_task": launch.slurm_gpus_per_task,
                      "slurm_array_parallelism": launch.jobs}
        self._executor.update_parameters(**{k: v for k, v in parameters.items() if v is not None})

    def submit(self, fn: Callable[[Any], Any], specs: Sequence[Any]) -> list[submitit.Job]:
        return self._executor.map_array(RequeuedCall(fn), specs)

    def result(self, job: submitit.Job) -> Any:
        try:
            return job.result()
        except (FailedJobError, UncompletedJobError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise RunDied(f"its SLURM job {job.job_id} ended without a result ({first}); see "
                          f"{job.paths.stderr}; run the same command again to resume it") from None

    def __enter__(self) -> SlurmArray:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None
