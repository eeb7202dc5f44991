"""Section ``memory``: peak memory of the configurations other sections offer
(``Section.memory``).

On the CPU each case runs in a fresh subprocess (``--child CASE``), whose peak resident set size
is read from ``/proc`` after its high-water mark is reset right before the run; on CUDA
``torch.cuda.max_memory_allocated``. A case is named ``SECTION/CASE``; a child imports only
that section.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from moe_cl.bench.harness import MemoryCases
from moe_cl.bench.registry import Section, load
from moe_cl.bench.settings import Options, Sizes
from moe_cl.storage.environment import proc_value

MEASURED = ("bank", "ls", "topk", "epoch")  # the sections whose memory cases run, in order


def _memory_cases(section: str) -> MemoryCases:
    cases = load(section).memory
    if cases is None:
        raise ValueError(f"section {section!r} offers no memory cases")
    return cases


def case_names() -> list[str]:
    return [f"{section}/{case}" for section in MEASURED for case in _memory_cases(section).cases]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0), so the peak read later is the run's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    """The process's peak resident set: the kernel's high-water mark where it can be reset."""
    peak_kb = proc_value("/proc/self/status", "VmHWM:")  # e.g. "123456 kB"
    if peak_kb is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return int(peak_kb.split()[0]) / 1024


def measure_here(name: str, sizes: Sizes, device: torch.device, options: Options) -> dict[str, Any]:
    """Peak memory of one case in this process (meant for a fresh child, or CUDA)."""
    section, case = name.split("/", 1)
    cases = _memory_cases(section)
    fn = cases.cases[case](sizes, device, options)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) / 2**20
        for _ in range(cases.runs):
            fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        kind = "cuda_allocated"
    else:
        before = _rss_mb()
        kind = "cpu_rss" if _reset_peak_rss() else "cpu_rss_since_start"
        for _ in range(cases.runs):
            fn()
        peak = _peak_rss_mb()
    return {"case": name, "kind": kind, "before_mb": before, "peak_mb": peak,
            "extra_mb": peak - before}


def _child_command(name: str, options: Options) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "moe_cl.bench",
        "--child",
        name,
        "--device",
        "cpu",
        "--preset",
        options.preset,
        "--data-root",
        str(options.data_root),
    ]
    return cmd + (["--synthetic"] if options.synthetic else [])


def _run_child(name: str, options: Options) -> dict[str, Any]:
    # Two children run at once on this machine's cores: one intra-op thread each, so they do
    # not oversubscribe the cores (thread count barely changes memory, it does change speed).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(
        _child_command(name, options),
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
        env=env,
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"case": name, "error": f"child exited {proc.returncode}: {' | '.join(tail)}"}


def run(sizes: Sizes, device: torch.device, options: Options) -> dict[str, Any]:
    if device.type == "cuda":  # in this process and cheap: every case
        results = [measure_here(n, sizes, device, options) for n in case_names()]
    else:  # a fresh process per case; presets may pick a few, to save the start-up time
        names = [
            n for n in case_names() if sizes.memory_cases in (None, ()) or n in sizes.memory_cases
        ]
        workers = max(1, min(2, os.cpu_count() or 1))
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(lambda n: _run_child(n, options), names))
    runs = "; ".join(f"{s}: {_memory_cases(s).description}" for s in MEASURED)
    return {
        "title": "peak memory of each configuration",
        "rows": [],
        "targets": [],
        "info": {"results": results},
        "notes": [
            "CPU: each case runs in a fresh process (python -m moe_cl.bench --child CASE); "
            "'before' is its resident set once modules, data and model are built, 'peak' the "
            "highest resident set during the run (kernel high-water mark reset just before "
            "it), 'extra' = peak - before: activations, gradients, optimizer state and "
            "gathered data of the run itself. Shared libraries count in before/peak.",
            "CPU children run two at a time with one intra-op thread each.",
            "CUDA: torch.cuda.memory_allocated before and max_memory_allocated during the run.",
            f"Runs: {runs}",
        ],
    }


def info_lines(info: dict[str, Any]) -> list[str]:
    lines = []
    for res in info["results"]:
        if "error" in res:
            lines.append(f"  {res['case']:<28} ERROR {res['error']}")
        else:
            lines.append(
                f"  {res['case']:<28} before {res['before_mb']:9,.1f} MB   peak "
                f"{res['peak_mb']:9,.1f} MB   extra {res['extra_mb']:9,.1f} MB"
            )
    return lines


SECTION = Section(run=run, info_lines=info_lines, timings=False)
