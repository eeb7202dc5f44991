"""Side-by-side speed and memory measurements of moe-cl's hot paths.

Run ``python -m moe_cl.bench [--quick | --tiny] [--repeats N] [--json PATH] [--only NAME ...]``.
Every comparison runs in one process on one machine, its variants interleaved repeat by repeat
(so a burst of load from elsewhere hits all of them alike), after a warm-up; the table shows
medians and the speed-up over each comparison's baseline, and the JSON keeps every sample.

Sections (``--only`` picks some; the default is all but ``gpu``):

* ``bank``: the batched :class:`~moe_cl.core.bank.ExpertBank` against a Python loop over
  :class:`~moe_cl.core.bank.ReferenceExpert` copies of the same experts (forward + backward).
* ``layers``: diagnostics below the bank: a training step of each paper mixture with its
  networks pooling before the ReLU (the zoo's order) against the paper's order (checked equal
  bit for bit), and each CIFAR-100 expert convolution stacked against separate per expert.
* ``ls``: L_s through G G^T (O(B^2 M)) against the reference code's double loop over expert
  pairs (O(B^2 M^2)), forward + backward.
* ``epoch``: one training epoch of ``paper_fmnist`` with the paper's attentive MoE through
  ``MoEStrategy`` (fast tensor path and Avalanche loaders), a plain PyTorch loop and
  Avalanche's ``Naive``.
* ``topk``: top-1 / top-2 inference against dense inference of a distilled (softmax-gate)
  mixture, with and without the gate.
* ``memory``: peak memory of each configuration above. On the CPU each runs in a fresh
  subprocess (``--child``), whose peak resident set size is read from ``/proc`` after its
  high-water mark is reset right before the run; on CUDA ``torch.cuda.max_memory_allocated``.
* ``gpu``: a paper-length run (20 epochs of ``paper_fmnist`` on the fast path, then one epoch of
  ``paper_cifar100``), meant for a lent GPU (see ``scripts/gpu_check.sh``); runs anywhere.
"""

from __future__ import annotations

import argparse
import copy
import gc
import io
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_cl.core.bank import Conv, ExpertBank, MaxPool, ReLU
from moe_cl.core.losses import pairwise_distances, sample_similarity_terms
from moe_cl.core.mixture import MixtureOfExpertsCore
from moe_cl.core.zoo import build_mixture, distilled_gate, get_architecture
from moe_cl.run_folder import write_json

SECTIONS = ("bank", "layers", "ls", "epoch", "topk", "memory", "gpu")
DEFAULT_SECTIONS = ("bank", "layers", "ls", "epoch", "topk", "memory")
Fn = Callable[[], object]

# ----------------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class Sizes:
    """Problem sizes and repeat counts; presets keep the whole run within its time budget."""

    repeats: int = 5
    warmup: int = 1
    bank_small_batch: int = 512  # MNIST experts, M = 5
    bank_large_batch: int = 256  # CIFAR-100 experts, M = 20
    bank_chunk: int = 32  # diagnostic row: the bank run on slices of the batch (0: none)
    ls_batch: int = 256
    epoch_samples: int | None = None  # None: the whole training set (60000)
    epoch_epochs: int = 2  # epoch 1 pays the set-up, epochs 2.. are the steady state
    epoch_repeats: int = 2
    epoch_batch: int = 512
    topk_batch: int = 256
    topk_experts: int = 20
    gpu_epochs: int = 20
    gpu_fmnist_samples: int | None = None
    gpu_cifar_samples: int | None = None
    memory_cases: tuple[str, ...] | None = None  # CPU only; None: every case in MEMORY_CASES


PRESETS: dict[str, Sizes] = {
    "full": Sizes(),
    "quick": Sizes(
        repeats=3,
        bank_large_batch=128,
        bank_chunk=0,
        epoch_samples=10_000,
        epoch_repeats=1,
        topk_batch=64,
        gpu_epochs=2,
        gpu_fmnist_samples=10_000,
        gpu_cifar_samples=2_000,
        memory_cases=("bank/mnist/bank", "bank/mnist/loop"),
    ),
    "tiny": Sizes(
        repeats=1,
        warmup=0,
        bank_small_batch=16,
        bank_large_batch=8,
        bank_chunk=4,
        ls_batch=16,
        epoch_samples=300,
        epoch_repeats=1,
        epoch_batch=128,
        topk_batch=8,
        topk_experts=4,
        gpu_epochs=1,
        gpu_fmnist_samples=600,
        gpu_cifar_samples=200,
        memory_cases=("bank/mnist/bank",),
    ),
}


# ----------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
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
                _sync(device)
                gc.disable()
                start = time.perf_counter()
                fn()
                _sync(device)
                times[name].append(time.perf_counter() - start)
                if was_enabled:
                    gc.enable()
    finally:
        if was_enabled:
            gc.enable()
    return times


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


def _row(
    case: str, variant: str, samples: Sequence[float], baseline: float | None, note: str = ""
) -> dict[str, Any]:
    median = statistics.median(samples)
    return {
        "case": case,
        "variant": variant,
        "median_s": median,
        "min_s": min(samples),
        "samples_s": list(samples),
        "speedup": None if baseline is None else baseline / median,
        "note": note,
    }


