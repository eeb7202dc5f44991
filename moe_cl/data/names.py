"""The data sets' and benchmarks' names, in a module that imports nothing.

The configuration offers the benchmarks as choices and the command line checks them before
torch is imported (``--help`` and usage errors stay fast). ``moe_cl.data.datasets`` holds each data
set's entry under these names; ``moe_cl.data.streams`` builds the streams they name.
"""

from __future__ import annotations

# Read from files: each gives a split stream (split_X) and the paper's one-experience stream
# (paper_X).
FILE_DATASETS: tuple[str, ...] = ("mnist", "fmnist", "cifar100")
# Generated in memory: each is a benchmark of its own name.
GENERATED_DATASETS: tuple[str, ...] = ("tiny",)

# The data set each benchmark draws from (``moe_cl.data.datasets.dataset_of`` gives its entry).
BENCHMARK_DATASET: dict[str, str] = {
    **{f"{kind}_{name}": name for kind in ("split", "paper") for name in FILE_DATASETS},
    **{name: name for name in GENERATED_DATASETS},
}
BENCHMARK_NAMES: tuple[str, ...] = tuple(BENCHMARK_DATASET)
