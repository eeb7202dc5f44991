"""The paper's architectures (PAPER.md section 4) as named presets, and gate distillation.

Each :class:`Architecture` knows its expert spec, its gate network (the attentive variant and the
original one) and the paper's default number of experts. ``mlp`` is a small fully connected
family for flat inputs (and any input, flattened), sized by the data: :func:`mlp_architecture`,
or the name ``mlp`` with ``input_size`` and ``num_classes`` (:func:`resolve_architecture`).

Where the paper applies ReLU and then 2x2 max-pooling, the networks pool first. The two orders
compute the same function and, with PyTorch's tie-breaking (the first maximum of a window), the
same gradients, bit for bit; pooling first runs the ReLU (forward and backward) on a quarter of
the values. On the CPU a training step of the CIFAR-100 mixture is 1.1-1.3x faster, those of
the MNIST and Fashion-MNIST mixtures 1.0-1.1x (``python -m moe_cl.bench --only layers``,
docs/performance.md). Parameter names do not change.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch.distributed as dist
from torch import nn

from moe_cl.core.bank import (
    BatchNorm,
    Conv,
    ExpertBank,
    ExpertSpec,
    Flatten,
    Hidden,
    Linear,
    MaxPool,
    ReferenceExpert,
    ReLU,
)
from moe_cl.core.choices import GATES, GateKind
from moe_cl.core.gates import AttentiveGate, SoftmaxGate
from moe_cl.core.layouts import LayoutConv2d, LayoutMaxPool2d
from moe_cl.core.mixture import MixtureOfExpertsCore, OutputMode

M = TypeVar("M", bound=nn.Module)


@dataclass(frozen=True)
class Architecture:
    """A paper model family: experts, gate network builder, defaults."""

    name: str
    expert: ExpertSpec
    gate_network: Callable[[GateKind], nn.Module]
    gate_features: int  # width of the gate network's output (H for the attentive gate)
    num_experts: int

    @property
    def hidden_size(self) -> int:
        return self.expert.hidden_size

    @property
    def num_classes(self) -> int:
        return self.expert.num_classes

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.expert.input_shape


def _small_image_expert(width: int, classes: int, hidden: int = 32) -> ExpertSpec:
    return ExpertSpec(
        (
            Conv(1, 1, 3), MaxPool(2), ReLU(), Flatten(),
            Linear(169, width), ReLU(),
            Linear(width, hidden), Hidden(), ReLU(),
            Linear(hidden, classes),
        ),
        (1, 28, 28),
    )  # fmt: skip


def _mnist_gate(kind: GateKind) -> nn.Module:
    layers: list[nn.Module] = [
        LayoutConv2d(1, 1, 3), LayoutMaxPool2d(2), nn.ReLU(), nn.Flatten(),
        nn.Linear(169, 128), nn.ReLU(), nn.Linear(128, 32),
    ]  # fmt: skip
    if kind == "softmax":
        layers.append(nn.ReLU())  # the attentive gate stops before this ReLU
    return nn.Sequential(*layers)


def _fmnist_gate(kind: GateKind) -> nn.Module:
    # Both variants end with Linear(512, 32) and its ReLU.
    return nn.Sequential(
        LayoutConv2d(1, 8, 3), nn.BatchNorm2d(8), LayoutMaxPool2d(2), nn.ReLU(), nn.Flatten(),
        nn.Linear(1352, 512), nn.ReLU(), nn.Linear(512, 32), nn.ReLU(),
    )  # fmt: skip


def _conv_block(c_in: int, c_out: int, batch_norm: bool) -> list:
    """Conv(k3, p1) [BN] ReLU MaxPool, as spec layers (pool first, see the module docstring);
    BN convs have no bias."""
    layers: list = [Conv(c_in, c_out, 3, padding=1, bias=not batch_norm)]
    if batch_norm:
        layers.append(BatchNorm(c_out))
    return [*layers, MaxPool(2), ReLU()]


def _cifar_expert(channels: tuple[int, int, int, int], fc: int, hidden: int) -> ExpertSpec:
    c1, c2, c3, c4 = channels
    return ExpertSpec(
        (
            *_conv_block(3, c1, False), *_conv_block(c1, c2, True),
            *_conv_block(c2, c3, False), *_conv_block(c3, c4, True), Flatten(),
            Linear(c4 * 4, fc), ReLU(),
            Linear(fc, hidden), Hidden(), ReLU(),
            Linear(hidden, 100),
        ),
        (3, 32, 32),
    )  # fmt: skip


def _cifar_gate(fc: int, hidden: int) -> Callable[[GateKind], nn.Module]:
    def build(kind: GateKind) -> nn.Module:
        layers: list[nn.Module] = []
        c_in = 3
        for i, c_out in enumerate((64, 128, 256, 512)):
            with_bn = i % 2 == 1
            layers.append(nn.Conv2d(c_in, c_out, 3, padding=1, bias=not with_bn))
            if with_bn:
                layers.append(nn.BatchNorm2d(c_out))
            layers += [LayoutMaxPool2d(2), nn.ReLU()]
            c_in = c_out
        layers += [nn.Flatten(), nn.Linear(2048, fc), nn.ReLU(), nn.Linear(fc, hidden)]
        if kind == "softmax":
            layers.append(nn.ReLU())
        return nn.Sequential(*layers)

    return build


def mlp_architecture(
    input_shape: tuple[int, ...], num_classes: int, *, width: int = 64, hidden: int = 32,
    num_experts: int = 4,
) -> Architecture:
    """A small fully connected family for synthetic data and quick experiments."""
    features = 1
    for d in input_shape:
        features *= d
    expert = ExpertSpec(
        (Flatten(), Linear(features, width), ReLU(), Linear(width, hidden), Hidden(), ReLU(),
         Linear(hidden, num_classes)),
        tuple(input_shape),
    )

    def gate(kind: GateKind) -> nn.Module:
        layers = [nn.Flatten(), nn.Linear(features, width), nn.ReLU(), nn.Linear(width, hidden)]
        return nn.Sequential(*layers, *([nn.ReLU()] if kind == "softmax" else []))

    return Architecture("mlp", expert, gate, hidden, num_experts)


ARCHITECTURES: dict[str, Architecture] = {
    "mnist": Architecture("mnist", _small_image_expert(5, 10), _mnist_gate, 32, 5),
    "fmnist": Architecture("fmnist", _small_image_expert(64, 10), _fmnist_gate, 32, 5),
    "cifar100": Architecture(
        "cifar100", _cifar_expert((8, 16, 32, 64), 128, 64), _cifar_gate(512, 64), 64, 20
    ),
    "cifar100_h256": Architecture(
        "cifar100_h256", _cifar_expert((16, 32, 64, 128), 1024, 256), _cifar_gate(1024, 256),
        256, 20,
    ),
}


def get_architecture(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ValueError(
            f"unknown architecture {name!r}; choose one of {sorted(ARCHITECTURES)} or 'mlp' "
            "(with input_size and num_classes)"
        ) from None


def resolve_architecture(
    architecture: str | Architecture, *, input_size: int | Sequence[int] | None = None,
    num_classes: int | None = None,
) -> Architecture:
    """The architecture a model names: a paper preset, ``mlp`` sized by ``input_size`` (the
    number of features, or the shape of one sample) and ``num_classes`` (both required, as for
    Avalanche's ``SimpleMLP``), or an :class:`Architecture` as given. Sizes given with anything
    but ``mlp`` are an error: the other families fix their own."""
    sized = input_size is not None or num_classes is not None
    if architecture == "mlp":
        if input_size is None or num_classes is None:
            raise ValueError("architecture 'mlp' needs input_size and num_classes")
        shape = (input_size,) if isinstance(input_size, int) else tuple(input_size)
        return mlp_architecture(shape, num_classes)
    if sized:
        raise ValueError("input_size and num_classes size only architecture 'mlp'; "
                         f"{architecture!r} fixes its own")
    if isinstance(architecture, str):
        return get_architecture(architecture)
    return architecture


def build_gate(arch: Architecture, kind: GateKind, num_experts: int) -> SoftmaxGate | AttentiveGate:
    if kind == "softmax":
        return SoftmaxGate(arch.gate_network("softmax"), arch.gate_features, num_experts)
    if kind == "attentive":
        return AttentiveGate(arch.gate_network("attentive"), arch.hidden_size)
    raise ValueError(f"gate must be one of {GATES}, got {kind!r}")


def build_mixture(
    arch: Architecture,
    *,
    gate: GateKind = "attentive",
    num_experts: int | None = None,
    output: OutputMode = "expectation",
) -> MixtureOfExpertsCore:
    m = arch.num_experts if num_experts is None else num_experts
    if m < 1:
        raise ValueError(f"num_experts must be >= 1, got {m}")
    bank = ExpertBank(arch.expert, m)
    return MixtureOfExpertsCore(bank, build_gate(arch, gate, m), output=output)


def build_single_model(arch: Architecture) -> ReferenceExpert:
    """The single-model baseline: one expert of the architecture."""
    return arch.expert.build_reference()


def distilled_mixture(
    teacher: MixtureOfExpertsCore, arch: Architecture
) -> MixtureOfExpertsCore:
    """A softmax-gate mixture routing without the experts' hidden vectors.

    The experts are copied from the attentive-gate ``teacher`` and frozen; the new gate's network
    starts from the teacher's gate network (its output layer stays freshly initialised). Train it
    with the mixture loss alone (the paper: Adam lr 1e-3, 20 epochs; 40 for CIFAR-100).
    """
    if not isinstance(teacher.gate, AttentiveGate):
        raise ValueError("distilled_mixture needs a teacher with an attentive gate")
    bank = copy_module(teacher.bank)
    bank.freeze_existing()
    gate = build_gate(arch, "softmax", bank.num_experts)
    missing = gate.network.load_state_dict(teacher.gate.network.state_dict(), strict=False)
    if missing.unexpected_keys:
        raise ValueError(f"gate networks do not match: {missing.unexpected_keys}")
    device = next(teacher.parameters()).device
    return MixtureOfExpertsCore(bank, gate.to(device), output=teacher.output)


def copy_module(module: M) -> M:
    """A deep copy of ``module`` that shares its process groups: torchrun's SyncBatchNorm
    layers hold one, which cannot be copied (``cannot pickle 'ProcessGroup'``), and the copy
    must talk to the same ranks anyway."""
    memo: dict[int, object] = {}
    if dist.is_available():
        for child in module.modules():
            for value in vars(child).values():
                if isinstance(value, dist.ProcessGroup):
                    memo[id(value)] = value
    return copy.deepcopy(module, memo)
