"""The mixture: a gate over an expert bank, returning everything one forward pass knows.

Losses and routing metrics read :class:`MoEOutput` instead of running the model again. Under
autocast (``train.precision=bf16``) the experts' and the gate's networks compute in the lower
precision; everything in :class:`MoEOutput` is computed and kept in the parameters' precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moe_cl.core.bank import ExpertBank, autocast_off, check_input
from moe_cl.core.choices import OUTPUTS, OutputMode
from moe_cl.core.gates import AttentiveGate, Gate

EPS = 1e-7


@dataclass
class MoEOutput:
    """One forward pass of a mixture.

    log_probs: [B, K] what the model predicts (log of the mixture, or of the chosen expert).
    gate: [B, M] routing probabilities g(x).
    expert_log_probs: [B, M, K] log f_i(x) (None in top-k inference).
    hidden: [B, M, H] the experts' hidden vectors h_i(x) (None in top-k inference).
    selected: [B] the expert with the largest gate value.
    selected_log_probs: [B, K] log f_selected(x), kept by top-k inference, which has no
    ``expert_log_probs`` (None otherwise: read it from ``expert_log_probs``).
    router_log_probs: [B, K] the class posterior of a router that chose the experiences (a
    routed mixture's evaluation; None otherwise), so its own accuracy can be reported.
    auxiliary_loss: a term the training loss must add (a routed mixture's feature
    distillation while it reuses experts; None otherwise).
    """

    log_probs: Tensor
    gate: Tensor
    expert_log_probs: Tensor | None
    hidden: Tensor | None
    selected: Tensor
    selected_log_probs: Tensor | None = None
    router_log_probs: Tensor | None = None
    auxiliary_loss: Tensor | None = None

    def selected_expert_prediction(self) -> Tensor:
        """Class predicted by the expert with the largest gate value (the paper's Y_pred)."""
        if self.expert_log_probs is None:
            assert self.selected_log_probs is not None, "top-k outputs keep selected_log_probs"
            return self.selected_log_probs.argmax(-1)
        rows = torch.arange(len(self.selected), device=self.selected.device)
        return self.expert_log_probs[rows, self.selected].argmax(-1)


def masked_log_softmax(logits: Tensor, class_mask: Tensor | None) -> Tensor:
    """log softmax over the allowed classes only ([K] or [B, K] bool mask; None = all)."""
    if class_mask is not None:
        if class_mask.dim() == 1:
            mask = class_mask.view(*([1] * (logits.dim() - 1)), -1)
        else:  # [B, K] for logits [B, (M,) K]
            mask = class_mask.view(class_mask.shape[0], *([1] * (logits.dim() - 2)), -1)
        logits = logits.masked_fill(~mask, float("-inf"))
    return torch.log_softmax(logits, dim=-1)


class MixtureOfExpertsCore(nn.Module):
    """Gate + experts. ``output`` chooses how the experts' predictions are combined.

    * ``expectation``: y_hat = sum_i g_i f_i; log_probs = log(y_hat + eps).
    * ``stochastic``: during training one expert e ~ Categorical(g) predicts; at inference the
      argmax expert does. The training loss is the Jacobs et al. one (see losses).
    """

    def __init__(
        self, bank: ExpertBank, gate: Gate, *, output: OutputMode = "expectation"
    ) -> None:
        super().__init__()
        if output not in OUTPUTS:
            raise ValueError(f"output must be 'expectation' or 'stochastic', got {output!r}")
        if isinstance(gate, AttentiveGate) and gate.hidden_size != bank.hidden_size:
            raise ValueError(
                f"hidden_size of the attentive gate ({gate.hidden_size}) must equal the experts' "
                f"hidden size ({bank.hidden_size})"
            )
        if not isinstance(gate, AttentiveGate) and gate.num_experts != bank.num_experts:
            raise ValueError(
                f"num_experts of the gate ({gate.num_experts}) must equal the bank's "
                f"({bank.num_experts})"
            )
        # The gate is registered first: parameters of experts added later then come last in
        # named_parameters(), which Avalanche's online EWC assumes of a growing model.
        self.gate = gate
        self.bank = bank
        self.output = output

    @property
    def num_experts(self) -> int:
        return self.bank.num_experts

    def add_experts(self, count: int) -> None:
        """Grow by ``count`` experts; existing parameters keep their identity."""
        self.bank.add_experts(count)
        if not isinstance(self.gate, AttentiveGate):
            self.gate.add_experts(count)

    def copy_expert(self, source: int, target: int) -> None:
        """Expert ``target`` becomes a copy of expert ``source``, routing included: the same
        keys for the attentive gate (they come from the copied weights), the same output row
        for the softmax gate."""
        self.bank.copy_expert(source, target)
        if not isinstance(self.gate, AttentiveGate):
            self.gate.copy_expert(source, target)

    def forward(self, x: Tensor, class_mask: Tensor | None = None,
                expert_mask: Tensor | None = None) -> MoEOutput:
        """``expert_mask`` [B, M] (bool) limits each sample's routing to some experts."""
        check_input(x, self.bank.spec.input_shape)
        logits, hidden = self.bank(x)
        gate = self.gate(x, hidden, expert_mask)
        with autocast_off(logits):
            expert_log_probs = masked_log_softmax(logits, class_mask)
            selected = gate.argmax(-1)
            rows = torch.arange(len(x), device=x.device)
            if self.output == "expectation":
                mixture = torch.einsum("bm,bmk->bk", gate, expert_log_probs.exp())
                log_probs = torch.log(mixture + EPS)
            else:
                chosen = (torch.multinomial(gate.detach(), 1).squeeze(1) if self.training
                          else selected)
                log_probs = expert_log_probs[rows, chosen]
        return MoEOutput(log_probs, gate, expert_log_probs, hidden, selected)

    @torch.no_grad()
    def forward_top_k(self, x: Tensor, k: int, class_mask: Tensor | None = None,
                      expert_mask: Tensor | None = None) -> MoEOutput:
        """Inference with only the k largest gate values: just those experts are computed."""
        if self.gate.needs_expert_hidden:
            raise ValueError(
                "top-k inference needs a gate that routes before the experts run; distil the "
                "attentive gate into a softmax gate first (moe_cl.core.zoo.distilled_mixture)"
            )
        if not 1 <= k <= self.num_experts:
            raise ValueError(f"k must be in [1, {self.num_experts}], got {k}")
        check_input(x, self.bank.spec.input_shape)
        gate = self.gate(x, None, expert_mask)
        top_values, top_experts = gate.topk(k, dim=-1)
        weights = top_values / top_values.sum(-1, keepdim=True)
        samples = torch.arange(len(x), device=x.device).repeat_interleave(k)
        logits = self.bank.forward_selected(x, samples, top_experts.flatten())
        mask = None
        if class_mask is not None:
            mask = class_mask if class_mask.dim() == 1 else class_mask[samples]
        with autocast_off(logits):
            each = masked_log_softmax(logits, mask).view(len(x), k, -1)  # gate order: [:, 0] 1st
            mixture = torch.einsum("bk,bkc->bc", weights, each.exp())
        return MoEOutput(torch.log(mixture + EPS), gate, None, None, top_experts[:, 0], each[:, 0])
