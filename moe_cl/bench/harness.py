"""Measuring, shared by every section: interleaved timing, the CPU-share check, table rows and
targets, and the memory cases sections offer to the memory section.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from moe_cl.bench.settings import Options, Sizes

Fn = Callable[[], object]


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a clock read after it covers that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    fns: dict[str, Fn], *, repeats: int, warmup: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds per call of each function; the functions alternate within every repeat.

    As in ``timeit``, the garbage collector is off while a call is timed (a full collection
    costs a quarter of a second once Avalanche is imported) and runs once beforehand.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    gc.collect()
    was_enabled = gc.isenabled()
    try:
        for _ in range(repeats):
            for name, fn in fns.items():
                sync(device)
                gc.disable()
                start = time.perf_counter()
                fn()
                sync(device)
                times[name].append(time.perf_counter() - start)
                if was_enabled:
                    gc.enable()
    finally:
        if was_enabled:
            gc.enable()
    return times


def median(times: dict[str, list[float]], name: str) -> float:
    return statistics.median(times[name])


# ----------------------------------------------------------------------------- other load


def _system_busy_s() -> float | None:
    """CPU seconds all processes of the machine have used since boot (Linux), else None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class CpuShare:
    """Share of the machine's CPUs that *other* processes used while a section ran.

    On a shared machine (other jobs, other users) timings are only comparable when this is
    near zero: with 2 cores, a second busy process can slow multi-threaded kernels many-fold.
    """

    def __init__(self) -> None:
        self.wall = time.perf_counter()
        self.system = _system_busy_s()
        self.own = _own_cpu_s()

    def others(self) -> float | None:
        system = _system_busy_s()
        if system is None or self.system is None:
            return None
        wall = time.perf_counter() - self.wall
        used_by_others = (system - self.system) - (_own_cpu_s() - self.own)
        return max(0.0, used_by_others) / max(wall * (os.cpu_count() or 1), 1e-9)


def timed_section(run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """A section's results, with its wall time and the CPU share other processes used."""
    start, share = time.perf_counter(), CpuShare()
    section = run()
    section["wall_s"] = time.perf_counter() - start
    section["cpu_share_of_other_processes"] = share.others()
    return section


# ----------------------------------------------------------------------------- rows, targets


def row(
    case: str, variant: str, samples: Sequence[float], baseline: float | None, note: str = ""
) -> dict[str, Any]:
    """One table row: a variant's samples and its speed-up over the baseline's median."""
    middle = statistics.median(samples)
    return {
        "case": case,
        "variant": variant,
        "median_s": middle,
        "min_s": min(samples),
        "samples_s": list(samples),
        "speedup": None if baseline is None else baseline / middle,
        "note": note,
    }


def rows_for(
    case: str, times: dict[str, list[float]], baseline: str, notes: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """Table rows of one comparison; ``speedup`` = baseline median / variant median."""
    base = median(times, baseline)
    notes = notes or {}
    return [row(case, name, t, base, notes.get(name, "")) for name, t in times.items()]


def target(name: str, value: float, threshold: float, *, at_most: bool = False) -> dict[str, Any]:
    """Whether a measured ratio reaches the speed the design aims at."""
    met = value <= threshold if at_most else value >= threshold
    return {
        "target": name,
        "value": value,
        "threshold": threshold,
        "kind": "<=" if at_most else ">=",
        "met": bool(met),
    }


# ----------------------------------------------------------------------------- memory cases

MemoryFactory = Callable[[Sizes, torch.device, Options], Fn]


@dataclass(frozen=True)
class MemoryCases:
    """The configurations of a section whose peak memory the memory section measures."""

    description: str  # what the measured runs are, for the report
    runs: int  # calls of the case while its peak is taken
    cases: dict[str, MemoryFactory]  # case name (without the section's prefix) -> builder