def rows_for(
    case: str, times: dict[str, list[float]], baseline: str, notes: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """Table rows of one comparison; ``speedup`` = baseline median / variant median."""
    base = statistics.median(times[baseline])
    notes = notes or {}
    return [_row(case, name, t, base, notes.get(name, "")) for name, t in times.items()]


def target(name: str, value: float, threshold: float, *, at_most: bool = False) -> dict[str, Any]:
    met = value <= threshold if at_most else value >= threshold
    return {
        "target": name,
        "value": value,
        "threshold": threshold,
        "kind": "<=" if at_most else ">=",
        "met": bool(met),
    }


def _median(times: dict[str, list[float]], name: str) -> float:
    return statistics.median(times[name])


# ----------------------------------------------------------------------------- a. bank


def bank_cases(
    arch_name: str, num_experts: int, batch: int, chunk: int, device: torch.device
) -> tuple[dict[str, Fn], float]:
    """Forward + backward of the batched bank, a loop over its exported experts, and the bank
    on slices of the batch. Also returns max |bank - loop| over logits and hidden vectors."""
    torch.manual_seed(0)
    spec = get_architecture(arch_name).expert
    bank = ExpertBank(spec, num_experts).to(device)
    refs = [bank.groups[0].export_reference(i) for i in range(num_experts)]
    params = list(bank.parameters()) + [p for r in refs for p in r.parameters()]
    x = torch.randn(batch, *spec.input_shape, device=device)

    def clear() -> None:
        for p in params:
            p.grad = None

    def loop_forward(inputs: Tensor) -> tuple[Tensor, Tensor]:
        outs = [ref(inputs) for ref in refs]
        return torch.stack([o[0] for o in outs], 1), torch.stack([o[1] for o in outs], 1)

    def run_bank() -> None:
        clear()
        logits, hidden = bank(x)
        (logits.sum() + hidden.sum()).backward()

    def run_loop() -> None:
        clear()
        logits, hidden = loop_forward(x)
        (logits.sum() + hidden.sum()).backward()

    def run_chunked() -> None:
        clear()
        for part in x.split(chunk):
            logits, hidden = bank(part)
            (logits.sum() + hidden.sum()).backward()

    with torch.no_grad():
        a, b = bank(x), loop_forward(x)
        diff = max(float((a[0] - b[0]).abs().max()), float((a[1] - b[1]).abs().max()))
    fns = {"loop over experts": run_loop, "ExpertBank": run_bank}
    if 0 < chunk < batch:
        fns[f"ExpertBank, slices of {chunk}"] = run_chunked
    return fns, diff


def bench_bank(sizes: Sizes, device: torch.device, **_: Any) -> dict[str, Any]:
    rows, targets, info = [], [], {}
    for arch_name, m, batch, threshold in (
        ("mnist", 5, sizes.bank_small_batch, 1.5),
        ("cifar100", 20, sizes.bank_large_batch, 3.0),
    ):
        fns, diff = bank_cases(arch_name, m, batch, sizes.bank_chunk, device)
        times = measure(fns, repeats=sizes.repeats, warmup=sizes.warmup, device=device)
        case = f"{arch_name} experts M={m} B={batch}"
        rows += rows_for(case, times, "loop over experts")
        speedup = _median(times, "loop over experts") / _median(times, "ExpertBank")
        targets.append(target(f"bank vs loop, {case}", speedup, threshold))
        info[case] = {"max_abs_diff_bank_vs_loop": diff}
    return {
        "title": "batched ExpertBank vs a loop over ReferenceExperts (forward + backward)",
        "rows": rows,
        "targets": targets,
        "info": info,
        "notes": [
            "The sliced-batch row is a diagnostic (BatchNorm statistics then come from each "
            "slice); it shows how much of the cost is cache traffic of the [B, M*C, H, W] "
            "activations rather than arithmetic."
        ],
    }


# ----------------------------------------------------------------------------- a2. layers


def _swap_pairs(items: Sequence[Any], first: type, second: type) -> list[Any]:
    """``items`` with every adjacent (first, second) pair turned into (second, first)."""
    out = list(items)
    for i in range(len(out) - 1):
        if isinstance(out[i], first) and isinstance(out[i + 1], second):
            out[i], out[i + 1] = out[i + 1], out[i]
    return out


def paper_order(core: MixtureOfExpertsCore) -> MixtureOfExpertsCore:
    """A copy of ``core`` whose networks apply ReLU before max-pooling, as the paper writes
    them (the zoo pools first: same function, same gradients, see moe_cl.core.zoo)."""
    paper = copy.deepcopy(core)
    paper.gate.network = nn.Sequential(*_swap_pairs(paper.gate.network, nn.MaxPool2d, nn.ReLU))
    for holder in (paper.bank, *paper.bank.groups):
        layers = _swap_pairs(holder.spec.layers, MaxPool, ReLU)
        holder.spec = replace(holder.spec, layers=tuple(layers))
    return paper


def order_cases(
    arch_name: str, batch: int, device: torch.device
) -> tuple[dict[str, Fn], dict[str, bool]]:
    """Forward + backward of one mixture in the zoo's and in the paper's layer order; also
    whether the orders differ and the outputs and gradients are identical bit for bit."""
    torch.manual_seed(0)
    zoo = build_mixture(get_architecture(arch_name), gate="attentive").to(device).train()
    paper = paper_order(zoo)
    x = torch.randn(batch, *zoo.bank.spec.input_shape, device=device)
    y = torch.randint(0, zoo.bank.num_classes, (batch,), device=device)

    def step(core: MixtureOfExpertsCore) -> Fn:
        def run() -> Tensor:
            core.zero_grad(set_to_none=True)
            log_probs = core(x).log_probs
            F.nll_loss(log_probs, y).backward()
            return log_probs

        return run

    outputs = [step(core)() for core in (zoo, paper)]
    pairs = zip(zoo.parameters(), paper.parameters(), strict=True)
    same = torch.equal(outputs[0], outputs[1])
    same = same and all(torch.equal(a.grad, b.grad) for a, b in pairs)
    differs = paper.bank.spec.layers != zoo.bank.spec.layers  # else the check is vacuous
    fns = {"paper order (ReLU, then pool)": step(paper), "zoo order (pool, then ReLU)": step(zoo)}
    return fns, {"layer_order_differs": differs, "outputs_and_gradients_identical": same}


def conv_cases(
    layer: Any, num_experts: int, batch: int, size: int, device: torch.device
) -> dict[str, Fn]:
    """One stacked convolution of the bank (grouped, or shared input for the first layer)
    against ``num_experts`` separate convolutions, forward + backward."""
    shared = layer.in_channels == 3  # the first layer reads the image, no input gradient
    g = torch.Generator().manual_seed(0)
    c_in = layer.in_channels * (1 if shared else num_experts)
    x = torch.randn(batch, c_in, size, size, generator=g).to(device)
    if shared:
        parts = [x] * num_experts
    else:
        parts = [p.contiguous().requires_grad_() for p in x.split(layer.in_channels, 1)]
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_(not shared)
    w = torch.randn(num_experts * layer.out_channels, layer.in_channels, 3, 3, device=device)
    weights = [part.clone().requires_grad_() for part in w.split(layer.out_channels)]
    w.requires_grad_()

    def grouped() -> None:
        x.grad = w.grad = None
        F.conv2d(x, w, padding=1, groups=1 if shared else num_experts).sum().backward()

    def separate() -> None:
        for part, weight in zip(parts, weights, strict=True):
            part.grad = weight.grad = None
            F.conv2d(part, weight, padding=1).sum().backward()

    return {f"{num_experts} separate convolutions": separate, "one stacked convolution": grouped}


def bench_layers(sizes: Sizes, device: torch.device, **_: Any) -> dict[str, Any]:
    rows, info = [], {}
    # Steps of the small models take tens of ms: more repeats keep their medians steady.
    for arch_name, batch, repeats in (
        ("mnist", sizes.bank_small_batch, 4 * sizes.repeats),
        ("fmnist", sizes.bank_small_batch, 4 * sizes.repeats),
        ("cifar100", sizes.bank_large_batch, sizes.repeats),
    ):
        fns, checks = order_cases(arch_name, batch, device)
        times = measure(fns, repeats=repeats, warmup=sizes.warmup, device=device)
        case = f"{arch_name} mixture B={batch}"
        rows += rows_for(case, times, "paper order (ReLU, then pool)")
        info[case] = checks
    spec = get_architecture("cifar100").expert
    convs = [layer for layer in spec.layers if isinstance(layer, Conv)]
    for index, (layer, size) in enumerate(zip(convs, (32, 16, 8, 4), strict=True), 1):
        fns = conv_cases(layer, 20, sizes.bank_large_batch, size, device)
        times = measure(fns, repeats=sizes.repeats, warmup=sizes.warmup, device=device)
        case = (f"cifar100 conv {index} ({layer.in_channels}->{layer.out_channels}, {size}x{size})"
                f" M=20 B={sizes.bank_large_batch}")
        rows += rows_for(case, times, "20 separate convolutions")
    return {
        "title": "layer-level diagnostics: pooling before ReLU; stacked vs separate convolutions",
        "rows": rows,
        "targets": [],
        "info": info,
        "notes": [
            "Mixture rows: one forward + backward of the attentive mixture, its networks as the "
            "zoo builds them and with every (max-pool, ReLU) pair in the paper's order; the two "
            "must agree bit for bit (info).",
            "Convolution rows: forward + backward of one CIFAR-100 expert convolution for all "
            "experts at once (channels-last, as the bank runs it on the CPU) and as separate "
            "per-expert convolutions (the first layer's input is shared and needs no gradient).",
        ],
    }


# ----------------------------------------------------------------------------- b. L_s


def pairwise_loop_terms(gate: Tensor, distances: Tensor) -> tuple[Tensor, Tensor]:
    """(S_same, S_diff) as the reference code computes them: one [B, B] product per pair of
    experts, O(B^2 M^2). Kept here as the baseline of the G G^T form."""
    m = gate.shape[1]
    s_same = gate.new_zeros(())
    s_diff = gate.new_zeros(())
    for i in range(m):
        for j in range(m):
            term = (gate[:, i, None] * gate[None, :, j] * distances).sum()
            if i == j:
                s_same = s_same + term
            else:
                s_diff = s_diff + term
    return s_same / m, s_diff / max(m * m - m, 1)


def ls_cases(batch: int, num_experts: int, device: torch.device) -> tuple[dict[str, Fn], float]:
    """Forward + backward of both forms of L_s; also their largest relative difference."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 784, generator=g).to(device)
    distances = pairwise_distances(x)
    logits = torch.randn(batch, num_experts, generator=g).to(device).requires_grad_()

    def run(terms: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]) -> Fn:
        def step() -> None:
            logits.grad = None
            s_same, s_diff = terms(torch.softmax(logits, -1), distances)
            (s_same - s_diff).backward()

        return step

    with torch.no_grad():
        gate = torch.softmax(logits, -1)
        fast, slow = sample_similarity_terms(gate, distances), pairwise_loop_terms(gate, distances)
        pairs = zip(fast, slow, strict=True)
        rel = max(float((a - b).abs() / b.abs().clamp_min(1e-12)) for a, b in pairs)
    fns = {
        "double loop over expert pairs": run(pairwise_loop_terms),
        "G G^T (sample_similarity_terms)": run(sample_similarity_terms),
    }
    return fns, rel


def bench_ls(sizes: Sizes, device: torch.device, **_: Any) -> dict[str, Any]:
    rows, targets, info = [], [], {}
    for m, threshold in ((20, 5.0), (5, None)):
        fns, rel = ls_cases(sizes.ls_batch, m, device)
        times = measure(fns, repeats=sizes.repeats, warmup=sizes.warmup, device=device)
        case = f"L_s B={sizes.ls_batch} M={m}"
        rows += rows_for(case, times, "double loop over expert pairs")
        speedup = _median(times, "double loop over expert pairs") / _median(
            times, "G G^T (sample_similarity_terms)"
        )
        if threshold is not None:
            targets.append(target(f"G G^T vs double loop, {case}", speedup, threshold))
        info[case] = {"max_rel_diff": rel}
    return {
        "title": "L_s: G G^T form vs the reference double loop (forward + backward)",
        "rows": rows,
        "targets": targets,
        "info": info,
        "notes": [],
    }


# ----------------------------------------------------------------------------- c. epoch


@dataclass
class EpochRun:
    """One training call: its whole wall time and each epoch's time and sample count."""

    total_s: float
    epoch_s: list[float] = field(default_factory=list)
    samples: list[int] = field(default_factory=list)


def _quiet_evaluator() -> Any:
    """Accuracy only, logged to a string: logging must not dominate what is timed."""
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.logging import TextLogger
    from avalanche.training.plugins import EvaluationPlugin

    return EvaluationPlugin(accuracy_metrics(stream=True), loggers=[TextLogger(io.StringIO())])


def _epoch_clock(device: torch.device) -> Any:
    """A plugin recording every training epoch's wall time and number of samples."""
    from avalanche.core import SupervisedPlugin

    class EpochClock(SupervisedPlugin):
        def __init__(self) -> None:
            super().__init__()
            self.starts: list[float] = []
            self.run = EpochRun(0.0)

        def before_training_epoch(self, strategy: Any, **kwargs: Any) -> None:
            _sync(device)
            self.starts.append(time.perf_counter())
            self.run.samples.append(0)

        def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
            self.run.samples[-1] += len(strategy.mb_y)

        def after_training_epoch(self, strategy: Any, **kwargs: Any) -> None:
            _sync(device)
            self.run.epoch_s.append(time.perf_counter() - self.starts[-1])

    return EpochClock()


def synthetic_benchmark(
    n_train: int, n_test: int, shape: tuple[int, ...], n_classes: int, seed: int = 0
) -> Any:
    """One experience of random tensors shaped like a real data set (when it is absent)."""
    from avalanche.benchmarks import nc_benchmark
    from avalanche.benchmarks.utils import _make_taskaware_tensor_classification_dataset

    g = torch.Generator().manual_seed(seed)

    def dataset(n: int) -> Any:
        x = torch.randn(n, *shape, generator=g)
        y = torch.randint(0, n_classes, (n,), generator=g)
        y[: min(n, n_classes)] = torch.arange(min(n, n_classes))  # every class present
        return _make_taskaware_tensor_classification_dataset(x, y, targets=y, task_labels=0)

    return nc_benchmark(
        dataset(n_train),
        dataset(n_test),
        n_experiences=1,
        task_labels=False,
        shuffle=False,
        fixed_class_order=list(range(n_classes)),
        class_ids_from_zero_from_first_exp=False,
        class_ids_from_zero_in_each_exp=False,
    )


def paper_stream(
    name: str, data_root: str | Path, samples: int | None, synthetic: bool
) -> tuple[Any, str]:
    """(benchmark, source) of ``paper_fmnist``/``paper_cifar100``: real data when present,
    else random tensors of the real shapes."""
    from moe_cl.benchmarks import DataError, make_benchmark

    if not synthetic:
        try:
            bundle = make_benchmark(
                name,
                data_root=data_root,
                seed=0,
                max_train_samples=samples,
                max_test_samples=None if samples is None else max(samples // 6, 100),
            )
            n = len(bundle.benchmark.train_stream[0].dataset)
            return bundle.benchmark, f"real {name} ({n} training samples)"
        except DataError as error:
            reason = str(error).splitlines()[0]
        print(f"[bench] {name}: real data not found ({reason}); using synthetic tensors")
    full = {"paper_fmnist": (60_000, 10_000), "paper_cifar100": (50_000, 10_000)}[name]
    n_train = full[0] if samples is None else samples
    n_test = full[1] if samples is None else max(samples // 6, 100)
    shape, classes = ((1, 28, 28), 10) if name == "paper_fmnist" else ((3, 32, 32), 100)
    bm = synthetic_benchmark(n_train, n_test, shape, classes)
    return bm, f"synthetic {name}-shaped tensors ({n_train} training samples)"


def _fmnist_model(seed: int = 0) -> Any:
    from moe_cl.models import MixtureOfExperts

    torch.manual_seed(seed)
    return MixtureOfExperts(architecture="fmnist", gate="attentive", num_experts=5)


def _timed_moe_strategy(model: Any, *, epochs: int, batch: int, device: torch.device,
                        **options: Any) -> tuple[Any, Any]:
    """A quiet ``MoEStrategy`` (Adam lr 1e-3) with a per-epoch clock; returns (strategy, clock)."""
    from moe_cl.strategies import MoEStrategy

    clock = _epoch_clock(device)
    strategy = MoEStrategy(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
        train_mb_size=batch,
        train_epochs=epochs,
        eval_mb_size=1024,
        device=device,
        plugins=[clock],
        evaluator=_quiet_evaluator(),
        **options,
    )
    return strategy, clock


def run_moe_strategy(
    experience: Any, *, epochs: int, batch: int, device: torch.device, fast_data: bool
) -> EpochRun:
    """``MoEStrategy.train`` on one experience: the whole call and each epoch."""
    strategy, clock = _timed_moe_strategy(_fmnist_model(), epochs=epochs, batch=batch,
                                          device=device, fast_data=fast_data)
    return _timed_train(strategy, experience, clock, device)


def run_naive(experience: Any, *, epochs: int, batch: int, device: torch.device) -> EpochRun:
    """Avalanche's ``Naive`` with the same model class and ``NLLLoss`` on its log-probs."""
    from avalanche.training import Naive

    model = _fmnist_model()
    clock = _epoch_clock(device)
    strategy = Naive(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
        criterion=torch.nn.NLLLoss(),
        train_mb_size=batch,
        train_epochs=epochs,
        eval_mb_size=1024,
        device=device,
        plugins=[clock],
        evaluator=_quiet_evaluator(),
    )
    return _timed_train(strategy, experience, clock, device)


def _timed_train(strategy: Any, experience: Any, clock: Any, device: torch.device) -> EpochRun:
    _sync(device)
    start = time.perf_counter()
    strategy.train(experience)
    _sync(device)
    clock.run.total_s = time.perf_counter() - start
    return clock.run


def _gather_with_loader(dataset: Any) -> tuple[Tensor, Tensor]:
    """The generic way to gather a dataset (one __getitem__ per sample): the baseline of the
    index-arithmetic gather MoEStrategy's fast path uses."""
    xs, ys = [], []
    for batch in torch.utils.data.DataLoader(dataset, batch_size=4096, num_workers=0):
        xs.append(batch[0])
        ys.append(batch[1])
    return torch.cat(xs), torch.cat(ys)


def experience_tensors(experience: Any, device: torch.device) -> tuple[Tensor, Tensor]:
    from moe_cl.data import dataset_tensors

    x, y, _ = dataset_tensors(experience.dataset)
    return x.to(device), y.to(device)


def run_plain_loop(
    experience: Any,
    *,
    epochs: int,
    batch: int,
    device: torch.device,
    tensors: tuple[Tensor, Tensor] | None = None,
) -> EpochRun:
    """The same model and optimiser in a bare PyTorch loop over pre-loaded tensors."""
    model = _fmnist_model()
    model.register_classes(experience)  # the same output mask MoEStrategy's adaptation sets
    model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = tensors if tensors is not None else experience_tensors(experience, device)
    n = len(y)
    run = EpochRun(0.0)
    _sync(device)
    start = time.perf_counter()
    for _ in range(epochs):
        epoch_start = time.perf_counter()
        order = torch.randperm(n, device=device)
        seen = 0
        for first in range(0, n, batch):
            index = order[first : first + batch]
            xb, yb = x.index_select(0, index), y.index_select(0, index)
            optimizer.zero_grad(set_to_none=True)
            loss = F.nll_loss(model(xb), yb)
            loss.backward()
            optimizer.step()
            seen += len(yb)
        _sync(device)
        run.epoch_s.append(time.perf_counter() - epoch_start)
        run.samples.append(seen)
    run.total_s = time.perf_counter() - start
    return run


EPOCH_VARIANTS = (
    "plain PyTorch loop",
    "MoEStrategy fast_data=True",
    "MoEStrategy fast_data=False",
    "Avalanche Naive",
)


def epoch_runner(
    variant: str, experience: Any, sizes: Sizes, device: torch.device, epochs: int
) -> Callable[[], EpochRun]:
    kw = {"epochs": epochs, "batch": sizes.epoch_batch, "device": device}
    if variant == "plain PyTorch loop":
        tensors = experience_tensors(experience, device)
        return lambda: run_plain_loop(experience, tensors=tensors, **kw)
    if variant == "MoEStrategy fast_data=True":
        return lambda: run_moe_strategy(experience, fast_data=True, **kw)
    if variant == "MoEStrategy fast_data=False":
        return lambda: run_moe_strategy(experience, fast_data=False, **kw)
    if variant == "Avalanche Naive":
        return lambda: run_naive(experience, **kw)
    raise ValueError(f"unknown epoch variant {variant!r}")


def bench_epoch(
    sizes: Sizes, device: torch.device, *, data_root: str | Path, synthetic: bool, **_: Any
) -> dict[str, Any]:
    bm, source = paper_stream("paper_fmnist", data_root, sizes.epoch_samples, synthetic)
    experience = bm.train_stream[0]
    n = len(experience.dataset)
    epochs = max(sizes.epoch_epochs, 1)

    # MoEStrategy's fast path gathers an experience by index arithmetic, but falls back to
    # one __getitem__ per sample once the dataset has been read sample by sample (Avalanche
    # then materialises its class-remapping transform). The other variants read `experience`
    # that way, so the fast variant gets its own, never-indexed copy of the benchmark.
    fast_bm, _ = paper_stream("paper_fmnist", data_root, sizes.epoch_samples, synthetic)
    fast_experience = fast_bm.train_stream[0]

    # Gathering an experience into tensors, once per experience (outside the epoch times).
    from moe_cl.data import dataset_tensors

    loader, fresh, touched = (
        "DataLoader, chunks of 4096",
        "moe_cl.data.dataset_tensors, dataset never indexed",
        "moe_cl.data.dataset_tensors, dataset indexed before",
    )
    reps, warm = min(sizes.repeats, 3), min(sizes.warmup, 1)
    gather = measure(
        {fresh: lambda: dataset_tensors(fast_experience.dataset)},
        repeats=reps,
        warmup=warm,
        device=device,
    )
    gather.update(
        measure(
            {
                loader: lambda: _gather_with_loader(experience.dataset),
                touched: lambda: dataset_tensors(experience.dataset),
            },
            repeats=reps,
            warmup=warm,
            device=device,
        )
    )
    gather = {k: gather[k] for k in (loader, fresh, touched)}

    # Warm-up: every variant once on a small stand-in with the same batch shapes (full batches
    # and the same last partial one), so that one-time costs (lazy imports, kernel selection
    # per shape, first allocations) land outside the timed runs.
    if sizes.warmup > 0:
        warm_n = min(n, 2 * sizes.epoch_batch + n % sizes.epoch_batch)
        warm_exp = synthetic_benchmark(warm_n, 100, (1, 28, 28), 10).train_stream[0]
        for variant in EPOCH_VARIANTS:
            epoch_runner(variant, warm_exp, sizes, device, 1)()

    runners = {
        v: epoch_runner(
            v,
            fast_experience if v == "MoEStrategy fast_data=True" else experience,
            sizes,
            device,
            epochs,
        )
        for v in EPOCH_VARIANTS
    }
    runs: dict[str, list[EpochRun]] = {v: [] for v in EPOCH_VARIANTS}
    gc.collect()
    for _ in range(sizes.epoch_repeats):
        for variant, runner in runners.items():
            runs[variant].append(runner())

    whole = {v: [r.total_s for r in rs] for v, rs in runs.items()}
    first = {v: [r.epoch_s[0] for r in rs] for v, rs in runs.items()}
    steady = {v: [t for r in rs for t in r.epoch_s[1:]] for v, rs in runs.items()}
    base = "plain PyTorch loop"
    rows = rows_for(f"train() call, {epochs} epoch(s)", whole, base)
    rows += rows_for("epoch 1 (inside the call)", first, base)
    notes_rows: dict[str, str] = {}
    if epochs > 1:
        for v, t in steady.items():
            notes_rows[v] = f"{n / statistics.median(t):,.0f} samples/s"
        rows += rows_for(f"steady epoch (epochs 2..{epochs})", steady, base, notes_rows)
    gather_case = f"gather {n} samples into tensors"
    rows += rows_for(gather_case, gather, loader)

    ref = steady if epochs > 1 else first
    label = "steady epoch" if epochs > 1 else "epoch 1"
    moe, plain, naive = (
        statistics.median(ref[v]) for v in ("MoEStrategy fast_data=True", base, "Avalanche Naive")
    )
    wmoe, wplain, wnaive = (
        statistics.median(whole[v]) for v in ("MoEStrategy fast_data=True", base, "Avalanche Naive")
    )
    targets = [
        target(f"MoEStrategy (fast) / plain loop, {label}", moe / plain, 1.15, at_most=True),
        target(f"Naive / MoEStrategy (fast), {label}", naive / moe, 1.5),
        target(
            "MoEStrategy (fast) / plain loop, whole train() call", wmoe / wplain, 1.15, at_most=True
        ),
        target("Naive / MoEStrategy (fast), whole train() call", wnaive / wmoe, 1.5),
    ]
    info = {
        "data": source,
        "samples": n,
        "epochs_per_call": epochs,
        "batch": sizes.epoch_batch,
        "model": "MixtureOfExperts(architecture='fmnist', gate='attentive', num_experts=5)",
        "optimizer": "Adam(lr=1e-3)",
        "samples_per_epoch": {v: [s for r in rs for s in r.samples] for v, rs in runs.items()},
        "iterations_per_epoch": -(-n // sizes.epoch_batch),
    }
    return {
        "title": f"one training epoch of paper_fmnist, attentive MoE M=5, batch "
        f"{sizes.epoch_batch} ({source})",
        "rows": rows,
        "targets": targets,
        "info": info,
        "notes": [
            "speed-up < 1 means slower than the plain loop. train() includes model adaptation, "
            "gathering the experience (fast path) and creating loaders; epoch 1 also pays "
            "first-touch allocations; steady epochs are the fair per-epoch comparison.",
            "MoEStrategy fast_data=True trains on its own copy of the benchmark that nothing "
            "has indexed: once a dataset has been read sample by sample, its gather falls back "
            "to a per-sample DataLoader (gather rows).",
        ],
    }


# ----------------------------------------------------------------------------- d. top-k


class BalancedRouting(nn.Module):
    """A gate with the distilled gate's cost whose top-1 choice is spread evenly over the
    experts (sample n -> expert n mod M), as a trained, balanced gate would route; an untrained
    gate tends to send every sample to the same expert."""

    needs_expert_hidden = False

    def __init__(self, gate: nn.Module) -> None:
        super().__init__()
        self.inner = gate
        self.num_experts = gate.num_experts

    def forward(
        self, x: Tensor, expert_hidden: Tensor | None = None, expert_mask: Tensor | None = None
    ) -> Tensor:
        g = self.inner(x, None, expert_mask)
        favoured = torch.arange(len(x), device=x.device) % g.shape[-1]
        return (g + F.one_hot(favoured, g.shape[-1]).to(g.dtype)) / 2


def topk_cases(
    arch_name: str, num_experts: int, batch: int, device: torch.device
) -> tuple[dict[str, Fn], dict[str, Fn], dict[str, Any]]:
    """Inference functions of a distilled mixture: whole model, and experts only (routing
    computed beforehand), plus routing statistics."""
    torch.manual_seed(0)
    arch = get_architecture(arch_name)
    teacher = build_mixture(arch, gate="attentive", num_experts=num_experts)
    core = distilled_gate(teacher, arch).to(device).eval()
    x = torch.randn(batch, *arch.input_shape, device=device)
    with torch.no_grad():
        gate = core.gate(x)
    routes = {}
    for k in (1, 2):
        experts = gate.topk(k, -1).indices.flatten()
        routes[k] = (torch.arange(batch, device=device).repeat_interleave(k), experts)
    every = torch.arange(batch, device=device)
    balanced = (every, every % num_experts)
    counts = torch.bincount(routes[1][1], minlength=num_experts)

    def no_grad(fn: Fn) -> Fn:
        def call() -> object:
            with torch.no_grad():
                return fn()

        return call

    spread = MixtureOfExpertsCore(core.bank, BalancedRouting(core.gate)).eval()
    whole = {
        "dense": no_grad(lambda: core(x)),
        "top-2": no_grad(lambda: core.forward_top_k(x, 2)),
        "top-1": no_grad(lambda: core.forward_top_k(x, 1)),
        "top-1, balanced routing": no_grad(lambda: spread.forward_top_k(x, 1)),
        "gate alone": no_grad(lambda: core.gate(x)),
    }
    experts_only = {
        "dense experts": no_grad(lambda: core.bank(x)),
        "top-2 experts": no_grad(lambda: core.bank.forward_selected(x, *routes[2])),
        "top-1 experts": no_grad(lambda: core.bank.forward_selected(x, *routes[1])),
        "top-1 experts, balanced routing": no_grad(
            lambda: core.bank.forward_selected(x, *balanced)
        ),
    }
    stats = {
        "top1_active_experts": int((counts > 0).sum()),
        "top1_max_samples_per_expert": int(counts.max()),
        "balanced_samples_per_expert": -(-batch // num_experts),
    }
    return whole, experts_only, stats


def bench_topk(sizes: Sizes, device: torch.device, **_: Any) -> dict[str, Any]:
    rows, targets, info = [], [], {}
    m, batch = sizes.topk_experts, sizes.topk_batch
    for arch_name in ("cifar100", "cifar100_h256"):
        whole, experts_only, stats = topk_cases(arch_name, m, batch, device)
        t_whole = measure(whole, repeats=sizes.repeats, warmup=sizes.warmup, device=device)
        t_exp = measure(experts_only, repeats=sizes.repeats, warmup=sizes.warmup, device=device)
        case = f"{arch_name} M={m} B={batch}"
        gate_share = _median(t_whole, "gate alone") / _median(t_whole, "dense")
        notes = {
            "dense": f"gate = {gate_share:.0%} of dense",
            "top-1": f"gate = {_median(t_whole, 'gate alone') / _median(t_whole, 'top-1'):.0%}"
            " of top-1",
        }
        rows += rows_for(f"{case}, whole model", t_whole, "dense", notes)
        rows += rows_for(f"{case}, experts only", t_exp, "dense experts")
        targets.append(
            target(
                f"top-1 vs dense, {case}, whole model",
                _median(t_whole, "dense") / _median(t_whole, "top-1"),
                2.0,
            )
        )
        targets.append(
            target(
                f"top-1 vs dense, {case}, gate excluded",
                _median(t_exp, "dense experts") / _median(t_exp, "top-1 experts"),
                2.0,
            )
        )
        info[case] = {"gate_fraction_of_dense": gate_share, **stats}
    return {
        "title": "top-k vs dense inference, distilled softmax gate (eval mode, no_grad)",
        "rows": rows,
        "targets": targets,
        "info": info,
        "notes": [
            "The gate is untrained (random weights): its top-1 routing tends to send every "
            "sample to one expert. 'balanced routing' rows pay the same gate but send sample n "
            "to expert n mod M, as a trained balanced gate would (forward_selected pads each "
            "active expert to the largest count, so routing balance matters)."
        ],
    }


# ----------------------------------------------------------------------------- e. memory

MemoryFactory = Callable[[Sizes, torch.device, dict[str, Any]], Fn]


def _epoch_memory_case(variant: str) -> MemoryFactory:
    def make(sizes: Sizes, device: torch.device, ctx: dict[str, Any]) -> Fn:
        bm, _ = paper_stream(
            "paper_fmnist", ctx["data_root"], sizes.epoch_samples, ctx["synthetic"]
        )
        return epoch_runner(variant, bm.train_stream[0], sizes, device, epochs=1)

    return make


def _bank_memory_case(arch_name: str, m: int, batch_attr: str, variant: str) -> MemoryFactory:
    def make(sizes: Sizes, device: torch.device, ctx: dict[str, Any]) -> Fn:
        batch = getattr(sizes, batch_attr)
        return bank_cases(arch_name, m, batch, sizes.bank_chunk, device)[0][variant]

    return make


def _ls_memory_case(m: int, variant: str) -> MemoryFactory:
    def make(sizes: Sizes, device: torch.device, ctx: dict[str, Any]) -> Fn:
        return ls_cases(sizes.ls_batch, m, device)[0][variant]

    return make


def _topk_memory_case(arch_name: str, variant: str) -> MemoryFactory:
    def make(sizes: Sizes, device: torch.device, ctx: dict[str, Any]) -> Fn:
        return topk_cases(arch_name, sizes.topk_experts, sizes.topk_batch, device)[0][variant]

    return make


def _memory_cases() -> dict[str, MemoryFactory]:
    cases: dict[str, MemoryFactory] = {}
    for arch_name, m, batch_attr in (
        ("mnist", 5, "bank_small_batch"),
        ("cifar100", 20, "bank_large_batch"),
    ):
        for short, variant in (("bank", "ExpertBank"), ("loop", "loop over experts")):
            cases[f"bank/{arch_name}/{short}"] = _bank_memory_case(
                arch_name, m, batch_attr, variant
            )
    for short, variant in (
        ("gram", "G G^T (sample_similarity_terms)"),
        ("pairs", "double loop over expert pairs"),
    ):
        cases[f"ls/M=20/{short}"] = _ls_memory_case(20, variant)
    for arch_name in ("cifar100", "cifar100_h256"):
        for variant in ("dense", "top-1"):
            cases[f"topk/{arch_name}/{variant}"] = _topk_memory_case(arch_name, variant)
    for short, variant in (
        ("plain", "plain PyTorch loop"),
        ("moe_fast", "MoEStrategy fast_data=True"),
        ("moe_loaders", "MoEStrategy fast_data=False"),
        ("naive", "Avalanche Naive"),
    ):
        cases[f"epoch/{short}"] = _epoch_memory_case(variant)
    return cases


MEMORY_CASES = _memory_cases()
MEMORY_DESCRIPTIONS = {
    "bank": "one forward + backward (run twice)",
    "ls": "one forward + backward (run twice)",
    "topk": "one inference (run twice)",
    "epoch": "one train() call of 1 epoch",
}


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
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_memory_here(
    name: str, sizes: Sizes, device: torch.device, ctx: dict[str, Any]
) -> dict[str, Any]:
    """Peak memory of one case in this process (meant for a fresh child, or CUDA)."""
    fn = MEMORY_CASES[name](sizes, device, ctx)
    runs = 1 if name.startswith("epoch/") else 2
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) / 2**20
        for _ in range(runs):
            fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        return {
            "case": name,
            "kind": "cuda_allocated",
            "before_mb": before,
            "peak_mb": peak,
            "extra_mb": peak - before,
        }
    before = _rss_mb()
    exact = _reset_peak_rss()
    for _ in range(runs):
        fn()
    peak = _peak_rss_mb()
    return {
        "case": name,
        "kind": "cpu_rss" if exact else "cpu_rss_since_start",
        "before_mb": before,
        "peak_mb": peak,
        "extra_mb": peak - before,
    }


def _child_command(name: str, args: argparse.Namespace) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "moe_cl.bench",
        "--child",
        name,
        "--device",
        "cpu",
        "--preset",
        args.preset,
        "--data-root",
        str(args.data_root),
    ]
    return cmd + (["--synthetic"] if args.synthetic else [])


def _run_child(name: str, args: argparse.Namespace) -> dict[str, Any]:
    # Two children run at once on this machine's cores: one intra-op thread each, so they do
    # not oversubscribe the cores (thread count barely changes memory, it does change speed).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(
        _child_command(name, args),
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


def bench_memory(
    sizes: Sizes, device: torch.device, *, args: argparse.Namespace, **_: Any
) -> dict[str, Any]:
    ctx = {"data_root": args.data_root, "synthetic": args.synthetic}
    if device.type == "cuda":  # in this process and cheap: every case
        results = [measure_memory_here(n, sizes, device, ctx) for n in MEMORY_CASES]
    else:  # a fresh process per case; presets may pick a few, to save the start-up time
        names = [
            n for n in MEMORY_CASES if sizes.memory_cases in (None, ()) or n in sizes.memory_cases
        ]
        workers = max(1, min(2, os.cpu_count() or 1))
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(lambda n: _run_child(n, args), names))
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
            "Runs: " + "; ".join(f"{k}: {v}" for k, v in MEMORY_DESCRIPTIONS.items()),
        ],
    }


