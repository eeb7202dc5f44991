"""Experts of one architecture, computed together.

An :class:`ExpertSpec` describes one expert as a short list of layers. From it we build

* :class:`ReferenceExpert`, one ordinary module (used for the single-model baseline and as the
  plain per-expert path the batched code is tested against), and
* :class:`ExpertGroup`, ``m`` experts whose weights are stacked: Linear layers run as one batched
  matmul, Conv2d layers as one grouped convolution (``groups = m``), BatchNorm2d as one
  BatchNorm over the ``m * C`` stacked channels (so statistics stay per expert).

An :class:`ExpertBank` is a list of groups, one per growth event. Growing appends a group and never
replaces an existing parameter, so optimizer state (Adam moments) of old experts survives and a
group can be frozen as a whole. The only Python loop is over growth events, never over experts.

Layouts used inside a group: convolution stages carry ``[N, m*C, H, W]`` (channel-stacked);
linear stages carry ``[m, N, F]`` (expert-major). Input shared by all experts skips the copy.
Their CPU memory layouts are a group's ``layouts`` (:mod:`moe_cl.core.layouts`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_cl.core.layer_specs import BatchNorm, Conv, Flatten, Hidden, Layer, Linear, MaxPool, ReLU
from moe_cl.core.layouts import LAYOUTS, CpuLayouts

# The gates' layout modules, which core.zoo takes from here.


@dataclass(frozen=True)
class ExpertSpec:
    """One expert's architecture: layers ending in a Linear that gives the class logits."""

    layers: tuple[Layer, ...]
    input_shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.layers or not isinstance(self.layers[-1], Linear):
            raise ValueError("ExpertSpec.layers must end with a Linear layer giving the logits")
        hidden_marks = [i for i, layer in enumerate(self.layers) if isinstance(layer, Hidden)]
        if len(hidden_marks) != 1 or not isinstance(self.layers[hidden_marks[0] - 1], Linear):
            raise ValueError("ExpertSpec.layers needs exactly one Hidden() right after a Linear")

    @property
    def num_classes(self) -> int:
        return self.layers[-1].out_features  # type: ignore[union-attr]

    @property
    def hidden_size(self) -> int:
        mark = next(i for i, layer in enumerate(self.layers) if isinstance(layer, Hidden))
        return self.layers[mark - 1].out_features  # type: ignore[union-attr]

    def build_reference(self) -> ReferenceExpert:
        return ReferenceExpert(self)


def check_input(x: Tensor, input_shape: Sequence[int], name: str = "x") -> None:
    """Raise a ValueError naming the argument when x is not a batch of ``input_shape``."""
    if x.dim() != len(input_shape) + 1 or tuple(x.shape[1:]) != tuple(input_shape):
        raise ValueError(
            f"{name} must have shape [batch, {', '.join(map(str, input_shape))}], "
            f"got {list(x.shape)}"
        )


# ----------------------------------------------------------------------------- reference path


class ReferenceExpert(nn.Module):
    """One expert as ordinary PyTorch layers. Returns (logits [B, K], hidden [B, H])."""

    def __init__(self, spec: ExpertSpec) -> None:
        super().__init__()
        self.spec = spec
        modules: list[nn.Module] = []
        for layer in spec.layers:
            match layer:
                case Conv():
                    modules.append(
                        nn.Conv2d(
                            layer.in_channels,
                            layer.out_channels,
                            layer.kernel_size,
                            padding=layer.padding,
                            bias=layer.bias,
                        )
                    )
                case BatchNorm():
                    modules.append(nn.BatchNorm2d(layer.channels))
                case ReLU():
                    modules.append(nn.ReLU())
                case MaxPool():
                    modules.append(nn.MaxPool2d(layer.size))
                case Flatten():
                    modules.append(nn.Flatten())
                case Linear():
                    modules.append(nn.Linear(layer.in_features, layer.out_features, layer.bias))
                case Hidden():
                    modules.append(nn.Identity())
        self.layers = nn.ModuleList(modules)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        check_input(x, self.spec.input_shape)
        hidden = x
        for layer, module in zip(self.spec.layers, self.layers, strict=True):
            x = module(x)
            if isinstance(layer, Hidden):
                hidden = x
        return x, hidden


