"""Gates, mixture outputs, top-k inference, distillation."""

import math

import pytest
import torch
from torch import nn

from moe_cl.core.bank import ExpertBank
from moe_cl.core.gates import AttentiveGate, SoftmaxGate
from moe_cl.core.mixture import EPS, MixtureOfExpertsCore
from moe_cl.core.zoo import ARCHITECTURES, build_mixture, distilled_mixture, mlp_architecture


def test_attentive_gate_formula():
    torch.manual_seed(0)
    gate = AttentiveGate(nn.Identity(), 4)
    x = torch.randn(3, 4)
    hidden = torch.randn(3, 2, 4)
    q = x @ gate.query.weight.t()
    k = hidden @ gate.key.weight.t()
    expected = torch.softmax((q[:, None, :] * k).sum(-1) / 2.0, -1)
    torch.testing.assert_close(gate(x, hidden), expected)
    with pytest.raises(ValueError, match="hidden_size=4"):
        gate(x, torch.randn(3, 2, 5))


def test_softmax_gate_temperature_and_growth_keep_old_parameters():
    gate = SoftmaxGate(nn.Identity(), 3, 2, temperature=2.0)
    x = torch.randn(5, 3)
    logits = gate.logits(x)
    torch.testing.assert_close(gate(x), torch.softmax(logits / 2.0, -1))
    head = gate.heads[0].weight
    gate.add_experts(2)
    assert gate.num_experts == 4 and gate.heads[0].weight is head
    assert gate(x).shape == (5, 4)


def test_expectation_output_is_the_mixture():
    torch.manual_seed(1)
    model = build_mixture(mlp_architecture((1, 4, 4), 3, num_experts=3), gate="attentive")
    x = torch.randn(4, 1, 4, 4)
    out = model(x)
    mixture = (out.gate[..., None] * out.expert_log_probs.exp()).sum(1)
    torch.testing.assert_close(out.log_probs, torch.log(mixture + EPS))
    torch.testing.assert_close(out.gate.sum(-1), torch.ones(4))


def test_class_mask_restricts_every_expert():
    torch.manual_seed(2)
    model = build_mixture(mlp_architecture((1, 4, 4), 4, num_experts=2), gate="softmax")
    x = torch.randn(3, 1, 4, 4)
    out = model(x, class_mask=torch.tensor([True, False, True, False]))
    assert torch.all(out.expert_log_probs[..., 1].isinf())
    torch.testing.assert_close(out.expert_log_probs.exp().sum(-1), torch.ones(3, 2))
    per_sample = torch.tensor([[True, True, False, False], [False, False, True, True]] * 2)[:3]
    out = model(x, class_mask=per_sample)
    assert out.log_probs.argmax(-1).tolist()[0] in (0, 1)


def test_stochastic_output_samples_in_training_and_takes_argmax_in_eval():
    torch.manual_seed(3)
    model = build_mixture(mlp_architecture((1, 4, 4), 3, num_experts=3), gate="softmax",
                          output="stochastic")
    x = torch.randn(6, 1, 4, 4)
    model.eval()
    out = model(x)
    rows = torch.arange(6)
    torch.testing.assert_close(out.log_probs, out.expert_log_probs[rows, out.gate.argmax(-1)])
    model.train()
    out = model(x)
    matches = (out.log_probs[:, None, :] == out.expert_log_probs).all(-1)
    assert matches.any(-1).all()  # each row is one expert's prediction


def test_top_k_equals_manual_mixture_of_selected_experts():
    torch.manual_seed(4)
    model = build_mixture(ARCHITECTURES["mnist"], gate="softmax").eval()
    x = torch.randn(7, 1, 28, 28)
    dense = model(x)
    top = model.forward_top_k(x, 2)
    values, experts = dense.gate.topk(2, -1)
    weights = values / values.sum(-1, keepdim=True)
    rows = torch.arange(7)[:, None]
    manual = (weights[..., None] * dense.expert_log_probs[rows, experts].exp()).sum(1)
    torch.testing.assert_close(top.log_probs, torch.log(manual + EPS), atol=1e-5, rtol=1e-5)
    full = model.forward_top_k(x, model.num_experts)
    torch.testing.assert_close(full.log_probs, dense.log_probs, atol=1e-5, rtol=1e-5)
    # Y_pred (the selected expert's own prediction) is the same in both paths, for every k.
    for k in (1, 2, model.num_experts):
        assert torch.equal(model.forward_top_k(x, k).selected_expert_prediction(),
                           dense.selected_expert_prediction())


