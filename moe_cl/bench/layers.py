"""Section ``layers``: diagnostics below the bank.

A training step of each paper mixture with its networks pooling before the ReLU (the zoo's
order) against the paper's order (checked equal bit for bit), and each CIFAR-100 expert
convolution stacked against separate per expert.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_cl.bench.harness import Fn, measure, rows_for
from moe_cl.bench.registry import Section
from moe_cl.bench.report import key_value_lines
from moe_cl.bench.settings import Options, Sizes
from moe_cl.core.bank import Conv, MaxPool, ReLU
from moe_cl.core.mixture import MixtureOfExpertsCore
from moe_cl.core.zoo import build_mixture, get_architecture

PAPER, ZOO = "paper order (ReLU, then pool)", "zoo order (pool, then ReLU)"


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
    fns = {PAPER: step(paper), ZOO: step(zoo)}
    return fns, {"layer_order_differs": differs, "outputs_and_gradients_identical": same}


def conv_cases(
    layer: Conv, num_experts: int, batch: int, size: int, device: torch.device
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


def run(sizes: Sizes, device: torch.device, options: Options) -> dict[str, Any]:
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
        rows += rows_for(case, times, PAPER)
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


SECTION = Section(run=run, info_lines=key_value_lines)
