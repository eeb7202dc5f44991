"""The bench's sections by name: a table of module paths, each imported only when it runs.

Adding a section is one new module and one entry here. A section module defines ``SECTION``, a
:class:`Section`: how to run it (a dict with ``title``, ``rows``, ``targets``, ``info`` and
``notes``), how to print its ``info`` and which of its configurations the memory section
measures. This module imports neither torch nor Avalanche, so
the command line can list and check section names without loading any of them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from moe_cl.bench.harness import MemoryCases
    from moe_cl.bench.settings import Options, Sizes


@dataclass(frozen=True)
class Entry:
    module: str
    description: str  # one line, for --help
    default: bool = True  # run when --only is not given


SECTIONS: dict[str, Entry] = {
    "bank": Entry(
        "moe_cl.bench.bank",
        "the batched ExpertBank against a loop over the same experts (forward + backward)",
    ),
    "layers": Entry(
        "moe_cl.bench.layers",
        "pooling before or after ReLU in each paper mixture; stacked vs separate convolutions",
    ),
    "ls": Entry("moe_cl.bench.ls", "L_s through G G^T against the reference double loop"),
    "epoch": Entry(
        "moe_cl.bench.epoch",
        "one paper_fmnist epoch: MoEStrategy (fast path with and without the reference train "
        "error, loaders; each mixture with today's and the baseline step), a plain loop, "
        "Avalanche Naive",
    ),
    "router": Entry(
        "moe_cl.bench.router",
        "the routed mixture's router (statistics update, routed evaluation) beside its training",
    ),
    "topk": Entry("moe_cl.bench.topk", "top-1 / top-2 against dense inference, distilled gate"),
    "memory": Entry(
        "moe_cl.bench.memory", "peak memory of each configuration (CPU: a fresh process each)"
    ),
    "gpu": Entry(
        "moe_cl.bench.gpu",
        "paper-length runs (20 paper_fmnist epochs, 1 paper_cifar100), meant for a GPU",
        default=False,
    ),
}
DEFAULT_SECTIONS = tuple(name for name, entry in SECTIONS.items() if entry.default)


@dataclass(frozen=True)
class Section:
    """What the bench needs of a section module."""

    run: Callable[[Sizes, torch.device, Options], dict[str, Any]]
    info_lines: Callable[[dict[str, Any]], list[str]]  # its ``info`` in the printed report
    timings: bool = True  # False: other load does not make its numbers unreliable
    memory: MemoryCases | None = None  # configurations the memory section measures


def load(name: str) -> Section:
    """Import the section ``name`` and return its ``SECTION``."""
    return importlib.import_module(SECTIONS[name].module).SECTION
