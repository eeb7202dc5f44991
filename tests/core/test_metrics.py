"""Routing metrics on hand-made gates."""

import math

import pytest
import torch

from moe_cl.core.metrics import RoutingAccumulator, entropy_bits, mutual_information_bits


def test_one_hot_gates_have_zero_sample_entropy_and_uniform_gates_log2_m():
    acc = RoutingAccumulator(num_classes=3)
    acc.update(torch.eye(3)[[0, 1, 2, 0]], torch.tensor([0, 1, 2, 0]))
    assert acc.compute()["H_s"] == pytest.approx(0.0)
    acc = RoutingAccumulator(num_classes=3)
    acc.update(torch.full((4, 5), 0.2), torch.tensor([0, 1, 2, 0]))
    assert acc.compute()["H_s"] == pytest.approx(math.log2(5))
    assert acc.compute()["H_u"] == pytest.approx(math.log2(5))


def test_perfect_partition_gives_mi_log2_m_and_collapse_gives_zero():
    labels = torch.arange(4).repeat(5)
    acc = RoutingAccumulator(num_classes=4)
    acc.update(torch.eye(4)[labels], labels, expert_prediction=labels)
    result = acc.compute()
    assert result["MI"] == pytest.approx(2.0)
    assert result["MI_pred"] == pytest.approx(2.0)
    assert result["H_u"] == pytest.approx(2.0)
    assert result["class_routing_entropy"] == pytest.approx([0.0] * 4)
    collapsed = RoutingAccumulator(num_classes=4)
    collapsed.update(torch.eye(4)[torch.zeros(20, dtype=torch.long)], labels)
    result = collapsed.compute()
    assert result["MI"] == pytest.approx(0.0) and result["H_u"] == pytest.approx(0.0)
    assert result["H_s"] == 0.0


def test_accumulating_in_batches_equals_one_batch():
    torch.manual_seed(0)
    gate = torch.softmax(torch.randn(50, 3), -1)
    labels = torch.randint(0, 4, (50,))
    log_probs = torch.log_softmax(torch.randn(50, 4), -1)
    whole = RoutingAccumulator(4)
    whole.update(gate, labels, log_probs=log_probs)
    parts = RoutingAccumulator(4)
    for s in range(0, 50, 7):
        parts.update(gate[s:s + 7], labels[s:s + 7], log_probs=log_probs[s:s + 7])
    a, b = whole.compute(), parts.compute()
    for key in ("H_s", "H_u", "MI", "error", "top5_error"):
        assert a[key] == pytest.approx(b[key])
    assert a["expert_class_counts"] == b["expert_class_counts"]
    assert a["error"] == pytest.approx(float((log_probs.argmax(-1) != labels).float().mean()))


def test_mutual_information_hand_computed():
    counts = torch.tensor([[2, 0], [1, 1]])
    # p(e,y): .5 0 / .25 .25 ; H(Y)=1 ; H(E)=H(.75,.25) ; H(E,Y)=1.5
    h_e = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert mutual_information_bits(counts) == pytest.approx(1 + h_e - 1.5)
    assert float(entropy_bits(torch.tensor([0.5, 0.5, 0.0]))) == pytest.approx(1.0)


def test_gate_mass_and_usage():
    acc = RoutingAccumulator(2)
    acc.update(torch.tensor([[0.6, 0.4], [0.1, 0.9]]), torch.tensor([0, 1]))
    r = acc.compute()
    assert r["expert_class_gate_mass"][0] == pytest.approx([0.6, 0.4])
    assert r["expert_class_gate_mass"][1] == pytest.approx([0.1, 0.9])
    assert r["expert_usage"] == pytest.approx([0.35, 0.65])


def test_expert_count_change_within_a_set_is_refused():
    acc = RoutingAccumulator(2)
    acc.update(torch.ones(2, 2) / 2, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="number of experts changed"):
        acc.update(torch.ones(2, 3) / 3, torch.tensor([0, 1]))


def test_router_error_is_reported_only_when_a_router_posterior_is_given():
    gate = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    target = torch.tensor([0, 1, 1])
    plain = RoutingAccumulator(num_classes=2)
    plain.update(gate, target, log_probs=torch.zeros(3, 2))
    assert "router_error" not in plain.compute()
    routed = RoutingAccumulator(num_classes=2)
    router = torch.tensor([[0.0, -1.0], [0.0, -1.0], [-1.0, 0.0]])  # predicts 0, 0, 1
    routed.update(gate[:2], target[:2], router_log_probs=router[:2])
    routed.update(gate[2:], target[2:], router_log_probs=router[2:])
    assert routed.compute()["router_error"] == pytest.approx(1 / 3)
