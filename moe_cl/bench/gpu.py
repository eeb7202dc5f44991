"""Section ``gpu``: a paper-length run (20 epochs of ``paper_fmnist`` on the fast path, then one
epoch of ``paper_cifar100``) for each variant of ``--gpu-variants`` (a precision, optionally
compiled; fp32 alone by default), meant for a lent GPU (see ``scripts/gpu_check.sh``); runs
anywhere."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from moe_cl.bench.harness import row, target
from moe_cl.bench.registry import Section
from moe_cl.bench.settings import Options, Sizes
from moe_cl.bench.training import paper_model, paper_stream, timed_strategy, timed_train
from moe_cl.data.streams import cifar_batch_augment
from moe_cl.training.strategies import MoEStrategy


def _test_accuracy(strategy: Any, test_stream: Any) -> float | None:
    results = strategy.eval(test_stream)
    for key, value in results.items():
        if key.startswith("Top1_Acc_Stream/eval_phase/test_stream"):
            return float(value)
    return None


def variant_options(variant: str) -> dict[str, Any]:
    """MoEStrategy's options for a variant of ``GPU_VARIANTS``: ``PRECISION[+compile]``."""
    precision, _, compiled = variant.partition("+")
    return {"precision": precision, "compile_model": compiled == "compile"}


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
    variant: str,
) -> dict[str, Any]:
    """Train the attentive mixture on the fast path, then evaluate it on the test stream."""
    strategy, clock = timed_strategy(MoEStrategy, paper_model(arch_name, num_experts),
                                     epochs=epochs, batch=batch, device=device,
                                     batch_augment=augment, fast_data=True,
                                     **variant_options(variant))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    run = timed_train(strategy, bm.train_stream[0], clock, device)
    n = run.samples[0]
    steady = run.epoch_s[1:] or run.epoch_s
    out = {
        "data": source,
        "variant": variant,
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


def run(sizes: Sizes, device: torch.device, options: Options) -> dict[str, Any]:
    data_root, synthetic = options.data_root, options.synthetic
    fm_bm, fm_source = paper_stream("paper_fmnist", data_root, sizes.gpu_fmnist_samples, synthetic)
    cf_bm, cf_source = paper_stream("paper_cifar100", data_root, sizes.gpu_cifar_samples, synthetic)
    info, rows = {}, []
    for variant in options.gpu_variants:
        fmnist = _long_run("fmnist", fm_bm, fm_source, epochs=sizes.gpu_epochs, batch=512,
                           num_experts=5, device=device, augment=None, variant=variant)
        cifar = _long_run("cifar100", cf_bm, cf_source, epochs=sizes.gpu_cifar_epochs, batch=256,
                          num_experts=20, device=device, augment=cifar_batch_augment,
                          variant=variant)
        for name, res in (("paper_fmnist", fmnist), ("paper_cifar100", cifar)):
            info[f"{name} {variant}"] = res
            case = f"{name} {variant}, {res['epochs']} epoch(s), {res['samples_per_epoch']} samples"
            call_rate = f"{res['samples_per_s_whole_call']:,.0f} samples/s"
            rows.append(row(case, "train() call", [res["train_call_s"]], None, call_rate))
            steady = res["epoch_s"][1:] or res["epoch_s"]
            steady_rate = f"{res['samples_per_s_steady']:,.0f} samples/s"
            rows.append(row(case, "epoch (median)", steady, None, steady_rate))
    return {
        "title": "paper-length runs on the fast data path (MoEStrategy, attentive gate), "
                 f"variants: {', '.join(options.gpu_variants)}",
        "rows": rows,
        "targets": _targets(info),
        "info": info,
        "notes": ["test_accuracy is meaningless on synthetic data.",
                  "epoch (median): epochs 2.. when there are several (epoch 1 pays cuDNN's "
                  "algorithm search and compilation)."],
    }


def _targets(info: dict[str, Any]) -> list[dict[str, Any]]:
    """bf16 at least 1.5x faster than fp32 per epoch on the CIFAR-100 mixture (its test error
    must match too, which takes full-length runs: not measured here)."""
    fp32, bf16 = (info.get(f"paper_cifar100 {variant}") for variant in ("fp32", "bf16"))
    if fp32 is None or bf16 is None:
        return []
    return [target("paper_cifar100 bf16 / fp32 samples per second, epoch (median)",
                   bf16["samples_per_s_steady"] / fp32["samples_per_s_steady"], 1.5)]


def info_lines(info: dict[str, Any]) -> list[str]:
    lines = []
    for key, res in info.items():
        acc = res.get("test_accuracy")
        lines.append(f"  {key}: test accuracy {acc if acc is None else f'{acc:.4f}'}")
    return lines


SECTION = Section(run=run, info_lines=info_lines)
