"""Section ``topk``: top-1 / top-2 inference against dense inference of a distilled
(softmax-gate) mixture, with and without the gate."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_cl.bench.harness import Fn, MemoryCases, measure, median, rows_for, target
from moe_cl.bench.registry import Section
from moe_cl.bench.report import key_value_lines
from moe_cl.bench.settings import Options, Sizes
from moe_cl.core.mixture import MixtureOfExpertsCore
from moe_cl.core.zoo import build_mixture, distilled_mixture, get_architecture

ARCHITECTURES = ("cifar100", "cifar100_h256")


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


def _no_grad(fn: Fn) -> Fn:
    def call() -> object:
        with torch.no_grad():
            return fn()

    return call


def topk_cases(
    arch_name: str, num_experts: int, batch: int, device: torch.device
) -> tuple[dict[str, Fn], dict[str, Fn], dict[str, Any]]:
    """Inference functions of a distilled mixture: whole model, and experts only (routing
    computed beforehand), plus routing statistics."""
    torch.manual_seed(0)
    arch = get_architecture(arch_name)
    teacher = build_mixture(arch, gate="attentive", num_experts=num_experts)
    core = distilled_mixture(teacher, arch).to(device).eval()
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

    spread = MixtureOfExpertsCore(core.bank, BalancedRouting(core.gate)).eval()
    whole = {
        "dense": _no_grad(lambda: core(x)),
        "top-2": _no_grad(lambda: core.forward_top_k(x, 2)),
        "top-1": _no_grad(lambda: core.forward_top_k(x, 1)),
        "top-1, balanced routing": _no_grad(lambda: spread.forward_top_k(x, 1)),
        "gate alone": _no_grad(lambda: core.gate(x)),
    }
    experts_only = {
        "dense experts": _no_grad(lambda: core.bank(x)),
        "top-2 experts": _no_grad(lambda: core.bank.forward_selected(x, *routes[2])),
        "top-1 experts": _no_grad(lambda: core.bank.forward_selected(x, *routes[1])),
        "top-1 experts, balanced routing": _no_grad(
            lambda: core.bank.forward_selected(x, *balanced)
        ),
    }
    stats = {
        "top1_active_experts": int((counts > 0).sum()),
        "top1_max_samples_per_expert": int(counts.max()),
        "balanced_samples_per_expert": -(-batch // num_experts),
    }
    return whole, experts_only, stats


def run(sizes: Sizes, device: torch.device, options: Options) -> dict[str, Any]:
    rows, targets, info = [], [], {}
    m, batch = sizes.topk_experts, sizes.topk_batch
    for arch_name in ARCHITECTURES:
        whole, experts_only, stats = topk_cases(arch_name, m, batch, device)
        t_whole = measure(whole, repeats=sizes.repeats, warmup=sizes.warmup, device=device)
        t_exp = measure(experts_only, repeats=sizes.repeats, warmup=sizes.warmup, device=device)
        case = f"{arch_name} M={m} B={batch}"
        gate_share = median(t_whole, "gate alone") / median(t_whole, "dense")
        notes = {
            "dense": f"gate = {gate_share:.0%} of dense",
            "top-1": f"gate = {median(t_whole, 'gate alone') / median(t_whole, 'top-1'):.0%}"
            " of top-1",
        }
        rows += rows_for(f"{case}, whole model", t_whole, "dense", notes)
        rows += rows_for(f"{case}, experts only", t_exp, "dense experts")
        targets.append(
            target(
                f"top-1 vs dense, {case}, whole model",
                median(t_whole, "dense") / median(t_whole, "top-1"),
                2.0,
            )
        )
        targets.append(
            target(
                f"top-1 vs dense, {case}, gate excluded",
                median(t_exp, "dense experts") / median(t_exp, "top-1 experts"),
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


def _memory_case(
    arch_name: str, variant: str, sizes: Sizes, device: torch.device, options: Options
) -> Fn:
    return topk_cases(arch_name, sizes.topk_experts, sizes.topk_batch, device)[0][variant]


MEMORY = MemoryCases(
    description="one inference (run twice)",
    runs=2,
    cases={
        f"{arch_name}/{variant}": partial(_memory_case, arch_name, variant)
        for arch_name in ARCHITECTURES
        for variant in ("dense", "top-1")
    },
)
SECTION = Section(run=run, info_lines=key_value_lines, memory=MEMORY)
