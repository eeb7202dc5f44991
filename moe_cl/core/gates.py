"""Gates: map a batch to routing probabilities g [B, M] over the experts.

* :class:`SoftmaxGate` is the original gate: a network, a final Linear(., M), softmax(z / T).
* :class:`AttentiveGate` is the paper's gate: the network gives a query, each expert's hidden
  vector gives a key, and g = softmax(q . k_i / sqrt(H)). It has no per-expert parameters, so new
  experts are routed to through their own keys without touching the gate.

Both share the call ``gate(x, expert_hidden, expert_mask=None)``; the mask [B, M] limits each
sample's routing to some experts. ``gate.scores(x, expert_hidden)`` gives the scores before the
softmax, for routings that normalise over groups of experts (``moe_cl.core.experience_routing``).
``needs_expert_hidden`` says whether the second argument is read (the softmax gate can route
before any expert runs, which top-k needs).

Under autocast (``train.precision=bf16``) only the gate's network runs in the lower precision:
the scores (the output layer, or the query, the keys and their products) and the softmax are
computed in the parameters' precision.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from moe_cl.core.bank import autocast_off


class SoftmaxGate(nn.Module):
    """Original gate. Its output layer grows in segments so old rows keep optimizer state."""

    needs_expert_hidden = False

    def __init__(
        self, network: nn.Module, features: int, num_experts: int, *, temperature: float = 1.0
    ) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.network = network
        self.features = features
        self.temperature = temperature
        self.heads = nn.ModuleList([nn.Linear(features, num_experts)])

    @property
    def num_experts(self) -> int:
        return sum(h.out_features for h in self.heads)

    def add_experts(self, count: int) -> None:
        ref = self.heads[0].weight
        self.heads.append(nn.Linear(self.features, count).to(ref.device, ref.dtype))

    @torch.no_grad()
    def copy_expert(self, source: int, target: int) -> None:
        """Give expert ``target`` the output row (weights and bias) of expert ``source``."""
        (source_head, source_row), (target_head, target_row) = (
            self._locate(source), self._locate(target))
        target_head.weight[target_row] = source_head.weight[source_row]
        target_head.bias[target_row] = source_head.bias[source_row]

    def _locate(self, expert: int) -> tuple[nn.Linear, int]:
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert must be in [0, {self.num_experts}), got {expert}")
        for head in self.heads:
            if expert < head.out_features:
                return head, expert
            expert -= head.out_features
        raise AssertionError("unreachable")

    def logits(self, x: Tensor) -> Tensor:
        z = self.network(x)
        if z.shape[-1] != self.features:
            raise ValueError(
                f"gate network gives {z.shape[-1]} features, the gate expects features="
                f"{self.features}"
            )
        with autocast_off(z):
            z = z.to(self.heads[0].weight.dtype)
            return torch.cat([head(z) for head in self.heads], dim=-1)

    def scores(self, x: Tensor, expert_hidden: Tensor | None = None) -> Tensor:
        """Routing scores z(x) / T before the softmax, [B, M]."""
        return self.logits(x) / self.temperature

    def forward(self, x: Tensor, expert_hidden: Tensor | None = None,
                expert_mask: Tensor | None = None) -> Tensor:
        return masked_softmax(self.scores(x), expert_mask)


class AttentiveGate(nn.Module):
    """Attention-like gate: q = W_q h_g(x), k_i = W_k h_i(x), g = softmax(q . k_i / sqrt(H))."""

    needs_expert_hidden = True

    def __init__(self, network: nn.Module, hidden_size: int) -> None:
        super().__init__()
        if hidden_size < 1:
            raise ValueError(f"hidden_size must be >= 1, got {hidden_size}")
        self.network = network
        self.hidden_size = hidden_size
        self.query = nn.Linear(hidden_size, hidden_size, bias=False)
        self.key = nn.Linear(hidden_size, hidden_size, bias=False)

    def attention_scores(self, x: Tensor, expert_hidden: Tensor) -> Tensor:
        """Scaled dot products q . k_i / sqrt(H), [B, M]."""
        h_gate = self.network(x)
        if h_gate.shape[-1] != self.hidden_size:
            raise ValueError(
                f"gate network gives {h_gate.shape[-1]} features, expected hidden_size="
                f"{self.hidden_size}"
            )
        if expert_hidden.shape[-1] != self.hidden_size:
            raise ValueError(
                f"experts' hidden vectors have size {expert_hidden.shape[-1]}, expected "
                f"hidden_size={self.hidden_size}"
            )
        with autocast_off(h_gate):
            dtype = self.query.weight.dtype
            q = self.query(h_gate.to(dtype))  # [B, H]
            k = self.key(expert_hidden.to(dtype))  # [B, M, H]
            return torch.einsum("bh,bmh->bm", q, k) / math.sqrt(self.hidden_size)

    def scores(self, x: Tensor, expert_hidden: Tensor | None = None) -> Tensor:
        """Routing scores before the softmax: the attention scores, [B, M]."""
        if expert_hidden is None:
            raise ValueError("the attentive gate needs expert_hidden [B, M, H] (the keys)")
        return self.attention_scores(x, expert_hidden)

    def forward(self, x: Tensor, expert_hidden: Tensor | None = None,
                expert_mask: Tensor | None = None) -> Tensor:
        return masked_softmax(self.scores(x, expert_hidden), expert_mask)


def masked_softmax(scores: Tensor, expert_mask: Tensor | None) -> Tensor:
    """Softmax over the experts allowed by ``expert_mask`` ([B, M] bool; None: all); the others
    get exactly 0. Every row must allow at least one expert."""
    if expert_mask is not None:
        scores = scores.masked_fill(~expert_mask, float("-inf"))
    return torch.softmax(scores, dim=-1)


Gate = SoftmaxGate | AttentiveGate