# ----------------------------------------------------------------------------- gpu run


def _test_accuracy(strategy: Any, test_stream: Any) -> float | None:
    results = strategy.eval(test_stream)
    for key, value in results.items():
        if key.startswith("Top1_Acc_Stream/eval_phase/test_stream"):
            return float(value)
    return None


def _long_run(
    arch_name: str,
    bm: Any,
    source: str,
    *,
    epochs: int,
    batch: int,
    num_experts: int,
    device: torch.device,
    augment: Callable[[Tensor], Tensor] | None,
) -> dict[str, Any]:
    from moe_cl.models import MixtureOfExperts

    torch.manual_seed(0)
    model = MixtureOfExperts(architecture=arch_name, gate="attentive", num_experts=num_experts)
    strategy, clock = _timed_moe_strategy(model, epochs=epochs, batch=batch, device=device,
                                          batch_augment=augment, fast_data=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    run = _timed_train(strategy, bm.train_stream[0], clock, device)
    n = run.samples[0]
    steady = run.epoch_s[1:] or run.epoch_s
    out = {
        "data": source,
        "architecture": arch_name,
        "num_experts": num_experts,
        "batch": batch,
        "epochs": epochs,
        "train_call_s": run.total_s,
        "epoch_s": run.epoch_s,
        "samples_per_epoch": n,
        "samples_per_s_steady": n / statistics.median(steady),
        "samples_per_s_whole_call": n * epochs / run.total_s,
    }
    if device.type == "cuda":
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    start = time.perf_counter()
    out["test_accuracy"] = _test_accuracy(strategy, bm.test_stream)
    out["eval_s"] = time.perf_counter() - start
    return out


def bench_gpu(
    sizes: Sizes, device: torch.device, *, data_root: str | Path, synthetic: bool, **_: Any
) -> dict[str, Any]:
    from moe_cl.benchmarks import cifar_batch_augment

    fm_bm, fm_source = paper_stream("paper_fmnist", data_root, sizes.gpu_fmnist_samples, synthetic)
    fmnist = _long_run(
        "fmnist",
        fm_bm,
        fm_source,
        epochs=sizes.gpu_epochs,
        batch=512,
        num_experts=5,
        device=device,
        augment=None,
    )
    del fm_bm
    cf_bm, cf_source = paper_stream("paper_cifar100", data_root, sizes.gpu_cifar_samples, synthetic)
    cifar = _long_run(
        "cifar100",
        cf_bm,
        cf_source,
        epochs=1,
        batch=256,
        num_experts=20,
        device=device,
        augment=cifar_batch_augment,
    )
    rows = []
    for name, res in (("paper_fmnist", fmnist), ("paper_cifar100", cifar)):
        case = f"{name}, {res['epochs']} epoch(s), {res['samples_per_epoch']} samples"
        rows.append(
            _row(
                case,
                "train() call",
                [res["train_call_s"]],
                None,
                f"{res['samples_per_s_whole_call']:,.0f} samples/s",
            )
        )
        steady = res["epoch_s"][1:] or res["epoch_s"]
        rows.append(
            _row(
                case,
                "epoch (median)",
                steady,
                None,
                f"{res['samples_per_s_steady']:,.0f} samples/s",
            )
        )
    return {
        "title": "paper-length runs on the fast data path (MoEStrategy, attentive gate)",
        "rows": rows,
        "targets": [],
        "info": {"paper_fmnist": fmnist, "paper_cifar100": cifar},
        "notes": ["test_accuracy is meaningless on synthetic data."],
    }


# ----------------------------------------------------------------------------- report


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "avalanche": _version("avalanche-lib"),
        "device": str(device),
        "load_average_start": list(os.getloadavg()),
    }
    if device.type == "cuda":
        info["cuda_device"] = torch.cuda.get_device_name(device)
        info["cuda_version"] = torch.version.cuda
    return info


