"""Section ``ls``: L_s through G G^T (O(B^2 M)) against the reference code's double loop over
expert pairs (O(B^2 M^2)), forward + backward."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor

from moe_cl.bench.harness import Fn, MemoryCases, measure, median, rows_for, target
from moe_cl.bench.registry import Section
from moe_cl.bench.report import key_value_lines
from moe_cl.bench.settings import Options, Sizes
from moe_cl.core.losses import pairwise_distances, sample_similarity_terms

LOOP, GRAM = "double loop over expert pairs", "G G^T (sample_similarity_terms)"


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
    return {LOOP: run(pairwise_loop_terms), GRAM: run(sample_similarity_terms)}, rel


def run(sizes: Sizes, device: torch.device, options: Options) -> dict[str, Any]:
    rows, targets, info = [], [], {}
    for m, threshold in ((20, 5.0), (5, None)):
        fns, rel = ls_cases(sizes.ls_batch, m, device)
        times = measure(fns, repeats=sizes.repeats, warmup=sizes.warmup, device=device)
        case = f"L_s B={sizes.ls_batch} M={m}"
        rows += rows_for(case, times, LOOP)
        if threshold is not None:
            speedup = median(times, LOOP) / median(times, GRAM)
            targets.append(target(f"G G^T vs double loop, {case}", speedup, threshold))
        info[case] = {"max_rel_diff": rel}
    return {
        "title": "L_s: G G^T form vs the reference double loop (forward + backward)",
        "rows": rows,
        "targets": targets,
        "info": info,
        "notes": [],
    }


def _memory_case(
    m: int, variant: str, sizes: Sizes, device: torch.device, options: Options
) -> Fn:
    return ls_cases(sizes.ls_batch, m, device)[0][variant]


MEMORY = MemoryCases(
    description="one forward + backward (run twice)",
    runs=2,
    cases={"M=20/gram": partial(_memory_case, 20, GRAM),
           "M=20/pairs": partial(_memory_case, 20, LOOP)},
)
SECTION = Section(run=run, info_lines=key_value_lines, memory=MEMORY)
