"""``--launcher slurm``: a suite's runs as SLURM job arrays, through submitit (the optional
extra: ``pip install 'moe-cl[slurm]'``); imported only for that launcher.

Each array task runs one run. Preempted, or at its time limit, it is requeued with the same
arguments (submitit's checkpointing; up to 3 times for time limits): it resumes from its run
folder's checkpoint, taking over the lock its earlier start left (same SLURM job). Logs and
submitit's files go to ``OUT/slurm/``.

submitit submits; the suite watches its tasks itself, through ``squeue`` (every task SLURM
still knows, ended ones included) and, for a task gone from the queue, its result file or
``sacct`` where the cluster keeps accounting: so a cancelled task is seen at once, with or
without accounting, and a task that can never start is cancelled instead of waited for.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import submitit
from submitit.core.utils import FailedJobError, UncompletedJobError

from moe_cl.errors import USAGE_ERROR, interrupted_code
from moe_cl.suite.launch import Launch, RunDied
from moe_cl.suite.spec import SuiteError

# submitit's executor; tests use its "local" one (the same array, in subprocesses here).
CLUSTER = "slurm"
LOG_FOLDER = "slurm"
# The states of a task that has ended (any other is pending, running or on its way back).
ENDED = {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL",
         "OUT_OF_MEMORY", "TIMEOUT"}
# Why a task pends that no wait cures: what it asks for is beyond the partition or the account.
NEVER_STARTS = {"PartitionConfig": "it asks for more than any node of the partition has",
                "PartitionTimeLimit": "--slurm-time is above the partition's limit",
                "BadConstraints": "no node has what it asks for",
                "InvalidAccount": "its account is not valid",
                "InvalidQOS": "its QOS is not valid",
                "DependencyNeverSatisfied": "its dependency can never be satisfied"}


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


class Task:
    """One array task: the handle the suite's scheduler waits on (``done()``)."""

    def __init__(self, job: submitit.Job, array: SlurmArray) -> None:
        self.job, self._array = job, array

    @property
    def task_id(self) -> str:
        return str(self.job.job_id)

    def done(self) -> bool:
        return self._array.ended(self)


