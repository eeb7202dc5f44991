"""Section ``epoch``: one training epoch of ``paper_fmnist`` with the paper's attentive MoE
through ``MoEStrategy`` (fast tensor path and Avalanche loaders; the fast path also with the
reference code's train error, a second no-grad forward per step, to price that measurement),
a plain PyTorch loop and Avalanche's ``Naive``; and each of the paper's three mixtures
(original softmax gate, attentive, attentive + L_s) on the fast path with today's step and with
the ``baseline`` step (the layouts before issue 16, :data:`BASELINE_LAYOUTS`), side by side in
one run."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin
from avalanche.training import Naive
from torch import Tensor

from moe_cl.bench.harness import Fn, MemoryCases, measure, rows_for, sync, target
from moe_cl.bench.registry import Section
from moe_cl.bench.report import key_value_lines
from moe_cl.bench.settings import Options, Sizes
from moe_cl.bench.training import (
    EpochRun,
    paper_model,
    paper_stream,
    synthetic_benchmark,
    timed_strategy,
    timed_train,
)
from moe_cl.core.layouts import CpuLayouts, use_layouts
from moe_cl.data.tensors import dataset_tensors
from moe_cl.training.plugins import ReferenceTrainError, SampleSimilarityRegularizer
from moe_cl.training.strategies import MoEStrategy

PLAIN, NAIVE = "plain PyTorch loop", "Avalanche Naive"
FAST, LOADERS = "MoEStrategy fast_data=True", "MoEStrategy fast_data=False"
MEASURED = "MoEStrategy fast_data=True + reference train error"
BASELINE = "MoEStrategy fast_data=True, baseline step"
SOFTMAX, SOFTMAX_BASELINE = "original MoE (softmax gate)", "original MoE, baseline step"
LS, LS_BASELINE = "attentive + L_s", "attentive + L_s, baseline step"
# The baseline step's layouts: one-channel convolutions and max-pooling in NCHW on the CPU, as
# before issue 16 (today's: moe_cl.core.layouts.LAYOUTS).
BASELINE_LAYOUTS = CpuLayouts(narrow_channels_last=False)
# L_s as the paper_fmnist preset sets it (strategies/attentive_ls.yaml, by_benchmark).
PAPER_LS = partial(SampleSimilarityRegularizer, beta_s=1e-6, beta_d=1e-2, scaling="reference")
# Each strategy variant: its class and the options that set it apart (``plugins``: the plugin
# classes, a fresh one of each per run; ``gate``: the mixture's gate, attentive by default;
# ``legacy``: the baseline step, its model in ``BASELINE_LAYOUTS``).
STRATEGIES: dict[str, tuple[type, dict[str, Any]]] = {
    FAST: (MoEStrategy, {"fast_data": True}),
    BASELINE: (MoEStrategy, {"fast_data": True, "legacy": True}),
    SOFTMAX: (MoEStrategy, {"fast_data": True, "gate": "softmax"}),
    SOFTMAX_BASELINE: (MoEStrategy, {"fast_data": True, "gate": "softmax", "legacy": True}),
    LS: (MoEStrategy, {"fast_data": True, "plugins": (PAPER_LS,)}),
    LS_BASELINE: (MoEStrategy, {"fast_data": True, "plugins": (PAPER_LS,), "legacy": True}),
    MEASURED: (MoEStrategy, {"fast_data": True, "plugins": (ReferenceTrainError,)}),
    LOADERS: (MoEStrategy, {"fast_data": False}),
    NAIVE: (Naive, {"criterion": torch.nn.NLLLoss()}),  # NLLLoss on the mixture's log-probs
}
EPOCH_VARIANTS = (PLAIN, *STRATEGIES)
# They train on a copy of the benchmark that nothing has indexed.
FAST_PATH = tuple(v for v, (_, options) in STRATEGIES.items() if options.get("fast_data"))
# Today's step and the baseline step of each of the paper's mixtures.
STEPS = {"attentive": (FAST, BASELINE), "original (softmax gate)": (SOFTMAX, SOFTMAX_BASELINE),
         "attentive + L_s": (LS, LS_BASELINE)}


def run_strategy(
    strategy_class: type, experience: Any, *, epochs: int, batch: int, device: torch.device,
    plugins: Sequence[Callable[[], SupervisedPlugin]] = (), gate: str = "attentive",
    legacy: bool = False, **options: Any,
) -> EpochRun:
    """``strategy_class(...).train`` of the mixture with ``gate`` (M = 5) on one experience,
    with a fresh plugin from each of ``plugins``; ``legacy``: with the baseline step."""
    model = paper_model("fmnist", 5, gate=gate)
    if legacy:
        use_layouts(model, BASELINE_LAYOUTS)
    strategy, clock = timed_strategy(strategy_class, model, epochs=epochs, batch=batch,
                                     device=device, plugins=[make() for make in plugins],
                                     **options)
    return timed_train(strategy, experience, clock, device)


def _gather_with_loader(dataset: Any) -> tuple[Tensor, Tensor]:
    """The generic way to gather a dataset (one __getitem__ per sample): the baseline of the
    index-arithmetic gather MoEStrategy's fast path uses."""
    xs, ys = [], []
    for batch in torch.utils.data.DataLoader(dataset, batch_size=4096, num_workers=0):
        xs.append(batch[0])
        ys.append(batch[1])
    return torch.cat(xs), torch.cat(ys)


