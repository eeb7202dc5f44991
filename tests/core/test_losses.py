"""Losses and regularisers against hand-computed values and direct evaluation."""

import math

import pytest
import torch

from moe_cl.core.losses import (
    expectation_nll,
    importance_loss,
    pairwise_distances,
    sample_similarity_loss,
    sample_similarity_terms,
    stochastic_nll,
)
from moe_cl.core.mixture import EPS
from moe_cl.core.zoo import build_mixture, mlp_architecture


def _double_loop_terms(gate: torch.Tensor, distances: torch.Tensor):
    """S_same and S_diff straight from their definitions (O(B^2 M^2))."""
    b, m = gate.shape
    s_same = 0.0
    s_diff = 0.0
    for i in range(m):
        for j in range(m):
            for n in range(b):
                for k in range(b):
                    term = float(gate[n, i] * gate[k, j] * distances[n, k])
                    if i == j:
                        s_same += term
                    else:
                        s_diff += term
    return s_same / m, s_diff / (m * m - m)


def test_sample_similarity_matches_double_loop():
    torch.manual_seed(0)
    gate = torch.softmax(torch.randn(6, 4), -1)
    x = torch.randn(6, 1, 3, 3)
    d = pairwise_distances(x)
    s_same, s_diff = sample_similarity_terms(gate, d)
    ref_same, ref_diff = _double_loop_terms(gate, d)
    assert float(s_same) == pytest.approx(ref_same, rel=1e-5)
    assert float(s_diff) == pytest.approx(ref_diff, rel=1e-5)
    clean = sample_similarity_loss(gate, d, beta_s=0.3, beta_d=0.7, scaling="clean")
    assert float(clean) == pytest.approx((0.3 * ref_same - 0.7 * ref_diff) / 36, rel=1e-5)
    ref = sample_similarity_loss(gate, d, beta_s=0.3, beta_d=0.7, scaling="reference")
    assert float(ref) == pytest.approx(0.3 * ref_same - 0.7 * ref_diff / 36, rel=1e-5)


def test_pairwise_distances_hand_computed_and_max_normalised():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]])
    d = pairwise_distances(x)
    torch.testing.assert_close(d, torch.tensor([[0.0, 5, 10], [5, 0, 5], [10, 5, 0]]))
    dn = pairwise_distances(x, normalize_max=True)
    assert float(dn.max()) == pytest.approx(1.0)
    feats = pairwise_distances(x, features=lambda t: t[:, :1])
    assert float(feats[0, 2]) == pytest.approx(6.0)


def test_sample_similarity_gradient_reaches_only_the_gate():
    torch.manual_seed(1)
    arch = mlp_architecture((1, 4, 4), 3, num_experts=3)
    model = build_mixture(arch, gate="softmax")
    x = torch.randn(8, 1, 4, 4)
    out = model(x)
    loss = sample_similarity_loss(out.gate, pairwise_distances(x), beta_s=1.0, beta_d=1.0)
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.bank.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.gate.parameters())


def test_importance_loss_values():
    balanced = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    assert float(importance_loss(balanced, 0.4)) == pytest.approx(0.0, abs=1e-12)
    gate = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    # Importance = (2, 1, 0): mean 1, unbiased std 1 -> CV^2 = 1.
    assert float(importance_loss(gate, 0.2)) == pytest.approx(0.2, rel=1e-5)


def test_expectation_and_stochastic_losses_hand_computed():
    gate = torch.tensor([[0.25, 0.75]])
    f = torch.tensor([[[0.9, 0.1], [0.2, 0.8]]])
    target = torch.tensor([1])
    expected = -math.log(0.25 * 0.1 + 0.75 * 0.8 + EPS)
    assert float(expectation_nll(gate, f.log(), target)) == pytest.approx(expected, rel=1e-6)
    stochastic = -math.log(0.25 * math.sqrt(0.1) + 0.75 * math.sqrt(0.8))
    assert float(stochastic_nll(gate, f.log(), target)) == pytest.approx(stochastic, rel=1e-5)
    # A masked (unseen) target class: both losses stay finite, floored at eps.
    masked = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]]).log()  # log 0 = -inf for class 1
    assert float(expectation_nll(gate, masked, target)) == pytest.approx(-math.log(EPS))
    floor = -math.log(0.25 * math.sqrt(EPS) + 0.75 * math.sqrt(EPS))
    assert float(stochastic_nll(gate, masked, target)) == pytest.approx(floor, rel=1e-5)


def test_scaling_name_is_checked():
    with pytest.raises(ValueError, match="scaling"):
        sample_similarity_loss(torch.ones(2, 2) / 2, torch.zeros(2, 2), beta_s=1, beta_d=1,
                               scaling="other")


def test_reference_scaled_ls_on_cifar_shaped_inputs_needs_the_max_normalisation():
    """PAPER.md section 2 with the CIFAR-100 betas (1e-3, 1e-5), B = 256, M = 20, unit-variance
    3x32x32 inputs: raw distances make L_s 12.8 nats for uniform and 256 for collapsed routing,
    against a cross-entropy of ln 100 = 4.6 at initialisation; D / max D brings them to 0.15
    and 3.1, within a few nats of it whatever the routing."""
    torch.manual_seed(0)
    x = torch.randn(256, 3, 32, 32)
    uniform = torch.full((256, 20), 1 / 20)
    collapsed = torch.zeros(256, 20)
    collapsed[:, 0] = 1.0
    expected = {(False, "uniform"): 12.8, (False, "collapsed"): 256.0,
                (True, "uniform"): 0.15, (True, "collapsed"): 3.1}
    for (normalize_max, routing), value in expected.items():
        gate = uniform if routing == "uniform" else collapsed
        loss = sample_similarity_loss(gate, pairwise_distances(x, normalize_max=normalize_max),
                                      beta_s=1e-3, beta_d=1e-5, scaling="reference")
        assert float(loss) == pytest.approx(value, rel=0.05), (normalize_max, routing)
    assert 3.1 < math.log(100) < 12.8
