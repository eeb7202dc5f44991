"""Section ``bank``: the batched :class:`~moe_cl.core.bank.ExpertBank` against a Python loop over
:class:`~moe_cl.core.bank.ReferenceExpert` copies of the same experts (forward + backward)."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import Tensor

from moe_cl.bench.harness import Fn, MemoryCases, measure, median, rows_for, target
from moe_cl.bench.registry import Section
from moe_cl.bench.report import key_value_lines
from moe_cl.bench.settings import Options, Sizes
from moe_cl.core.bank import ExpertBank
from moe_cl.core.zoo import get_architecture

LOOP, BANK = "loop over experts", "ExpertBank"
# (architecture, experts, the Sizes field of its batch, speed-up aimed at)
CASES = (("mnist", 5, "bank_small_batch", 1.5), ("cifar100", 20, "bank_large_batch", 3.0))


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
    fns = {LOOP: run_loop, BANK: run_bank}
    if 0 < chunk < batch:
        fns[f"{BANK}, slices of {chunk}"] = run_chunked
    return fns, diff


def run(sizes: Sizes, device: torch.device, options: Options) -> dict[str, Any]:
    rows, targets, info = [], [], {}
    for arch_name, m, batch_field, threshold in CASES:
        batch = getattr(sizes, batch_field)
        fns, diff = bank_cases(arch_name, m, batch, sizes.bank_chunk, device)
        times = measure(fns, repeats=sizes.repeats, warmup=sizes.warmup, device=device)
        case = f"{arch_name} experts M={m} B={batch}"
        rows += rows_for(case, times, LOOP)
        targets.append(target(f"bank vs loop, {case}", median(times, LOOP) / median(times, BANK),
                              threshold))
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


def _memory_case(
    arch_name: str, m: int, batch_field: str, variant: str, sizes: Sizes, device: torch.device,
    options: Options,
) -> Fn:
    batch = getattr(sizes, batch_field)
    return bank_cases(arch_name, m, batch, sizes.bank_chunk, device)[0][variant]


MEMORY = MemoryCases(
    description="one forward + backward (run twice)",
    runs=2,
    cases={
        f"{arch_name}/{short}": partial(_memory_case, arch_name, m, batch_field, variant)
        for arch_name, m, batch_field, _ in CASES
        for short, variant in (("bank", BANK), ("loop", LOOP))
    },
)
SECTION = Section(run=run, info_lines=key_value_lines, memory=MEMORY)
