"""Where a suite's runs execute: one at a time in this process, K at a time in worker processes
of this machine (CPU threads divided among them, GPUs shared out), or as a SLURM job array
(:mod:`moe_cl.suite.slurm`).

Every executor has the same small interface, so the suite schedules runs the same way on each:
``capacity`` (how many runs it takes at once), ``poll_s``, ``submit(fn, specs)`` (a handle per
spec, with ``done()``) and ``result(handle)`` (``fn``'s value; :class:`RunDied` when the process
or job running it ended without one). This module imports neither torch nor Avalanche unless
it is asked which GPUs there are.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

LAUNCHERS = ("local", "slurm")


@dataclass(frozen=True)
class Launch:
    """How a suite's runs execute: the suite commands' --jobs, --per-gpu, --shard, --launcher
    and --slurm-* options."""

    jobs: int | None = None  # runs at once; None: 1 here, no limit for a SLURM array
    per_gpu: int = 1
    shard: tuple[int, int] = (1, 1)  # (i, n): the i-th of n parts, i from 1
    launcher: str = "local"
    slurm_partition: str | None = None
    slurm_time: int | None = None  # minutes
    slurm_gpus_per_task: int | None = None
    slurm_cpus_per_task: int | None = None

    @property
    def parallel(self) -> bool:
        """Whether runs execute outside this process."""
        return self.launcher == "slurm" or (self.jobs or 1) > 1


class RunDied(Exception):
    """The process or job running a run ended without handing back its outcome."""


class InProcess:
    """One run at a time, in this process (the default: no start-up cost, today's behaviour)."""

    capacity = 1
    poll_s = 0.0

    def submit(self, fn: Callable[[Any], Any], specs: Sequence[Any]) -> list[Future]:
        handles = []
        for spec in specs:
            handle: Future = Future()
            handle.set_result(fn(spec))
            handles.append(handle)
        return handles

    def result(self, handle: Future) -> Any:
        return handle.result()

    def __enter__(self) -> InProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None


class Workers:
    """``jobs`` worker processes (spawned: torch and CUDA are not fork-safe), each running one
    run after another; closing waits for the runs started and starts no other."""

    poll_s = 0.1

    def __init__(self, jobs: int) -> None:
        self.capacity = jobs
        self._pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))

    def submit(self, fn: Callable[[Any], Any], specs: Sequence[Any]) -> list[Future]:
        return [self._pool.submit(fn, spec) for spec in specs]

    def result(self, handle: Future) -> Any:
        try:
            return handle.result()
        except BrokenProcessPool:
            raise RunDied("its worker process died (killed, or out of memory?); run the same "
                          "command again to resume it") from None

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity: what a scheduler gave it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def run_threads(launch: Launch, cpus: int | None = None) -> int | None:
    """torch threads for each run: this machine's CPUs (``cpus``, default its available ones)
    divided among --jobs, at least one; a SLURM task's --slurm-cpus-per-task; None (torch's
    default) for one run at a time in this process, or a SLURM task given no CPU count."""
    if launch.launcher == "slurm":
        return launch.slurm_cpus_per_task
    if (launch.jobs or 1) == 1:
        return None
    return max(1, (cpus or available_cpus()) // launch.jobs)


def visible_gpus(device: str) -> list[str]:
    """The GPUs that runs configured with ``device=`` may be spread over: every visible one for
    ``auto`` or ``cuda``, the one named by ``cuda:N``, none otherwise (CPU)."""
    if device.startswith("cuda:"):
        return [device]
    if device not in ("auto", "cuda"):
        return []
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [f"cuda:{index}" for index in range(count)]


def gpu_problem(jobs: int, per_gpu: int, gpus: Sequence[str]) -> str | None:
    """Why ``jobs`` runs at once cannot share ``gpus`` at ``per_gpu`` each; None when they can."""
    if not gpus or jobs <= len(gpus) * per_gpu:
        return None
    share = -(-jobs // len(gpus))
    return (f"--jobs {jobs} would put up to {share} runs on each of the {len(gpus)} GPU(s) "
            f"({', '.join(gpus)}), --per-gpu allows {per_gpu}: use --jobs "
            f"{len(gpus) * per_gpu}, or --per-gpu {share}")


def least_loaded(gpus: Sequence[str], busy: Iterable[str | None]) -> str:
    """The GPU running the fewest of the runs on ``busy`` devices (the first of equals), so
    runs are spread round-robin and a GPU freed is used again first."""
    busy = list(busy)
    return min(gpus, key=busy.count)