# ----------------------------------------------------------------------------- batched path


class ExpertGroup(nn.Module):
    """``num_experts`` experts with stacked weights, added to the bank at the same time."""

    def __init__(self, spec: ExpertSpec, num_experts: int,
                 layouts: CpuLayouts = LAYOUTS) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        self.spec = spec
        self.num_experts = num_experts
        self.layouts = layouts
        self.frozen = False
        params: list[nn.Module | None] = []
        m = num_experts
        for layer in spec.layers:
            match layer:
                case Conv():
                    k = layer.kernel_size
                    conv = nn.Module()
                    conv.weight = nn.Parameter(
                        torch.empty(m * layer.out_channels, layer.in_channels, k, k)
                    )
                    conv.bias = (
                        nn.Parameter(torch.empty(m * layer.out_channels)) if layer.bias else None
                    )
                    params.append(conv)
                case BatchNorm():
                    params.append(nn.BatchNorm2d(m * layer.channels))
                case Linear():
                    lin = nn.Module()
                    lin.weight = nn.Parameter(
                        torch.empty(m, layer.in_features, layer.out_features)
                    )
                    lin.bias = (
                        nn.Parameter(torch.empty(m, 1, layer.out_features)) if layer.bias else None
                    )
                    params.append(lin)
                case _:
                    params.append(None)
        self.layers = nn.ModuleList([p if p is not None else nn.Identity() for p in params])
        # Initialise exactly as m independent PyTorch modules would be.
        self.load_references([spec.build_reference() for _ in range(m)])

    # -- conversion to and from the plain per-expert modules

    @torch.no_grad()
    def load_references(self, experts: Sequence[ReferenceExpert]) -> None:
        """Copy the weights of ``num_experts`` reference experts into the stacked tensors."""
        if len(experts) != self.num_experts:
            raise ValueError(f"expected {self.num_experts} reference experts, got {len(experts)}")
        for index, expert in enumerate(experts):
            self.load_reference(index, expert)

    @torch.no_grad()
    def load_reference(self, index: int, expert: ReferenceExpert) -> None:
        """Overwrite expert ``index`` of this group with the weights (and BatchNorm statistics)
        of a reference expert."""
        for idx, layer in enumerate(self.spec.layers):
            mine, theirs = self.layers[idx], expert.layers[idx]
            match layer:
                case Conv():
                    rows = slice(index * layer.out_channels, (index + 1) * layer.out_channels)
                    mine.weight[rows] = theirs.weight
                    if layer.bias:
                        mine.bias[rows] = theirs.bias
                case BatchNorm():
                    rows = slice(index * layer.channels, (index + 1) * layer.channels)
                    for name in ("weight", "bias", "running_mean", "running_var"):
                        getattr(mine, name)[rows] = getattr(theirs, name)
                case Linear():
                    mine.weight[index] = theirs.weight.t()
                    if layer.bias:
                        mine.bias[index, 0] = theirs.bias

    @torch.no_grad()
    def export_reference(self, index: int) -> ReferenceExpert:
        """A plain module holding a copy of expert ``index`` of this group."""
        expert = self.spec.build_reference().to(self._device())
        for idx, layer in enumerate(self.spec.layers):
            mine, theirs = self.layers[idx], expert.layers[idx]
            match layer:
                case Conv():
                    rows = slice(index * layer.out_channels, (index + 1) * layer.out_channels)
                    theirs.weight.copy_(mine.weight[rows])
                    if layer.bias:
                        theirs.bias.copy_(mine.bias[rows])
                case BatchNorm():
                    rows = slice(index * layer.channels, (index + 1) * layer.channels)
                    for name in ("weight", "bias", "running_mean", "running_var"):
                        getattr(theirs, name).copy_(getattr(mine, name)[rows])
                case Linear():
                    theirs.weight.copy_(mine.weight[index].t())
                    if layer.bias:
                        theirs.bias.copy_(mine.bias[index, 0])
        return expert

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' floating-point type."""
        return next(self.parameters()).dtype

    # -- freezing

    def freeze(self) -> None:
        """Stop training these experts: no gradients, BatchNorm statistics fixed."""
        self.frozen = True
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> ExpertGroup:
        return super().train(mode and not self.frozen)

    # -- forward

    def forward(
        self, x: Tensor, experts: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Run the experts.

        Dense (``experts=None``): ``x`` is [N, *input_shape], shared by every expert; returns
        logits [N, m, K] and hidden [N, m, H].
        Routed: ``x`` is [m', N, *input_shape], row j fed to expert ``experts[j]`` (local ids);
        only those m' experts are computed; returns logits [m', N, K] and hidden [m', N, H].
        """
        if experts is None:
            logits, hidden = self._run(x, None, self.num_experts)
            return logits.transpose(0, 1), hidden.transpose(0, 1)
        if self.training and any(isinstance(layer, BatchNorm) for layer in self.spec.layers):
            raise RuntimeError("routed (top-k) evaluation of BatchNorm experts needs eval mode")
        return self._run(x, experts, len(experts))

    def _run(self, x: Tensor, experts: Tensor | None, m: int) -> tuple[Tensor, Tensor]:
        shared = experts is None  # x identical for all experts, not yet split
        if not shared:
            # [m, N, C, H, W] -> channel-stacked [N, m*C, H, W] (or [m, N, F] for flat input)
            if x.dim() == 5:
                x = x.transpose(0, 1).flatten(1, 2)
        hidden: Tensor | None = None
        for layer, mod in zip(self.spec.layers, self.layers, strict=True):
            match layer:
                case Conv():
                    weight, bias = mod.weight, mod.bias
                    x = self.layouts.conv_input(x, layer.out_channels * m)
                    if experts is not None:
                        weight = _select_blocks(weight, experts, layer.out_channels)
                        bias = None if bias is None else _select_blocks(
                            bias, experts, layer.out_channels
                        )
                    x = F.conv2d(
                        x, weight, bias, padding=layer.padding, groups=1 if shared else m
                    )
                    shared = False
                case BatchNorm():
                    x = self._batch_norm(x, mod, layer.channels, experts)
                case ReLU():
                    x = F.relu(x)
                case MaxPool():
                    x = self.layouts.max_pool(x, partial(F.max_pool2d, kernel_size=layer.size))
                case Flatten():
                    if shared:
                        x = x.flatten(1)
                    else:
                        x = x.reshape(x.shape[0], m, -1).transpose(0, 1)  # [m, N, F]
                case Linear():
                    weight, bias = mod.weight, mod.bias
                    if experts is not None:
                        weight = weight.index_select(0, experts)
                        bias = None if bias is None else bias.index_select(0, experts)
                    if shared:
                        x = torch.matmul(x.unsqueeze(0), weight)  # [m, N, out]
                        shared = False
                    else:
                        x = torch.bmm(x, weight)
                    if bias is not None:
                        x = x + bias
                case Hidden():
                    hidden = x
        assert hidden is not None
        return x, hidden

    def _batch_norm(
        self, x: Tensor, bn: nn.BatchNorm2d, channels: int, experts: Tensor | None
    ) -> Tensor:
        if experts is None:
            return bn(x)
        rows = (experts[:, None] * channels + torch.arange(channels, device=x.device)).flatten()
        return F.batch_norm(
            x,
            bn.running_mean[rows],
            bn.running_var[rows],
            bn.weight[rows],
            bn.bias[rows],
            training=False,
            eps=bn.eps,
        )


def _select_blocks(t: Tensor, experts: Tensor, block: int) -> Tensor:
    """Rows of expert-stacked tensor ``t`` ([m*block, ...]) for the given experts, in order."""
    rows = (experts[:, None] * block + torch.arange(block, device=t.device)).flatten()
    return t.index_select(0, rows)


class ExpertBank(nn.Module):
    """All experts of a mixture: a growing list of :class:`ExpertGroup`."""

    def __init__(self, spec: ExpertSpec, num_experts: int,
                 layouts: CpuLayouts = LAYOUTS) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        self.spec = spec
        self.layouts = layouts  # also those of the groups it adds
        self.groups = nn.ModuleList([ExpertGroup(spec, num_experts, layouts)])

    @property
    def num_experts(self) -> int:
        return sum(g.num_experts for g in self.groups)

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    @property
    def hidden_size(self) -> int:
        return self.spec.hidden_size

    def add_experts(self, count: int) -> ExpertGroup:
        """Append ``count`` new experts (a new group) on the bank's device."""
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        ref = next(self.parameters())
        group = ExpertGroup(self.spec, count, self.layouts).to(ref.device, ref.dtype)
        group.train(self.training)
        self.groups.append(group)
        return group

    def freeze_existing(self) -> None:
        for group in self.groups:
            group.freeze()

    def locate(self, expert: int) -> tuple[ExpertGroup, int]:
        """The group holding global expert index ``expert`` and its index in that group."""
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert must be in [0, {self.num_experts}), got {expert}")
        for group, offset in zip(self.groups, self.expert_offsets(), strict=True):
            if expert < offset + group.num_experts:
                return group, expert - offset
        raise AssertionError("unreachable")

    def copy_expert(self, source: int, target: int) -> None:
        """Make expert ``target`` a copy of expert ``source`` (weights and BatchNorm stats)."""
        source_group, source_index = self.locate(source)
        target_group, target_index = self.locate(target)
        target_group.load_reference(target_index, source_group.export_reference(source_index))

    def expert_offsets(self) -> list[int]:
        offsets, total = [], 0
        for group in self.groups:
            offsets.append(total)
            total += group.num_experts
        return offsets

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Every expert on every sample: logits [N, M, K], hidden [N, M, H], in the parameters'
        precision (under autocast the layers compute in a lower one)."""
        check_input(x, self.spec.input_shape)
        outs = [group(x) for group in self.groups]
        if len(outs) == 1:
            logits, hidden = outs[0]
        else:
            logits, hidden = torch.cat([o[0] for o in outs], 1), torch.cat([o[1] for o in outs], 1)
        dtype = self.groups[0].dtype
        return logits.to(dtype), hidden.to(dtype)

    def forward_selected(self, x: Tensor, sample_index: Tensor, expert_index: Tensor) -> Tensor:
        """Logits of expert ``expert_index[p]`` on sample ``sample_index[p]`` for each pair p.

        Only the experts that appear in ``expert_index`` are computed, each on its own samples
        (padded to a common count so that one batched call serves all of them).
        Returns logits [P, K].
        """
        check_input(x, self.spec.input_shape)
        pairs = expert_index.numel()
        logits = x.new_empty(pairs, self.num_classes)
        for group, offset in zip(self.groups, self.expert_offsets(), strict=True):
            in_group = (expert_index >= offset) & (expert_index < offset + group.num_experts)
            if not bool(in_group.any()):
                continue
            pair_ids = in_group.nonzero().squeeze(1)
            local = expert_index[pair_ids] - offset
            active, slot_expert = torch.unique(local, return_inverse=True)
            order = torch.argsort(slot_expert, stable=True)
            counts = torch.bincount(slot_expert, minlength=len(active))
            starts = torch.cumsum(counts, 0) - counts
            position = torch.empty_like(order)
            position[order] = torch.arange(len(order), device=x.device) - starts[
                slot_expert[order]
            ]
            width = int(counts.max())
            padded = x.new_zeros(len(active), width, *x.shape[1:])
            padded[slot_expert, position] = x[sample_index[pair_ids]]
            out, _ = group(padded, active)
            logits[pair_ids] = out[slot_expert, position]
        return logits


def autocast_off(t: Tensor) -> torch.autocast:
    """A block where autocast is off on t's device: what runs in it keeps the precision of its
    inputs (the gate's scores and softmax, the mixture and its logarithm under ``bf16``)."""
    return torch.autocast(t.device.type, enabled=False)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