def test_top_k_refuses_attentive_gate_and_bad_k():
    model = build_mixture(ARCHITECTURES["mnist"], gate="attentive").eval()
    with pytest.raises(ValueError, match="distil"):
        model.forward_top_k(torch.randn(2, 1, 28, 28), 1)
    softmax = build_mixture(ARCHITECTURES["mnist"], gate="softmax").eval()
    with pytest.raises(ValueError, match="k must be"):
        softmax.forward_top_k(torch.randn(2, 1, 28, 28), 6)


def test_hidden_size_mismatch_between_gate_and_experts():
    arch = ARCHITECTURES["mnist"]
    with pytest.raises(ValueError, match="hidden_size of the attentive gate"):
        MixtureOfExpertsCore(ExpertBank(arch.expert, 2), AttentiveGate(nn.Identity(), 16))
    with pytest.raises(ValueError, match="num_experts of the gate"):
        MixtureOfExpertsCore(ExpertBank(arch.expert, 2), SoftmaxGate(nn.Identity(), 32, 3))


def test_growth_adds_experts_to_bank_and_softmax_gate():
    model = build_mixture(ARCHITECTURES["mnist"], gate="softmax")
    model.add_experts(2)
    out = model(torch.randn(3, 1, 28, 28))
    assert out.gate.shape == (3, 7) and out.hidden.shape == (3, 7, 32)


@pytest.mark.parametrize("name", ["mnist", "fmnist", "cifar100"])
def test_distilled_mixture_copies_network_and_freezes_experts(name):
    torch.manual_seed(5)
    arch = ARCHITECTURES[name]
    teacher = build_mixture(arch, gate="attentive").eval()
    student = distilled_mixture(teacher, arch).eval()
    x = torch.randn(3, *arch.input_shape)
    for (n, p), (_, q) in zip(teacher.gate.network.named_parameters(),
                              student.gate.network.named_parameters(), strict=False):
        assert torch.equal(p, q), n
    assert all(not p.requires_grad for p in student.bank.parameters())
    torch.testing.assert_close(student(x).expert_log_probs, teacher(x).expert_log_probs)
    assert student.forward_top_k(x, 1).log_probs.shape == (3, arch.num_classes)
    assert math.isclose(float(student(x).gate.sum()), 3.0, rel_tol=1e-5)


@pytest.mark.parametrize(("name", "gate"), [("cifar100", "attentive"), ("fmnist", "softmax")])
def test_copied_expert_computes_and_is_routed_like_its_source(name, gate):
    torch.manual_seed(5)
    arch = ARCHITECTURES[name]
    model = build_mixture(arch, gate=gate, num_experts=3)
    x = torch.randn(4, *arch.input_shape)
    model.train()
    model(x)  # BatchNorm statistics move away from their initial values
    model.add_experts(2)
    model.copy_expert(1, 4)  # from the first group into the second
    model.eval()
    out = model(x)
    torch.testing.assert_close(out.expert_log_probs[:, 4], out.expert_log_probs[:, 1])
    torch.testing.assert_close(out.hidden[:, 4], out.hidden[:, 1])
    torch.testing.assert_close(out.gate[:, 4], out.gate[:, 1])
    assert not torch.allclose(out.gate[:, 3], out.gate[:, 1])  # the other new one is fresh
    with pytest.raises(ValueError, match=r"expert must be in \[0, 5\)"):
        model.copy_expert(5, 0)


def test_expert_mask_gives_masked_experts_exactly_zero():
    torch.manual_seed(6)
    for gate in ("attentive", "softmax"):
        model = build_mixture(mlp_architecture((1, 4, 4), 3, num_experts=4), gate=gate)
        x = torch.randn(2, 1, 4, 4)
        mask = torch.tensor([[True, False, True, False], [False, False, False, True]])
        routed = model(x, expert_mask=mask).gate
        free = model(x).gate
        assert torch.all(routed[~mask] == 0)
        # The allowed experts share the mass in the unmasked proportions.
        torch.testing.assert_close(routed[0, [0, 2]], free[0, [0, 2]] / free[0, [0, 2]].sum())
        torch.testing.assert_close(routed[1], torch.tensor([0.0, 0.0, 0.0, 1.0]))
