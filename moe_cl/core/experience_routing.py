"""Routing by experience: a class posterior that cannot forget chooses the experience, the gate
chooses among that experience's experts.

A mixture trained on a stream adds experts for each experience (or reuses some) and freezes
them afterwards. A gate trained on the current experience alone would forget where the old
experiences' samples belong; here the experience of a sample is read from a posterior over
classes kept by statistics that never change once written (``moe_cl.core.router``), and the
gate's softmax runs only over the experts of one experience at a time:

    log p_mix(y | x, t) = logsumexp_{r in t} [ log g_r(x | t) + log f_r(y | x) ],  y in C_t
    combine "task":     p(y | x) = p(t(y) | x) p_mix(y | x, t(y))
                        with p(t | x) = sum_{y in C_t} p(y | x)
    combine "product":  p(y | x) ∝ p(y | x) p_mix(y | x, t(y))^w

where r runs over the routes of experience t (its experts), g(. | t) is the gate's softmax over
them, f_r is expert r's class distribution and p(y | x) is the router's class posterior. An
expert's softmax runs over the classes it was trained on (``support``: its experience's, or every
class seen by then when a replay buffer showed it older ones), and only its experience's classes
are read from it, so an expert that learnt to leave old classes' samples alone says so.
The reported gate of expert i is sum_r p_final(t_r | x) g_r(x | t_r) over its routes: it sums to
one over the experts and is what routing metrics describe.

:func:`seed_vote` lets the experts speak across experiences before that (SEED, Rypesc et al.,
ICLR 2024): every expert group keeps Gaussians of the classes from its experience on, and its
tempered posterior over them, averaged per class over the groups holding it, multiplies into
the router's: log p(y | x) = log p_router(y | x) + w log p_vote(y | x).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

COMBINES = ("task", "product")


@dataclass(frozen=True)
class ExperienceRoutes:
    """Which experts serve which experience, and which classes each experience holds.

    Route r pairs experience ``experience[r]`` with expert ``expert[r]``; an expert reused by a
    later experience has one route per experience it serves. ``classes`` [T, K] is True where
    class k belongs to experience t; ``support`` [M, K] where expert i's softmax covers class k
    (None: the classes of the experiences it serves).
    """

    experience: Tensor
    expert: Tensor
    classes: Tensor
    support: Tensor | None = None

    @classmethod
    def build(cls, expert_experiences: Sequence[Sequence[int]], class_experience: Tensor,
              num_experiences: int, support: Tensor | None = None) -> ExperienceRoutes:
        """From the experiences each expert serves and the experience of each class (-1 for a
        class not seen yet)."""
        pairs = [(t, i) for i, served in enumerate(expert_experiences) for t in served]
        device = class_experience.device
        experience = torch.tensor([t for t, _ in pairs], dtype=torch.long, device=device)
        expert = torch.tensor([i for _, i in pairs], dtype=torch.long, device=device)
        steps = torch.arange(num_experiences, device=device)
        return cls(experience, expert, class_experience[None, :] == steps[:, None], support)

    @property
    def num_experiences(self) -> int:
        return self.classes.shape[0]

    def expert_classes(self, num_experts: int) -> Tensor:
        """[M, K]: the classes of every experience each expert serves."""
        owner = torch.zeros(num_experts, self.num_experiences, device=self.classes.device)
        owner[self.expert, self.experience] = 1.0
        return (owner @ self.classes.float()) > 0


@dataclass
class RoutedMixture:
    """The result of :func:`mix_by_experience`.

    log_probs [B, K]: log p(y | x) (-inf for classes of no experience).
    gate [B, M]: the routing each expert receives, summing to one per sample.
    expert_log_probs [B, M, K]: each expert's log-distribution over the classes it serves.
    """

    log_probs: Tensor
    gate: Tensor
    expert_log_probs: Tensor


def mix_by_experience(scores: Tensor, expert_logits: Tensor, routes: ExperienceRoutes,
                      class_log_posterior: Tensor, *, combine: str = "product",
                      expert_weight: float = 1.0) -> RoutedMixture:
    """Mix experts routed by experience (see the module docstring).

    scores [B, M]: the gate's scores before its softmax; expert_logits [B, M, K];
    class_log_posterior [B, K]: the router's log p(y | x), -inf for classes it must not
    predict (unseen, or outside the given task in task-incremental evaluation).
    """
    if combine not in COMBINES:
        raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")
    neg_inf = float("-inf")
    member = routes.experience[None, :] == torch.arange(
        routes.num_experiences, device=scores.device)[:, None]  # [T, R]
    route_scores = scores[:, routes.expert]  # [B, R]
    per_experience = route_scores[:, None, :].masked_fill(~member[None], neg_inf)
    log_gate = route_scores - per_experience.logsumexp(-1)[:, routes.experience]  # [B, R]
    route_classes = routes.classes[routes.experience]  # [R, K]
    support = route_classes if routes.support is None else routes.support[routes.expert]
    route_log_probs = expert_logits[:, routes.expert].masked_fill(
        ~support[None], neg_inf).log_softmax(-1).masked_fill(~route_classes[None], neg_inf)
    within = (log_gate[..., None] + route_log_probs).logsumexp(1)  # log p_mix(y | x, t(y))
    class_log_posterior = class_log_posterior.log_softmax(-1)
    if combine == "task":
        log_probs = _experience_log_probs(class_log_posterior, routes.classes)[
            :, _class_experience(routes.classes)] + within
    else:
        log_probs = _nan_to(class_log_posterior + expert_weight * within, neg_inf)
    log_probs = log_probs.log_softmax(-1)  # experts with a wider support leave some mass out
    final_experience = _experience_log_probs(log_probs, routes.classes)  # [B, T]
    route_gate = (final_experience[:, routes.experience] + log_gate).exp()  # [B, R]
    gate = scores.new_zeros(scores.shape).index_add_(1, routes.expert, route_gate)
    expert_classes = routes.expert_classes(scores.shape[1])
    expert_log_probs = expert_logits.masked_fill(~expert_classes[None], neg_inf).log_softmax(-1)
    return RoutedMixture(log_probs, gate, expert_log_probs)


def _experience_log_probs(class_log_probs: Tensor, classes: Tensor) -> Tensor:
    """[B, T]: log of the probability mass of each experience's classes."""
    masked = class_log_probs[:, None, :].masked_fill(~classes[None], float("-inf"))
    return masked.logsumexp(-1)


def _nan_to(t: Tensor, value: float) -> Tensor:
    """NaN -> value: 0 * -inf (a class of no experience times an experts' weight of 0)."""
    return t.masked_fill(t.isnan(), value)


def _class_experience(classes: Tensor) -> Tensor:
    """[K]: the experience of each class (0 for classes of none: they are masked anyway)."""
    return classes.float().argmax(0)


def seed_vote(group_log_likelihoods: Tensor, temperature: float) -> Tensor:
    """[B, K] log p_vote(y | x): per class, the mean over the expert groups that hold it of the
    group's softmax(log-likelihood / temperature) over the classes it holds (SEED).

    group_log_likelihoods [G, B, K]: each group's class log-likelihoods, -inf for classes it
    does not hold. Classes no group holds get -inf.
    """
    neg_inf = float("-inf")
    held = group_log_likelihoods > neg_inf
    tempered = (group_log_likelihoods / temperature).log_softmax(-1).masked_fill(~held, neg_inf)
    holders = held.sum(0).clamp(min=1)
    return tempered.logsumexp(0) - holders.log()