def experience_tensors(experience: Any, device: torch.device) -> tuple[Tensor, Tensor]:
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
    model = paper_model("fmnist", 5)
    model.register_classes(experience)  # the same output mask MoEStrategy's adaptation sets
    model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = tensors if tensors is not None else experience_tensors(experience, device)
    n = len(y)
    run = EpochRun(0.0)
    sync(device)
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
        sync(device)
        run.epoch_s.append(time.perf_counter() - epoch_start)
        run.samples.append(seen)
    run.total_s = time.perf_counter() - start
    return run


def epoch_runner(
    variant: str, experience: Any, sizes: Sizes, device: torch.device, epochs: int
) -> Callable[[], EpochRun]:
    kw = {"epochs": epochs, "batch": sizes.epoch_batch, "device": device}
    if variant == PLAIN:
        tensors = experience_tensors(experience, device)
        return lambda: run_plain_loop(experience, tensors=tensors, **kw)
    strategy_class, options = STRATEGIES[variant]
    return lambda: run_strategy(strategy_class, experience, **kw, **options)


def _gather_times(fresh_experience: Any, touched_experience: Any, sizes: Sizes,
                  device: torch.device) -> tuple[dict[str, list[float]], str]:
    """Gathering an experience into tensors, once per experience (outside the epoch times);
    also the name of the baseline."""
    loader, fresh, touched = (
        "DataLoader, chunks of 4096",
        "moe_cl.data.tensors.dataset_tensors, dataset never indexed",
        "moe_cl.data.tensors.dataset_tensors, dataset indexed before",
    )
    reps, warm = min(sizes.repeats, 3), min(sizes.warmup, 1)
    gather = measure(
        {fresh: lambda: dataset_tensors(fresh_experience.dataset)},
        repeats=reps,
        warmup=warm,
        device=device,
    )
    gather.update(
        measure(
            {
                loader: lambda: _gather_with_loader(touched_experience.dataset),
                touched: lambda: dataset_tensors(touched_experience.dataset),
            },
            repeats=reps,
            warmup=warm,
            device=device,
        )
    )
    return {k: gather[k] for k in (loader, fresh, touched)}, loader


