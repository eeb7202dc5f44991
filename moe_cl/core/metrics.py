"""The paper's measures of routing and specialisation, accumulated over a whole data set.

Entropies and mutual information are in bits. :class:`RoutingAccumulator` is updated batch by
batch and read once; the number of experts may grow between data sets, not within one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


def entropy_bits(p: Tensor, dim: int = -1) -> Tensor:
    """Shannon entropy in bits along ``dim``; 0 log 0 = 0."""
    logs = torch.where(p > 0, torch.log2(p.clamp_min(1e-30)), torch.zeros_like(p))
    return -(p * logs).sum(dim)


def mutual_information_bits(counts: Tensor) -> float:
    """I(E; Y) = H(E) + H(Y) - H(E, Y) from a count matrix (any orientation)."""
    total = counts.sum()
    if total <= 0:
        return 0.0
    joint = counts.double() / total
    h_rows = entropy_bits(joint.sum(1))
    h_cols = entropy_bits(joint.sum(0))
    h_joint = entropy_bits(joint.flatten())
    return float((h_rows + h_cols - h_joint).clamp_min(0.0))


@dataclass
class RoutingAccumulator:
    """Sums over a data set, from which every routing metric follows."""

    num_classes: int
    samples: int = 0
    errors: int = 0
    top5_errors: int = 0
    router_samples: int = 0
    router_errors: int = 0
    sample_entropy_sum: float = 0.0
    gate_sum: Tensor | None = None
    counts_true: Tensor | None = None  # [K, M] selected expert per true class
    counts_pred: Tensor | None = None  # [K, M] selected expert per class it predicted
    gate_mass: Tensor | None = None  # [K, M] summed gate values per true class
    _num_experts: int = field(default=0, repr=False)

    def update(
        self,
        gate: Tensor,
        target: Tensor,
        *,
        log_probs: Tensor | None = None,
        expert_prediction: Tensor | None = None,
        router_log_probs: Tensor | None = None,
    ) -> None:
        """Add a batch: gate [B, M], target [B]; mixture log_probs [B, K] for the errors;
        expert_prediction [B], the class predicted by the argmax expert (the paper's Y_pred);
        router_log_probs [B, K], a router's class posterior, for the router's own error."""
        gate = gate.detach().double().cpu()
        target = target.detach().cpu().long()
        b, m = gate.shape
        k = self.num_classes
        if self.gate_sum is None or m != self._num_experts:
            if self.samples:
                raise ValueError(
                    f"the number of experts changed from {self._num_experts} to {m} within one "
                    "data set"
                )
            self._num_experts = m
            self.gate_sum = torch.zeros(m, dtype=torch.float64)
            self.counts_true = torch.zeros(k, m, dtype=torch.long)
            self.counts_pred = torch.zeros(k, m, dtype=torch.long)
            self.gate_mass = torch.zeros(k, m, dtype=torch.float64)
        selected = gate.argmax(-1)
        self.samples += b
        self.sample_entropy_sum += float(entropy_bits(gate).sum())
        self.gate_sum += gate.sum(0)
        self.counts_true.index_put_((target, selected), torch.ones(b, dtype=torch.long), True)
        self.gate_mass.index_add_(0, target, gate)
        if expert_prediction is not None:
            pred = expert_prediction.detach().cpu().long()
            self.counts_pred.index_put_((pred, selected), torch.ones(b, dtype=torch.long), True)
        if log_probs is not None:
            lp = log_probs.detach().cpu()
            self.errors += int((lp.argmax(-1) != target).sum())
            top = lp.topk(min(5, lp.shape[-1]), dim=-1).indices
            self.top5_errors += int((~(top == target[:, None]).any(-1)).sum())
        if router_log_probs is not None:
            self.router_samples += b
            self.router_errors += int((router_log_probs.detach().argmax(-1).cpu() != target).sum())

    def compute(self) -> dict[str, float | list]:
        """Error, top-5 error, H_s, H_u, MI (true labels), MI_pred, matrices, usage."""
        if self.samples == 0 or self.gate_sum is None:
            return {}
        usage = self.gate_sum / self.samples
        counts_true = self.counts_true
        per_class = counts_true.double() / counts_true.sum(1, keepdim=True).clamp_min(1)
        router = {"router_error": self.router_errors / self.router_samples} if (
            self.router_samples) else {}
        return {
            **router,
            "error": self.errors / self.samples,
            "top5_error": self.top5_errors / self.samples,
            "H_s": self.sample_entropy_sum / self.samples,
            "H_u": float(entropy_bits(usage)),
            "MI": mutual_information_bits(counts_true),
            "MI_pred": mutual_information_bits(self.counts_pred),
            "expert_usage": usage.tolist(),
            "expert_class_counts": counts_true.tolist(),
            "expert_class_counts_pred": self.counts_pred.tolist(),
            "expert_class_gate_mass": self.gate_mass.tolist(),
            "class_routing_entropy": entropy_bits(per_class).tolist(),
            "num_experts": self._num_experts,
            "samples": self.samples,
        }
