"""A mixture whose routing cannot forget: experts per experience, chosen by class statistics.

:class:`RoutedMixture` is a :class:`~moe_cl.training.models.MixtureOfExperts` for class-incremental
streams without stored samples. A gate trained on the current experience forgets where old
samples belong and its routing collapses (docs/results.md); here the experience a sample belongs
to is read from a router of class statistics in a frozen feature space
(:mod:`moe_cl.core.router`), written once per experience and never changed, and the paper's
gate (with L_s and L_importance as usual) decides only among the experts of that experience
(:mod:`moe_cl.core.experience_routing`):

- each experience after the first adds ``experts.per_experience`` experts, trained on it while
  every older expert and the gate stay frozen (the gate trains with the first experience's
  experts); with ``experts.max`` reached, the experience instead reuses the group of experts whose
  hidden features separate its classes best (SEED's criterion: the largest mean KL divergence
  between the new classes' Gaussians) and fine-tunes it with cross-entropy plus a distillation of
  its hidden features to a frozen copy;
- after each experience, :class:`RouterUpdate` adds the experience's class statistics (with
  ``router.experts_vote=seed`` also each expert group's, in its hidden space);
- at evaluation, p(y | x) combines the router's posterior (after the expert groups' vote, if
  any) with the experts that own y.

No training sample is kept: the router holds counts, means and one scatter matrix (and each
expert group, when it votes, the same in its hidden space).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from avalanche.benchmarks.scenarios import CLExperience
from avalanche.core import SupervisedPlugin
from torch import Tensor, nn

from moe_cl.core.experience_routing import ExperienceRoutes, mix_by_experience, seed_vote
from moe_cl.core.gates import SoftmaxGate
from moe_cl.core.mixture import MoEOutput
from moe_cl.core.router import ClassStatistics, trunk_features
from moe_cl.core.zoo import copy_module
from moe_cl.data.tensors import dataset_tensors
from moe_cl.training.models import (
    MixtureOfExperts,
    class_balanced_samples,
    experience_classes,
    routing_output,
)
from moe_cl.training.options import FEATURE_SPACES, ExpertPolicy, RouterOptions

# The expert groups' covariance is shrunk by this fraction of its mean diagonal (the issue 22
# measurement's choice: the experts' hidden scale is learnt, so the ridge follows it).
VOTE_SHRINKAGE = 0.1


@dataclass
class RoutedOutput(MoEOutput):
    """A routed mixture's evaluation pass, with the router's class posterior after the expert
    groups' vote (``router.experts_vote``; None without one), so that what the vote changed
    can be counted against ``router_log_probs``."""

    voted_log_probs: Tensor | None = None


class RoutedMixture(MixtureOfExperts):
    """Experts added (or reused) per experience, routed by a router that cannot forget.

    ``policy``: ``per_experience`` experts per experience after the first (the first has
    ``num_experts``), ``init`` how they start, ``max`` the cap past which groups are reused,
    ``reuse_distillation`` the weight of the feature distillation while one is fine-tuned.
    ``router``: the feature space and how its posterior combines with the experts.
    """

    def __init__(self, *, policy: ExpertPolicy | None = None,
                 router: RouterOptions | None = None, **mixture: Any) -> None:
        """``mixture``: the keyword arguments of :class:`~moe_cl.training.models.MixtureOfExperts`
        (architecture, gate, num_experts, output, scenario)."""
        policy = policy or ExpertPolicy("grow")
        if policy.policy != "grow":
            raise ValueError("a routed mixture adds (or reuses) experts for every experience: "
                             f"experts.policy must be grow, got {policy.policy}")
        super().__init__(policy=policy, **mixture)
        if policy.max and policy.max < max(self.num_experts, policy.per_experience):
            raise ValueError(f"experts.max={policy.max} is below the experts one experience "
                             f"needs ({max(self.num_experts, policy.per_experience)})")
        self.router = router or RouterOptions()
        self.gate_frozen = False
        self.reused_group: int | None = None  # the group fine-tuned on the current experience
        self.reuse_teacher: nn.Module | None = None  # its frozen copy, for the distillation
        self._experience: int | None = None  # the experience being trained
        self._routes: ExperienceRoutes | None = None
        # expert_experiences[i]: the experiences expert i serves; expert_support[i]: the classes
        # its softmax was trained over (every class seen by the end of its last experience).
        self.expert_experiences: list[list[int]] = [[] for _ in range(self.num_experts)]
        self.expert_support: list[list[int]] = [[] for _ in range(self.num_experts)]
        # class_experience[k]: the experience class k arrived with (-1: not yet).
        self.register_buffer("class_experience",
                             torch.full((self.num_classes,), -1, dtype=torch.long))
        # None: the gate network's trunk (gate_trunk)
        self.features = FEATURE_SPACES[self.router.feature](self.architecture.input_shape,
                                                            self.router)
        self.statistics = ClassStatistics(self.num_classes, self._feature_size(),
                                          self.router.shrinkage)
        # With experts_vote=seed, vote_statistics[g]: class statistics in group g's hidden space.
        self.vote_statistics = nn.ModuleList() if self.router.experts_vote == "seed" else None
        self._sync_vote_statistics()

    # -- the feature space

    def _feature_size(self) -> int:
        with torch.no_grad():
            probe = torch.zeros(1, *self.architecture.input_shape)
            was_training = self.training
            self.eval()
            size = self.router_features(probe).shape[1]
            self.train(was_training)
        return size

    @property
    def statistics_bytes(self) -> int:
        """What the router keeps instead of samples: its class statistics (and the expert
        groups' for their vote), in bytes."""
        return self.statistics.nbytes + sum(s.nbytes for s in self.vote_statistics or ())

    def router_features(self, x: Tensor) -> Tensor:
        """The router's features of a batch: a fixed function once the first experience has
        trained the gate (``gate_trunk``), fixed from the start otherwise."""
        if self.features is not None:
            return self.features(x)
        return trunk_features(self.core.gate.network, x)

    @torch.no_grad()
    def update_router(self, experience: CLExperience, chunk: int = 4096) -> None:
        """Add the class statistics of the experience's data (its evaluation view): the
        router's and, for a vote, those of every expert group that arrived by this experience,
        in its hidden space. A group is frozen after its experience, so its statistics are
        exact; a group reused past ``experts.max``
        keeps its older classes' statistics as they were (their data is gone) and adds the new
        classes' in its fine-tuned space, as SEED does (the distillation keeps the drift small)."""
        x, y, _ = dataset_tensors(experience.dataset.eval())
        device = self.class_experience.device
        voters = [g for g in range(len(self.vote_statistics or ()))
                  if self.expert_experiences[self._group_slice(g).start][0]
                  <= experience.current_experience]
        was_training = self.training
        self.eval()
        try:
            for start in range(0, len(x), chunk):
                batch, labels = x[start:start + chunk].to(device), y[start:start + chunk]
                self.statistics.update(self.router_features(batch), labels)
                if voters:
                    _, hidden = self.core.bank(batch)
                    for group in voters:
                        self.vote_statistics[group].update(self._group_hidden(hidden, group),
                                                           labels)
        finally:
            self.train(was_training)

    def _sync_vote_statistics(self) -> None:
        """One set of class statistics per expert group when the groups vote, added with the
        group (so a checkpoint inside an experience holds one for each)."""
        if self.vote_statistics is None:
            return
        for size in self.group_sizes[len(self.vote_statistics):]:
            self.vote_statistics.append(ClassStatistics(
                self.num_classes, size * self.core.bank.hidden_size, VOTE_SHRINKAGE,
                relative_shrinkage=True).to(self.class_experience.device))

    def _group_hidden(self, hidden: Tensor, group: int) -> Tensor:
        """[B, m H]: group ``group``'s hidden vectors (before their last ReLU), side by side."""
        return hidden[:, self._group_slice(group)].flatten(1)

    # -- adaptation across experiences

    def adaptation(self, experience: CLExperience) -> None:
        super(MixtureOfExperts, self).adaptation(experience)  # class masks; growth is ours
        if not self.training:
            return
        step = experience.current_experience
        self._experience = step
        if step in self._trained_experiences:
            return  # resumed inside this experience: the decisions are made
        self._assign_classes(experience)
        if not self._trained_experiences:
            self.expert_experiences = [[step] for _ in range(self.num_experts)]
        else:
            self._freeze_all()
            if self.policy.max and self.num_experts + self.policy.per_experience > self.policy.max:
                self._reuse(experience)
            else:
                self._grow(experience)
            self._sync_vote_statistics()
        seen = (self.class_experience >= 0).nonzero().flatten().tolist()
        self.expert_support += [[] for _ in range(self.num_experts - len(self.expert_support))]
        for expert, served in enumerate(self.expert_experiences):
            if step in served:
                self.expert_support[expert] = seen
        self._trained_experiences.append(step)
        self._routes = None

    def _assign_classes(self, experience: CLExperience) -> None:
        classes = torch.tensor(experience_classes(experience))
        earlier = self.class_experience.cpu()[classes]
        if (earlier >= 0).any():
            raise ValueError(
                "a routed mixture needs each class in one experience (class-incremental "
                f"streams); classes {classes[earlier >= 0].tolist()} came before")
        self.class_experience[classes.to(self.class_experience.device)] = (
            experience.current_experience)

    def _freeze_all(self) -> None:
        """Old experts and the gate stop changing: what they route and predict is kept."""
        self.core.bank.freeze_existing()
        for group in self.core.bank.groups:
            group.requires_grad_(False)
        self.reused_group, self.reuse_teacher = None, None
        self._freeze_gate()

    def _freeze_gate(self) -> None:
        """The gate keeps what it learnt with the first experience; only a softmax gate's output
        rows of experts still in training (an unfrozen group's) stay trainable."""
        self.gate_frozen = True
        gate = self.core.gate
        gate.requires_grad_(False)
        gate.eval()
        if isinstance(gate, SoftmaxGate):
            for head, group in zip(gate.heads, self.core.bank.groups, strict=True):
                head.requires_grad_(not group.frozen)

    def _grow(self, experience: CLExperience) -> None:
        count = self.policy.per_experience
        sources = None
        if self.policy.init == "copy":
            sources = self.busiest_experts(experience, count)
        self.add_experts(count, copy_from=sources)
        step = experience.current_experience
        self.expert_experiences += [[step] for _ in range(count)]
        entry = {"experience": step, "policy": "grow", "decision": "add", "added": count,
                 "reason": "new experience"}
        if sources is not None:
            entry["copied_from"] = sources
        self.growth_log.append(entry)

    def _reuse(self, experience: CLExperience) -> None:
        scores = self.separation_scores(experience)
        group = max(range(len(scores)), key=lambda g: scores[g])
        self.start_reuse(group)
        step = experience.current_experience
        for expert in self._group_experts(group):
            self.expert_experiences[expert].append(step)
        self.growth_log.append({
            "experience": step, "policy": "grow", "decision": "reuse", "added": 0,
            "reused_group": group, "reused_experts": self._group_experts(group),
            "scores": scores, "reason": f"experts.max={self.policy.max} reached; group {group} "
                                        "separates the new classes best (mean KL)"})

    def start_reuse(self, group: int) -> None:
        """Fine-tune expert group ``group`` (BatchNorm statistics stay fixed) next to a frozen
        copy of it, whose hidden features the distillation term keeps it close to."""
        self.reused_group = group
        target = self.core.bank.groups[group]
        self.reuse_teacher = copy_module(target)
        self.reuse_teacher.requires_grad_(False)
        target.requires_grad_(True)

    def _group_slice(self, group: int) -> slice:
        first = sum(self.group_sizes[:group])
        return slice(first, first + self.group_sizes[group])

    def _group_experts(self, group: int) -> list[int]:
        experts = self._group_slice(group)
        return list(range(experts.start, experts.stop))

    @torch.no_grad()
    def separation_scores(self, experience: CLExperience) -> list[float]:
        """Per expert group, the mean over its experts of the mean pairwise KL divergence
        between Gaussians of the experience's classes in that expert's hidden space (SEED)."""
        x, y, _ = class_balanced_samples(experience, self.policy.probe_samples, self._device())
        was_training = self.training
        self.eval()
        try:
            _, hidden = self.core.bank(x)  # [B, M, H]
        finally:
            self.train(was_training)
        per_expert = [mean_pairwise_kl(hidden[:, i], y) for i in range(self.num_experts)]
        return [sum(per_expert[i] for i in self._group_experts(g)) / size
                for g, size in enumerate(self.group_sizes)]

    def train(self, mode: bool = True) -> RoutedMixture:
        super().train(mode)
        if self.gate_frozen:
            self.core.gate.eval()  # its BatchNorm statistics stay those of the first experience
        return self

    # -- forward

    def routes(self) -> ExperienceRoutes:
        if self._routes is None or self._routes.classes.device != self.class_experience.device:
            steps = max((max(served) for served in self.expert_experiences if served),
                        default=0) + 1
            support = torch.zeros(self.num_experts, self.num_classes, dtype=torch.bool,
                                  device=self.class_experience.device)
            for expert, classes in enumerate(self.expert_support):
                support[expert, classes] = True
            self._routes = ExperienceRoutes.build(self.expert_experiences,
                                                  self.class_experience, steps, support)
        return self._routes

    def predict(self, x: Tensor, class_mask: Tensor | None,
                task_labels: Tensor | None) -> Tensor:
        if self.training and self._experience is not None:
            self.last_output = self._train_forward(x)
        else:
            self.last_output = self._routed_forward(x, class_mask)
        return self.last_output.log_probs

    def _train_forward(self, x: Tensor) -> MoEOutput:
        """Training on experience t: its experts alone, their softmax over every class seen so
        far (samples of older classes reach them only from a replay buffer, and teach them to
        leave such samples to older experts); while a group is reused, the distillation of its
        hidden features is the auxiliary loss."""
        step = self._experience
        classes = (self.class_experience >= 0) & (self.class_experience <= step)
        experts = torch.tensor([step in served for served in self.expert_experiences],
                               device=x.device)
        out = self.core(x, classes, experts.expand(len(x), -1))
        if self.reuse_teacher is not None:
            _, teacher_hidden = self.reuse_teacher(x)
            drift = (out.hidden[:, self._group_slice(self.reused_group)]
                     - teacher_hidden).pow(2).mean()
            out.auxiliary_loss = self.policy.reuse_distillation * drift
        return out

    def _routed_forward(self, x: Tensor, class_mask: Tensor | None) -> RoutedOutput:
        logits, hidden = self.core.bank(x)
        scores = self.core.gate.scores(x, hidden)
        posterior = self.statistics.log_likelihoods(self.router_features(x)).to(x.dtype)
        if class_mask is not None:  # task-incremental: the task's classes; else the seen ones
            posterior = posterior.masked_fill(~class_mask, float("-inf"))
        voted = None
        if self.vote_statistics is not None:
            voted = posterior + self.router.vote_weight * self.experts_vote(hidden).to(x.dtype)
        routed = mix_by_experience(scores, logits, self.routes(),
                                   posterior if voted is None else voted,
                                   combine=self.router.combine,
                                   expert_weight=self.router.expert_weight)
        return RoutedOutput(routed.log_probs, routed.gate, routed.expert_log_probs, hidden,
                            routed.gate.argmax(-1), router_log_probs=posterior.log_softmax(-1),
                            voted_log_probs=None if voted is None else voted.log_softmax(-1))

    def experts_vote(self, hidden: Tensor) -> Tensor:
        """[B, K] the expert groups' log p_vote(y | x) from their class statistics
        (:func:`~moe_cl.core.experience_routing.seed_vote`); 0 for classes no group holds, so
        that they keep the router's posterior and a vote weight of 0 changes nothing at all."""
        group_scores = torch.stack([statistics.log_likelihoods(self._group_hidden(hidden, g))
                                    for g, statistics in enumerate(self.vote_statistics)])
        vote = seed_vote(group_scores, self.router.vote_temperature)
        return vote.masked_fill(vote.isinf(), 0.0)

    # -- state

    def get_extra_state(self) -> dict:
        return {**super().get_extra_state(), "expert_experiences": self.expert_experiences,
                "expert_support": self.expert_support, "gate_frozen": self.gate_frozen,
                "reused_group": self.reused_group}

    def set_extra_state(self, state: dict) -> None:
        super().set_extra_state(state)
        self.expert_experiences = [list(e) for e in state["expert_experiences"]]
        self.expert_support = [list(c) for c in state["expert_support"]]
        if state["gate_frozen"]:
            self._freeze_gate()
        if state["reused_group"] is not None:
            self.start_reuse(state["reused_group"])
        self._sync_vote_statistics()
        self._routes = None


def mean_pairwise_kl(features: Tensor, labels: Tensor, jitter: float = 1e-4) -> float:
    """Mean KL divergence over ordered pairs of the classes' Gaussians (full covariance plus
    ``jitter`` * I), in nats; 0 for fewer than two classes."""
    classes = labels.unique().tolist()
    gaussians = []
    for c in classes:
        f = features[labels == c].double()
        centred = f - f.mean(0)
        cov = centred.T @ centred / max(len(f) - 1, 1)
        cov.diagonal().add_(jitter)
        gaussians.append(torch.distributions.MultivariateNormal(f.mean(0), cov))
    pairs = [(a, b) for a in gaussians for b in gaussians if a is not b]
    if not pairs:
        return 0.0
    return float(sum(torch.distributions.kl_divergence(a, b) for a, b in pairs) / len(pairs))


class RouterUpdate(SupervisedPlugin, supports_distributed=True):
    """Feeds a :class:`RoutedMixture`: after each training experience its router takes the
    experience's class statistics, and while a group is reused the feature distillation joins
    the loss. :class:`~moe_cl.training.strategies.MoEStrategy` adds it by itself; add it to other
    Avalanche strategies that train a routed mixture.

    Under torchrun every rank adds the whole experience (not its shard): the router is
    computed from the same data and weights on every rank, and the merge is exact, so no
    statistics travel between ranks; ``plugins.DataParallel`` then broadcasts rank 0's buffers
    (these statistics among them), so every rank routes with bit-identical statistics."""

    def before_backward(self, strategy, **kwargs) -> None:
        loss = routing_output(strategy.model).auxiliary_loss
        if loss is not None:
            strategy.loss = strategy.loss + loss

    def after_training_exp(self, strategy, **kwargs) -> None:
        strategy.model.update_router(strategy.experience)