class SlurmArray:
    """Every batch of runs submitted is one job array; at most ``--jobs`` tasks run at once.
    While the suite waits it says, about once a minute, which tasks it waits for and why."""

    capacity = sys.maxsize
    poll_s = 5.0  # between two looks at the queue (one squeue for every task)
    report_s = 60.0  # between two lines saying what the suite waits for

    def __init__(self, out: Path, launch: Launch, echo: Callable[[str], None] = print) -> None:
        self._folder = out / LOG_FOLDER
        self._made = [f for f in (out, self._folder) if not f.exists()]  # removed if unused
        self._executor = submitit.AutoExecutor(folder=self._folder, cluster=CLUSTER)
        parameters = {"name": "moe-cl", "timeout_min": launch.slurm_time,
                      "cpus_per_task": launch.slurm_cpus_per_task,
                      "slurm_partition": launch.slurm_partition,
                      "slurm_gpus_per_task": launch.slurm_gpus_per_task,
                      "slurm_array_parallelism": launch.jobs}
        self._executor.update_parameters(**{k: v for k, v in parameters.items() if v is not None})
        self._echo = echo
        self._waiting: dict[str, Task] = {}  # submitted, not yet seen to end
        self._states: dict[str, tuple[str, str]] = {}  # task id: (state, pending reason)
        self._looked = self._said = 0.0
        self._accounting: bool | None = None  # whether sacct answers; None: not asked yet

    # ------------------------------------------------------------------ submitting

    def submit(self, fn: Callable[[Any], Any], specs: Sequence[Any]) -> list[Task]:
        """Submit ``specs`` as one array; SLURM refusing it is a usage error (one line,
        nothing left in the log folder)."""
        if not specs:
            return []
        before = set(self._folder.iterdir()) if self._folder.exists() else set()
        try:
            with contextlib.redirect_stderr(io.StringIO()):  # submitit echoes sbatch's errors
                jobs = self._executor.map_array(RequeuedCall(fn), specs)
        except FailedJobError as err:
            self._remove_new_files(before)
            raise SuiteError(f"SLURM refused the job array: {_sbatch_errors(str(err))}; "
                             "check the --slurm-* options; nothing was submitted",
                             USAGE_ERROR) from None
        tasks = [Task(job, self) for job in jobs]
        self._waiting.update((task.task_id, task) for task in tasks)
        array = tasks[0].task_id.split("_")[0]
        self._echo(f"submitted {len(tasks)} run(s) to SLURM as job {array} "
                   f"(task(s) {_listed([t.task_id for t in tasks])}); logs in {self._folder}")
        self._said = 0.0  # say what the new tasks wait for at the next look
        return tasks

    def _remove_new_files(self, before: set[Path]) -> None:
        if self._folder.exists():
            for path in set(self._folder.iterdir()) - before:
                path.unlink(missing_ok=True)
        for folder in reversed(self._made):
            with contextlib.suppress(OSError):  # not empty: kept
                folder.rmdir()

    # ------------------------------------------------------------------ watching

    def ended(self, task: Task) -> bool:
        """Whether ``task`` is over for the suite: it left a result, or SLURM ended it, or it
        can never start, or it left SLURM's queue without a result."""
        self._look()
        if task.job.paths.result_pickle.exists():
            return True
        state, reason = self._states.get(task.task_id, ("", ""))
        return state in ENDED or reason in NEVER_STARTS or state == "GONE"

    def _look(self) -> None:
        """Refresh the states of the tasks still waited for (at most once per ``poll_s``), and
        say what the suite waits for when it is time."""
        if time.monotonic() - self._looked < self.poll_s * 0.9:
            return
        self._looked = time.monotonic()
        states = self._queue_states(self._waiting.values())
        if states is not None:
            for task_id in self._waiting:
                self._states[task_id] = states.get(task_id, ("GONE", ""))
        if self._waiting and time.monotonic() - self._said >= self.report_s:
            self._said = time.monotonic()
            states = {i: self._states.get(i, ("SUBMITTED", "")) for i in self._waiting}
            self._echo(f"waiting for {len(states)} SLURM task(s): {_summary(states)}")

    def _queue_states(self, tasks: Iterable[Task]) -> dict[str, tuple[str, str]] | None:
        """Each task's (state, pending reason) as SLURM's queue shows it; a task missing has
        left the queue. None when the queue cannot be read now (the next look tries again)."""
        tasks = list(tasks)
        if CLUSTER != "slurm":  # submitit's local executor: its processes
            return {t.task_id: ("COMPLETED" if t.job.done() else "RUNNING", "") for t in tasks}
        arrays = sorted({t.task_id.split("_")[0] for t in tasks})
        if not arrays:
            return {}
        listed = _command(["squeue", "--noheader", "--array", "--states=all",
                           f"--jobs={','.join(arrays)}", "--format=%i|%T|%r"])
        if listed is None:
            return None
        states = {}
        for line in listed.splitlines():
            task_id, _, rest = line.strip().partition("|")
            state, _, reason = rest.partition("|")
            states[task_id] = (state, reason if reason != "None" else "")
        return states

    def _final_state(self, task_id: str) -> str:
        """How SLURM ended the task: sacct's state where the cluster keeps accounting ("CANCELLED
        by 1000"), else the queue's."""
        state = self._states.get(task_id, ("", ""))[0]
        if self._accounting is not False and CLUSTER == "slurm":
            listed = _command(["sacct", "--noheader", "--parsable2", "--allocations",
                               f"--jobs={task_id}", "--format=JobID,State"])
            self._accounting = listed is not None
            for line in (listed or "").splitlines():
                found, _, accounted = line.partition("|")
                if found == task_id and accounted:
                    return accounted
        if state == "GONE":
            return ("no longer in SLURM's queue (this cluster keeps no accounting to say how it "
                    "ended)" if not self._accounting else "no longer in SLURM's queue")
        return state

    # ------------------------------------------------------------------ results

    def result(self, task: Task) -> Any:
        """The run's outcome; :class:`RunDied` naming the task and its SLURM state when it
        ended without one; a :class:`SuiteError` (usage) when it can never start."""
        self._waiting.pop(task.task_id, None)
        log = task.job.paths.stderr
        log_note = f"see {log}" if log.exists() else "it wrote no log"
        if task.job.paths.result_pickle.exists():
            try:
                return task.job.result()
            except (FailedJobError, UncompletedJobError) as err:
                lines = [line for line in str(err).strip().splitlines() if line.strip()]
                raise RunDied(f"its SLURM task {task.task_id} failed "
                              f"({lines[-1].strip() if lines else type(err).__name__}); "
                              f"{log_note}") from None
        reason = self._states.get(task.task_id, ("", ""))[1]
        if reason in NEVER_STARTS:
            stuck = [task.task_id, *(i for i in self._waiting
                                     if self._states.get(i, ("", ""))[1] in NEVER_STARTS)]
            raise SuiteError(f"SLURM task(s) {_listed(stuck)} can never start (pending, reason "
                             f"{reason}: {NEVER_STARTS[reason]}); {self._cancel(stuck)}; change "
                             "the --slurm-* options and run the same command again",
                             USAGE_ERROR)
        raise RunDied(f"its SLURM task {task.task_id} ended {self._final_state(task.task_id)} "
                      f"without a result; {log_note}; run the same command again to resume it")

    def _cancel(self, task_ids: Sequence[str]) -> str:
        """Cancel ``task_ids`` (no longer waited for); what was done, for a line."""
        for task_id in task_ids:
            self._waiting.pop(task_id, None)
        if CLUSTER == "slurm" and _command(["scancel", *task_ids]) is not None:
            return f"cancelled {_listed(task_ids)}"
        arrays = sorted({i.split("_")[0] for i in task_ids})
        return f"{_listed(task_ids)} may still run: scancel {' '.join(arrays)}"

    # ------------------------------------------------------------------ leaving

    def __enter__(self) -> SlurmArray:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 *_: object) -> None:
        """Leaving on an error or Ctrl-C: cancel the tasks still waited for (their runs resume
        next time). Ctrl-C then ends the suite in one line, exit 130, without a traceback."""
        if kind is None:
            return
        cancelled = self._cancel(sorted(self._waiting)) if self._waiting else ""
        if isinstance(error, KeyboardInterrupt):
            raise SuiteError(f"interrupted{f' (SLURM task(s) {cancelled})' if cancelled else ''}"
                             "; run the same command again to resume",
                             interrupted_code(error)) from None
        if cancelled:
            self._echo(f"SLURM task(s) {cancelled}")


def _command(argv: list[str]) -> str | None:
    """What a SLURM command prints; None when it is missing or fails."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def _sbatch_errors(output: str) -> str:
    """sbatch's complaint in one line: its error lines, without their prefix."""
    errors = [line.split("error:", 1)[1].strip() for line in output.splitlines()
              if "error:" in line]
    return "; ".join(dict.fromkeys(errors)) or (output.strip().splitlines() or ["sbatch failed"])[0]


def _listed(task_ids: Sequence[str], most: int = 6) -> str:
    """Task ids for a line: all of a few, else the first and the last ones."""
    if len(task_ids) <= most:
        return ", ".join(task_ids)
    return f"{', '.join(task_ids[:3])}, ... {', '.join(task_ids[-2:])}"


def _summary(states: dict[str, tuple[str, str]]) -> str:
    """The tasks grouped by state and pending reason: "2 RUNNING (7_0, 7_1); 1 PENDING, reason
    Resources (7_2)"."""
    groups: dict[str, list[str]] = {}
    for task_id, (state, reason) in sorted(states.items()):
        groups.setdefault(f"{state}, reason {reason}" if reason else state, []).append(task_id)
    return "; ".join(f"{len(ids)} {what} ({_listed(ids)})" for what, ids in groups.items())