def _fmt_ms(seconds: float) -> str:
    ms = seconds * 1000
    return f"{ms:,.1f}" if ms < 10_000 else f"{ms:,.0f}"


def format_section(name: str, section: dict[str, Any]) -> str:
    lines = [f"[{name}] {section['title']}"]
    if section["rows"]:
        width_case = max(len(r["case"]) for r in section["rows"])
        width_var = max(len(r["variant"]) for r in section["rows"])
        head = (
            f"  {'case':<{width_case}}  {'variant':<{width_var}}  {'median ms':>10}  "
            f"{'min ms':>10}  {'vs base':>8}  note"
        )
        lines += [head, "  " + "-" * (len(head) - 2)]
        last_case = None
        for r in section["rows"]:
            case = r["case"] if r["case"] != last_case else ""
            last_case = r["case"]
            ratio = "" if r["speedup"] is None else f"{r['speedup']:.2f}x"
            lines.append(
                f"  {case:<{width_case}}  {r['variant']:<{width_var}}  "
                f"{_fmt_ms(r['median_s']):>10}  {_fmt_ms(r['min_s']):>10}  {ratio:>8}  "
                f"{r['note']}".rstrip()
            )
    if name == "memory":
        for res in section["info"]["results"]:
            if "error" in res:
                lines.append(f"  {res['case']:<28} ERROR {res['error']}")
            else:
                lines.append(
                    f"  {res['case']:<28} before {res['before_mb']:9,.1f} MB   peak "
                    f"{res['peak_mb']:9,.1f} MB   extra {res['extra_mb']:9,.1f} MB"
                )
    elif name == "gpu":
        for key, res in section["info"].items():
            acc = res.get("test_accuracy")
            lines.append(f"  {key}: test accuracy {acc if acc is None else f'{acc:.4f}'}")
    for key, value in section.get("info", {}).items():
        if name not in ("memory", "gpu"):
            lines.append(f"  {key}: {value}")
    for t in section["targets"]:
        verdict = "MET" if t["met"] else "NOT MET"
        lines.append(
            f"  target {t['target']}: {t['value']:.2f} (want {t['kind']} {t['threshold']}) "
            f"{verdict}"
        )
    for note in section.get("notes", []):
        lines.append(f"  note: {note}")
    others = section.get("cpu_share_of_other_processes")
    tail = f"  ({section.get('wall_s', 0):.1f} s"
    if others is not None:
        tail += f"; other processes used {others:.0%} of the CPUs meanwhile"
        if others > 0.1 and name != "memory":
            tail += ": WARNING, shared machine, timings unreliable"
    return "\n".join([*lines, tail + ")", ""])


