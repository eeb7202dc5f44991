"""Training losses of the mixture and the two routing regularisers of the paper."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from moe_cl.core.choices import SCALINGS, Scaling
from moe_cl.core.mixture import EPS


def expectation_nll(gate: Tensor, expert_log_probs: Tensor, target: Tensor) -> Tensor:
    """L_CE = -mean_n log(sum_i g_i(x_n) f_i(x_n)[y_n] + eps)."""
    rows = torch.arange(len(target), device=target.device)
    f_true = expert_log_probs[rows, :, target].exp()  # [B, M]
    return -torch.log((gate * f_true).sum(-1) + EPS).mean()


def stochastic_nll(gate: Tensor, expert_log_probs: Tensor, target: Tensor) -> Tensor:
    """Jacobs et al.: -mean_n log sum_i g_i exp(-l_i / 2) with l_i = -log f_i[y_n].

    f_i[y] is floored at eps, as the expectation loss floors the mixture: a class the model
    masks (not seen yet) gives a large finite loss instead of an infinite one.
    """
    rows = torch.arange(len(target), device=target.device)
    log_f_true = expert_log_probs[rows, :, target].clamp_min(math.log(EPS))  # [B, M] = -l_i
    return -torch.logsumexp(torch.log(gate + EPS) + 0.5 * log_f_true, dim=-1).mean()


def importance_loss(gate: Tensor, weight: float = 1.0) -> Tensor:
    """L_importance = w * CV(sum_n g(x_n))^2 with the unbiased std over experts."""
    if gate.shape[-1] < 2:
        return gate.new_zeros(())
    importance = gate.sum(0)
    cv = importance.std(unbiased=True) / (importance.mean() + EPS)
    return weight * cv**2


def pairwise_distances(
    x: Tensor,
    *,
    normalize_max: bool = False,
    features: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Euclidean distances between flattened samples (or their features); a constant [B, B]."""
    with torch.no_grad():
        z = features(x) if features is not None else x
        z = z.flatten(1).float()
        distances = torch.cdist(z, z)
        if normalize_max:
            distances = distances / distances.max().clamp_min(EPS)
    return distances


def sample_similarity_terms(gate: Tensor, distances: Tensor) -> tuple[Tensor, Tensor]:
    """(S_same, S_diff) in O(B^2 M) through G G^T.

    S_same = 1/M sum_i sum_{n,m} g_i(n) g_i(m) D_nm
    S_diff = 1/(M^2 - M) sum_{i != j} sum_{n,m} g_i(n) g_j(m) D_nm
    The i != j sum is the all-pairs sum s_n s_m (s = row sums of G, 1 for softmax gates)
    minus the i = j one.
    """
    m = gate.shape[-1]
    same_expert = gate @ gate.t()  # [B, B]
    row_sums = gate.sum(-1)
    all_pairs = row_sums[:, None] * row_sums[None, :]
    s_same = (same_expert * distances).sum() / m
    if m < 2:
        return s_same, gate.new_zeros(())
    s_diff = ((all_pairs - same_expert) * distances).sum() / (m * m - m)
    return s_same, s_diff


def sample_similarity_loss(
    gate: Tensor,
    distances: Tensor,
    *,
    beta_s: float,
    beta_d: float,
    scaling: Scaling = "clean",
) -> Tensor:
    """L_s: penalise dissimilar samples on one expert, reward them on different experts.

    ``clean``: (beta_s S_same - beta_d S_diff) / B^2.
    ``reference``: beta_s S_same - beta_d S_diff / B^2, the form behind the published numbers.
    """
    if scaling not in SCALINGS:
        raise ValueError(f"scaling must be 'clean' or 'reference', got {scaling!r}")
    b2 = float(gate.shape[0]) ** 2
    s_same, s_diff = sample_similarity_terms(gate, distances)
    if scaling == "clean":
        return (beta_s * s_same - beta_d * s_diff) / b2
    return beta_s * s_same - beta_d * s_diff / b2