def run(sizes: Sizes, device: torch.device, options: Options) -> dict[str, Any]:
    samples, data_root, synthetic = sizes.epoch_samples, options.data_root, options.synthetic
    bm, source = paper_stream("paper_fmnist", data_root, samples, synthetic)
    experience = bm.train_stream[0]
    n = len(experience.dataset)
    epochs = max(sizes.epoch_epochs, 1)

    # MoEStrategy's fast path gathers an experience by index arithmetic, but falls back to
    # one __getitem__ per sample once the dataset has been read sample by sample (Avalanche
    # then materialises its class-remapping transform). The other variants read `experience`
    # that way, so the fast variant gets its own, never-indexed copy of the benchmark.
    fast_bm, _ = paper_stream("paper_fmnist", data_root, samples, synthetic)
    fast_experience = fast_bm.train_stream[0]
    gather, loader = _gather_times(fast_experience, experience, sizes, device)

    # Warm-up: every variant once on a small stand-in with the same batch shapes (full batches
    # and the same last partial one), so that one-time costs (lazy imports, kernel selection
    # per shape, first allocations) land outside the timed runs.
    if sizes.warmup > 0:
        warm_n = min(n, 2 * sizes.epoch_batch + n % sizes.epoch_batch)
        warm_exp = synthetic_benchmark(warm_n, 100, (1, 28, 28), 10).train_stream[0]
        for variant in EPOCH_VARIANTS:
            epoch_runner(variant, warm_exp, sizes, device, 1)()

    runners = {
        v: epoch_runner(v, fast_experience if v in FAST_PATH else experience, sizes, device,
                        epochs)
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
    rows = rows_for(f"train() call, {epochs} epoch(s)", whole, PLAIN)
    rows += rows_for("epoch 1 (inside the call)", first, PLAIN)
    if epochs > 1:
        rate = {v: f"{n / statistics.median(t):,.0f} samples/s" for v, t in steady.items()}
        rows += rows_for(f"steady epoch (epochs 2..{epochs})", steady, PLAIN, rate)
    rows += rows_for(f"gather {n} samples into tensors", gather, loader)

    return {
        "title": f"one training epoch of paper_fmnist, the paper's MoE M=5 (attentive unless "
        f"named), batch {sizes.epoch_batch} ({source})",
        "rows": rows,
        "targets": _targets(steady if epochs > 1 else first, whole,
                            "steady epoch" if epochs > 1 else "epoch 1"),
        "info": {
            "data": source,
            "samples": n,
            "epochs_per_call": epochs,
            "batch": sizes.epoch_batch,
            "model": "MixtureOfExperts(architecture='fmnist', gate='attentive', num_experts=5); "
                     f"{SOFTMAX}: gate='softmax'; {LS}: + {_describe(PAPER_LS)}",
            "optimizer": "Adam(lr=1e-3)",
            "samples_per_epoch": {v: [s for r in rs for s in r.samples] for v, rs in runs.items()},
            "iterations_per_epoch": -(-n // sizes.epoch_batch),
        },
        "notes": [
            "speed-up < 1 means slower than the plain loop. train() includes model adaptation, "
            "gathering the experience (fast path) and creating loaders; epoch 1 also pays "
            "first-touch allocations; steady epochs are the fair per-epoch comparison.",
            "MoEStrategy fast_data=True trains on its own copy of the benchmark that nothing "
            "has indexed: once a dataset has been read sample by sample, its gather falls back "
            "to a per-sample DataLoader (gather rows).",
            "+ reference train error: the fast path with ReferenceTrainError (a second no-grad "
            "forward of each mini-batch after its step; train.reference_train_error, on for the "
            "paper_* benchmarks): the ratio to the fast path without it is its cost.",
            "baseline step: the same mixture with the layouts before issue 16 (one-channel "
            "convolutions and max-pooling in NCHW on the CPU: "
            "moe_cl.bench.epoch.BASELINE_LAYOUTS); the ratio baseline / today per mixture is "
            "the step's speed-up.",
        ],
    }


def _targets(epoch: dict[str, list[float]], whole: dict[str, list[float]],
             label: str) -> list[dict[str, Any]]:
    """MoEStrategy's fast path within 10 % of the plain loop, and Naive 1.5x slower than it,
    per epoch (``label``) and over the whole train() call; the reference train error adds at
    most half an epoch more (its forward has no backward); each mixture's step 1.25x faster
    than its baseline step."""
    moe, plain, naive, measured = (statistics.median(epoch[v])
                                   for v in (FAST, PLAIN, NAIVE, MEASURED))
    wmoe, wplain, wnaive = (statistics.median(whole[v]) for v in (FAST, PLAIN, NAIVE))
    steps = [target(f"baseline step / today's step, {mixture}, {label}",
                    statistics.median(epoch[baseline]) / statistics.median(epoch[today]), 1.25)
             for mixture, (today, baseline) in STEPS.items()]
    return [
        target(f"MoEStrategy (fast) / plain loop, {label}", moe / plain, 1.10, at_most=True),
        target(f"MoEStrategy (fast) with / without the reference train error, {label}",
               measured / moe, 1.5, at_most=True),
        target(f"Naive / MoEStrategy (fast), {label}", naive / moe, 1.5),
        target(
            "MoEStrategy (fast) / plain loop, whole train() call", wmoe / wplain, 1.10, at_most=True
        ),
        target("Naive / MoEStrategy (fast), whole train() call", wnaive / wmoe, 1.5),
        *steps,
    ]


def _describe(plugin: partial) -> str:
    """``Name(key=value, ...)`` of a plugin factory."""
    settings = ", ".join(f"{key}={value!r}" for key, value in plugin.keywords.items())
    return f"{plugin.func.__name__}({settings})"


def _memory_case(variant: str, sizes: Sizes, device: torch.device, options: Options) -> Fn:
    bm, _ = paper_stream("paper_fmnist", options.data_root, sizes.epoch_samples,
                         options.synthetic)
    return epoch_runner(variant, bm.train_stream[0], sizes, device, epochs=1)


MEMORY = MemoryCases(
    description="one train() call of 1 epoch",
    runs=1,
    cases={
        "plain": partial(_memory_case, PLAIN),
        "moe_fast": partial(_memory_case, FAST),
        "moe_loaders": partial(_memory_case, LOADERS),
        "naive": partial(_memory_case, NAIVE),
    },
)
SECTION = Section(run=run, info_lines=key_value_lines, memory=MEMORY)