# ----------------------------------------------------------------------------- entry point

BENCHES: dict[str, Callable[..., dict[str, Any]]] = {
    "bank": bench_bank,
    "layers": bench_layers,
    "ls": bench_ls,
    "epoch": bench_epoch,
    "topk": bench_topk,
    "memory": bench_memory,
    "gpu": bench_gpu,
}


PROG = "python -m moe_cl.bench"


def resolve_device(name: str) -> torch.device:
    """The run command's device rule, as a usage error (exit status 2) of this command."""
    from moe_cl.experiment import resolve_device as resolve

    try:
        return resolve(name)
    except ValueError as err:
        print(f"{PROG}: error: --device {name}: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def json_path_problem(path: Path) -> str | None:
    """Why the results could not be written to ``path`` (None: they can)."""
    from moe_cl.run_folder import folder_problem

    if path.is_dir():
        return "is a folder; give the path of a JSON file"
    return folder_problem(path.absolute().parent, writable=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--quick",
        action="store_const",
        dest="preset",
        const="quick",
        help="smaller sizes and fewer repeats (under a minute on 2 cores)",
    )
    size.add_argument(
        "--tiny",
        action="store_const",
        dest="preset",
        const="tiny",
        help="minimal sizes, one repeat (for tests)",
    )
    size.add_argument("--preset", choices=sorted(PRESETS), help=argparse.SUPPRESS)
    p.add_argument("--repeats", type=int, help="timed repeats per measurement (median reported)")
    p.add_argument(
        "--json",
        type=Path,
        default=Path("bench_results.json"),
        help="where to write the results (default: bench_results.json)",
    )
    p.add_argument(
        "--only",
        nargs="+",
        choices=SECTIONS,
        metavar="NAME",
        help=f"sections to run, among {', '.join(SECTIONS)} (default: all but gpu)",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument(
        "--data-root",
        type=Path,
        default=Path("data"),
        help="where data sets are (or are prepared); default: data",
    )
    p.add_argument(
        "--synthetic",
        action="store_true",
        help="use synthetic tensors even where real data are present",
    )
    p.add_argument("--gpu-epochs", type=int, help="epochs of paper_fmnist in the gpu section")
    p.add_argument(
        "--epoch-batch",
        type=int,
        help="mini-batch of the epoch section (default 512, the paper's); smaller batches "
        "weigh per-iteration overheads more",
    )
    p.add_argument(
        "--threads",
        type=int,
        help="torch intra-op threads (default: torch's own default, left alone)",
    )
    p.add_argument("--child", help=argparse.SUPPRESS)  # one memory case, in a fresh process
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.preset = args.preset or "full"
    for option in ("repeats", "threads", "epoch_batch", "gpu_epochs"):
        value = getattr(args, option)
        if value is not None and value < 1:
            p.error(f"--{option.replace('_', '-')} must be >= 1, got {value}")
    if not args.child:
        problem = json_path_problem(args.json)
        if problem:
            p.error(f"--json {args.json}: {problem}")
    return args


def sizes_for(args: argparse.Namespace) -> Sizes:
    sizes = PRESETS[args.preset]
    if args.repeats is not None:
        sizes = replace(sizes, repeats=args.repeats)
    if args.gpu_epochs is not None:
        sizes = replace(sizes, gpu_epochs=args.gpu_epochs)
    if args.epoch_batch is not None:
        sizes = replace(sizes, epoch_batch=args.epoch_batch)
    return sizes


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Run the chosen sections, printing each table as it completes; return the results."""
    device = resolve_device(args.device)
    sizes = sizes_for(args)
    sections = list(dict.fromkeys(args.only or DEFAULT_SECTIONS))
    result: dict[str, Any] = {
        "machine": machine_info(device),
        "command": " ".join(["python -m moe_cl.bench", *args.argv]),
        "preset": args.preset,
        "sizes": asdict(sizes),
        "sections": {},
    }
    start = time.perf_counter()
    for name in sections:
        t0, share = time.perf_counter(), CpuShare()
        section = BENCHES[name](
            sizes, device, data_root=args.data_root, synthetic=args.synthetic, args=args
        )
        section["wall_s"] = time.perf_counter() - t0
        section["cpu_share_of_other_processes"] = share.others()
        result["sections"][name] = section
        print(format_section(name, section), flush=True)
    result["elapsed_s"] = time.perf_counter() - start
    result["machine"]["load_average_end"] = list(os.getloadavg())
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.child:
        ctx = {"data_root": args.data_root, "synthetic": args.synthetic}
        res = measure_memory_here(args.child, sizes_for(args), resolve_device(args.device), ctx)
        print(json.dumps(res), flush=True)
        return 0
    result = run_bench(args)
    write_json(args.json, result)  # whole or not at all
    m = result["machine"]
    print(
        f"{m['date']}  {m['cpu_model']}  cpus={m['cpu_count']}  torch threads="
        f"{m['torch_threads']}  device={m['device']}  total {result['elapsed_s']:.0f} s"
        f"  -> {args.json}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
