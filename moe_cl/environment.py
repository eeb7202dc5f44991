"""What a result was measured with: the versions of the packages that compute it.

Runs record them in results.json and the benchmarks in their JSON, so a number can always be
traced to its software. Imports neither torch nor Avalanche.
"""

from __future__ import annotations

import importlib.metadata

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
