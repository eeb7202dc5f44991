"""What a result was measured with: the versions of the packages that compute it, and the machine.

Runs record the versions in results.json and the benchmarks record both in their JSON, so a
number can always be traced to its software and hardware. Imports neither torch nor Avalanche:
what only torch knows (its thread count, the CUDA device) is passed in.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
from collections.abc import Mapping
from datetime import datetime
from typing import Any

PACKAGES = ("torch", "torchvision", "avalanche-lib", "moe-cl")


def package_versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed version of each package (None when it is not installed)."""
    out: dict[str, str | None] = {}
    for package in packages:
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    return out


def proc_value(path: str, key: str) -> str | None:
    """What a ``key: value`` line of a Linux /proc file (cpuinfo, self/status) says of ``key``;
    None where the file or the line is missing."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _cpu_model() -> str:
    """The processor's name as the kernel reports it (Linux), else what Python can tell."""
    return proc_value("/proc/cpuinfo", "model name") or platform.processor() or "unknown"


def machine_info(
    *,
    device: str,
    torch_version: str,
    torch_threads: int,
    accelerator: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Date, machine, software and load of a measurement. The torch values come from torch
    itself (``torch.__version__`` keeps the build's CUDA tag, which the package metadata may
    lack); ``accelerator`` adds what the caller knows of its GPU (name, CUDA version)."""
    return {
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch_threads,
        "torch": torch_version,
        "avalanche": package_versions(("avalanche-lib",))["avalanche-lib"],
        "device": device,
        "load_average_start": list(os.getloadavg()),
        **(accelerator or {}),
    }
