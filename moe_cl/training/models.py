"""Avalanche models: the mixture as a growing ``DynamicModule``, and the single-model baseline.

Both are ``MultiTaskModule``s only so that Avalanche hands them the task labels; they keep one
head over all classes and mask it: to the classes seen so far (class-incremental) or to the
classes of each sample's task (task-incremental). Like Avalanche's ``IncrementalClassifier``,
they also adapt to streams without task labels (Avalanche 0.6's ``class_incremental_benchmark``,
``benchmark_with_validation_stream``, ``split_online_stream``): every sample is then of task 0.

The forward pass returns log-probabilities [B, K] (what Avalanche's accuracy and loss metrics
read) and keeps the whole :class:`~moe_cl.core.mixture.MoEOutput` in ``last_output`` for the
regulariser plugins and routing metrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict

import torch
from avalanche.benchmarks.scenarios import CLExperience
from avalanche.models import DynamicModule, MultiTaskModule
from torch import Tensor, nn

from moe_cl.core.mixture import MixtureOfExpertsCore, MoEOutput, masked_log_softmax
from moe_cl.core.zoo import (
    Architecture,
    build_single_model,
    copy_module,
    distilled_mixture,
    resolve_architecture,
)
from moe_cl.core.zoo import build_mixture as build_core_mixture
from moe_cl.data.tensors import dataset_tensors
from moe_cl.training.options import SCENARIOS, ExpertPolicy, Scenario

NO_TASK_LABELS = object()  # forward(x) without labels: one output under the class-IL mask


class _RoutingSlot:
    """Holds the last forward pass's routing. Copies of the model (LwF's teacher, a distilled
    student) start empty: the slot holds graph tensors, which cannot be deep-copied."""

    __slots__ = ("output",)

    def __init__(self) -> None:
        self.output: MoEOutput | None = None

    def __deepcopy__(self, memo: dict) -> _RoutingSlot:
        return _RoutingSlot()


def experience_task_labels(experience: CLExperience) -> list[int]:
    """The experience's task labels; [0] for experiences of streams without task labels."""
    return list(getattr(experience, "task_labels", [0]))


def experience_classes(experience: CLExperience) -> list[int]:
    """The experience's classes; read from its data where the stream names none (the
    mini-experiences of Avalanche's ``split_online_stream``)."""
    classes = getattr(experience, "classes_in_this_experience", None)
    if classes is None:
        classes = experience.dataset.targets.uniques
    return sorted(classes)


class ClassMaskedModel(MultiTaskModule):
    """A model of one architecture with one head over all classes, masked per batch:
    it keeps track of the classes known per task and registers them in ``adaptation()``.

    ``architecture``: a paper architecture name (``mnist``, ``fmnist``, ``cifar100``,
    ``cifar100_h256``), ``mlp`` (a small fully connected family for flat inputs, sized by
    ``input_size`` and ``num_classes``) or any :class:`~moe_cl.core.zoo.Architecture`.
    """

    def __init__(
        self, architecture: str | Architecture, scenario: Scenario, mask_unseen: bool, *,
        input_size: int | Sequence[int] | None = None, num_classes: int | None = None,
    ) -> None:
        super().__init__()
        if scenario not in SCENARIOS:
            raise ValueError(f"scenario must be one of {SCENARIOS}, got {scenario!r}")
        architecture = resolve_architecture(architecture, input_size=input_size,
                                            num_classes=num_classes)
        self.architecture = architecture
        num_classes = architecture.num_classes
        self.num_classes = num_classes
        self.scenario = scenario
        self.mask_unseen = mask_unseen
        # seen[t, k]: class k belongs to task t (row 0 collects every class in class-IL).
        self.register_buffer("seen", torch.zeros(1, num_classes, dtype=torch.bool))
        self._any_seen: bool | None = None

    def adaptation(self, experience: CLExperience) -> None:
        # MultiTaskModule's bookkeeping, which would read experience.task_labels (missing where
        # a stream has no task labels) and experience.classes_in_this_experience.
        DynamicModule.adaptation(self, experience)
        classes = experience_classes(experience)
        if classes:
            self.max_class_label = max(self.max_class_label, max(classes) + 1)
        if self.training:
            self.known_train_tasks_labels |= set(experience_task_labels(experience))
        if self.scenario == "task" or self.training:
            self.register_classes(experience)

    def register_classes(self, experience: CLExperience) -> None:
        classes = experience_classes(experience)
        if classes and max(classes) >= self.num_classes:
            raise ValueError(
                f"experience has class {max(classes)} but the model has num_classes="
                f"{self.num_classes}"
            )
        task = experience_task_labels(experience)[0] if self.scenario == "task" else 0
        if task >= self.seen.shape[0]:
            grown = self.seen.new_zeros(task + 1, self.num_classes)
            grown[: self.seen.shape[0]] = self.seen
            self.seen = grown
        self.seen[task, classes] = True
        self._any_seen = None

    def forward(self, x: Tensor, task_labels: Tensor | None | object = NO_TASK_LABELS):
        """Log-probabilities [B, K] under the batch's class mask.

        Avalanche's convention for multi-task modules: an explicit ``task_labels=None`` asks for
        every known task's output, as a dict (LwF's distillation does this).
        """
        if task_labels is None:
            if self.scenario != "task":
                return {0: self.predict(x, self._task_mask(0), None)}
            labels = torch.zeros(len(x), dtype=torch.long, device=x.device)
            return {t: self.predict(x, self._task_mask(t), labels + t)
                    for t in range(self.seen.shape[0])}
        labels = None if task_labels is NO_TASK_LABELS else task_labels
        return self.predict(x, self.class_mask(labels), labels)

    def predict(self, x: Tensor, class_mask: Tensor | None,
                task_labels: Tensor | None) -> Tensor:
        raise NotImplementedError

    def _task_mask(self, task: int) -> Tensor | None:
        if self.scenario == "task":
            return self.seen[task]
        return self.class_mask(None)

    def class_mask(self, task_labels: Tensor | None) -> Tensor | None:
        if self.scenario == "task" and task_labels is not None:
            labels = task_labels.clamp(max=self.seen.shape[0] - 1)
            return self.seen[labels]
        if self.mask_unseen and self._has_seen():
            return self.seen.any(0)
        return None

    def _has_seen(self) -> bool:
        """Whether any class is known, read from the device once (not on every forward)."""
        if self._any_seen is None:
            self._any_seen = bool(self.seen.any())
        return self._any_seen

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        saved = state_dict.get(prefix + "seen")
        if saved is not None and saved.shape != self.seen.shape:  # task-IL: a row per task
            self.seen = self.seen.new_zeros(saved.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._any_seen = None


class MixtureOfExperts(ClassMaskedModel):
    """A mixture of experts that reuses or adds experts across experiences (Avalanche model).

    Build it from a paper architecture name (``mnist``, ``fmnist``, ``cifar100``,
    ``cifar100_h256``), any :class:`~moe_cl.core.zoo.Architecture`, or for flat inputs (and
    any input, flattened) ``architecture="mlp"`` with ``input_size`` (an int, or the shape of
    one sample) and ``num_classes``, as Avalanche's ``SimpleMLP`` is sized:
    ``MixtureOfExperts(architecture="mlp", input_size=20, num_classes=10)``.
    """

    def __init__(
        self,
        *,
        architecture: str | Architecture,
        input_size: int | Sequence[int] | None = None,
        num_classes: int | None = None,
        gate: str = "attentive",
        num_experts: int | None = None,
        output: str = "expectation",
        policy: ExpertPolicy | None = None,
        scenario: Scenario = "class",
        mask_unseen_classes: bool = True,
    ) -> None:
        super().__init__(architecture, scenario, mask_unseen_classes, input_size=input_size,
                         num_classes=num_classes)
        self.core = build_core_mixture(self.architecture, gate=gate, num_experts=num_experts,
                                       output=output)
        self.policy = policy or ExpertPolicy()
        self.growth_log: list[dict] = []
        self._trained_experiences: list[int] = []
        # The task each expert was added for (the first experience's task for the initial ones).
        self.expert_tasks: list[int] = [0] * self.core.num_experts
        self._owners: Tensor | None = None
        self._routing = _RoutingSlot()

    @property
    def last_output(self) -> MoEOutput | None:
        """Routing of the last forward pass (output, gate, experts' predictions and hidden)."""
        return self._routing.output

    @last_output.setter
    def last_output(self, output: MoEOutput | None) -> None:
        self._routing.output = output

    @property
    def num_experts(self) -> int:
        return self.core.num_experts

    @property
    def group_sizes(self) -> list[int]:
        return [g.num_experts for g in self.core.bank.groups]

    def predict(self, x: Tensor, class_mask: Tensor | None,
                task_labels: Tensor | None) -> Tensor:
        self.last_output = self.core(x, class_mask, self.expert_mask(task_labels))
        return self.last_output.log_probs

    def forward_top_k(self, x: Tensor, k: int, task_labels: Tensor | None = None) -> Tensor:
        self.last_output = self.core.forward_top_k(x, k, self.class_mask(task_labels),
                                                   self.expert_mask(task_labels))
        return self.last_output.log_probs

    def expert_mask(self, task_labels: Tensor | None) -> Tensor | None:
        """With ``route_by_task`` (task-incremental): each sample may use only the experts its
        task added (all experts when its task added none); else None (no restriction)."""
        if not (self.policy.route_by_task and self.scenario == "task" and task_labels is not None):
            return None
        if self._owners is None or self._owners.device != task_labels.device:
            self._owners = torch.tensor(self.expert_tasks, device=task_labels.device)
        owned = self._owners[None, :] == task_labels[:, None]
        return owned | ~owned.any(1, keepdim=True)

    # -- adaptation across experiences

    def adaptation(self, experience: CLExperience) -> None:
        super().adaptation(experience)
        if not self.training or experience.current_experience in self._trained_experiences:
            return
        first = not self._trained_experiences
        self._trained_experiences.append(experience.current_experience)
        task = experience_task_labels(experience)[0] if self.scenario == "task" else 0
        if first:
            self._set_expert_tasks([task] * self.num_experts)
        if first or self.policy.policy == "fixed":
            return
        entry = {"experience": experience.current_experience, "policy": self.policy.policy}
        probe = None  # one probe pass serves both the growth decision and the copy sources
        if self.policy.policy == "grow_on_demand":
            probe = self.probe(experience)
            score = self.novelty_score(experience, probe)
            entry.update(score=score, threshold=self.policy.threshold)
            if score <= self.policy.threshold:
                self.growth_log.append({**entry, "added": 0, "reason": "pool fits"})
                return
            entry["reason"] = f"best-expert loss {score:.3f} > threshold {self.policy.threshold}"
        else:
            entry["reason"] = "new experience"
        count = self.policy.per_experience
        sources = None
        if self.policy.init == "copy":
            sources = self.busiest_experts(experience, count, probe or self.probe(experience))
        self.add_experts(count, freeze_old=self.policy.freeze_old, copy_from=sources, task=task)
        if sources is not None:
            entry["copied_from"] = sources
        self.growth_log.append({**entry, "added": count})

    def _set_expert_tasks(self, tasks: list[int]) -> None:
        self.expert_tasks = tasks
        self._owners = None

    def add_experts(self, count: int, *, freeze_old: bool = False,
                    copy_from: list[int] | None = None, task: int | None = None) -> None:
        """Add ``count`` experts; old parameters keep their identity (and optimizer state).
        With ``copy_from`` (one expert index per new expert) the new experts start as copies;
        ``task`` is the task they are added for (default: that of the newest experts)."""
        if copy_from is not None and len(copy_from) != count:
            raise ValueError(f"copy_from names {len(copy_from)} experts for {count} new ones")
        first_new = self.num_experts
        if freeze_old:
            self.core.bank.freeze_existing()
        self.core.add_experts(count)
        owner = self.expert_tasks[-1] if task is None else task
        self._set_expert_tasks(self.expert_tasks + [owner] * count)
        for offset, source in enumerate(copy_from or []):
            self.core.copy_expert(source, first_new + offset)

    @torch.no_grad()
    def probe(self, experience: CLExperience) -> tuple[MoEOutput, Tensor]:
        """The mixture's output in eval mode on up to ``probe_samples`` samples of the
        experience (its classes counted as known) and their labels: what growth decisions
        read."""
        x, y, t = class_balanced_samples(experience, self.policy.probe_samples, self._device())
        was_training = self.training
        self.eval()
        try:
            mask = self.class_mask(t)
            if mask is not None:
                mask = mask.clone()
                mask[..., experience_classes(experience)] = True
            return self.core(x, mask), y
        finally:
            self.train(was_training)

    def busiest_experts(self, experience: CLExperience, count: int,
                        probe: tuple[MoEOutput, Tensor] | None = None) -> list[int]:
        """The ``count`` experts with the most gate mass on the experience's probe samples,
        busiest first (cycling through them when there are fewer experts than ``count``)."""
        out, _ = probe or self.probe(experience)
        order = out.gate.sum(0).argsort(descending=True, stable=True).tolist()
        return [order[i % len(order)] for i in range(count)]

    def novelty_score(self, experience: CLExperience,
                      probe: tuple[MoEOutput, Tensor] | None = None) -> float:
        """Mean over probe samples of the lowest single-expert cross-entropy (nats)."""
        out, y = probe or self.probe(experience)
        rows = torch.arange(len(y), device=y.device)
        losses = -out.expert_log_probs[rows, :, y]  # [B, M]
        return float(losses.min(-1).values.mean())

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    # -- distillation and state

    def distilled_copy(self) -> MixtureOfExperts:
        """A copy whose attentive gate is replaced by a softmax gate that routes without the
        experts' hidden vectors (experts frozen, gate network initialised from the attentive
        one), ready to train that gate on the experiences this model was trained on: they
        count as trained, and its policy is ``fixed``, so adaptation adds no expert."""
        student = copy_module(self)
        student.core = distilled_mixture(student.core, student.architecture)
        student.policy = ExpertPolicy("fixed")
        return student

    def grow_to(self, group_sizes: list[int]) -> None:
        """Add expert groups until the bank has ``group_sizes`` (a saved model's structure)."""
        current = self.group_sizes
        if current != group_sizes[: len(current)]:
            raise ValueError(f"cannot grow expert groups {current} into {group_sizes}")
        for size in group_sizes[len(current) :]:
            self.core.add_experts(size)

    # The structure and history travel in the state_dict (torch's extra state), so that a plain
    # ``state_dict()`` / ``load_state_dict()`` round trip restores a grown model.

    def get_extra_state(self) -> dict:
        return {
            "group_sizes": self.group_sizes,
            "frozen_groups": [g.frozen for g in self.core.bank.groups],
            "growth_log": self.growth_log,
            "trained_experiences": self._trained_experiences,
            "policy": asdict(self.policy),
            "expert_tasks": self.expert_tasks,
        }

    def set_extra_state(self, state: dict) -> None:
        self.grow_to(list(state["group_sizes"]))
        for group, frozen in zip(self.core.bank.groups, state["frozen_groups"], strict=True):
            if frozen:
                group.freeze()
        self.growth_log = list(state["growth_log"])
        self._trained_experiences = list(state["trained_experiences"])
        # Saved before task routing existed: every expert belongs to task 0.
        self._set_expert_tasks(list(state.get("expert_tasks", [0] * self.num_experts)))

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        # Grow first, so that the saved tensors of added experts find their modules; torch then
        # applies the (idempotent) extra state once more after this module's own tensors.
        extra = state_dict.get(prefix + "_extra_state")
        if extra is not None:
            self.set_extra_state(extra)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class SingleExpertModel(ClassMaskedModel):
    """The single-model baseline (one expert) with the same masking and output format, so that
    Avalanche's own strategies (Naive, EWC, LwF, Replay, ...) run on a comparable backbone.
    ``architecture``, ``input_size`` and ``num_classes`` as for :class:`MixtureOfExperts`."""

    def __init__(
        self,
        *,
        architecture: str | Architecture,
        input_size: int | Sequence[int] | None = None,
        num_classes: int | None = None,
        scenario: Scenario = "class",
        mask_unseen_classes: bool = True,
    ) -> None:
        super().__init__(architecture, scenario, mask_unseen_classes, input_size=input_size,
                         num_classes=num_classes)
        self.expert = build_single_model(self.architecture)

    def predict(self, x: Tensor, class_mask: Tensor | None,
                task_labels: Tensor | None) -> Tensor:
        logits, _ = self.expert(x)
        return masked_log_softmax(logits, class_mask)


def class_balanced_samples(
    experience: CLExperience, count: int, device: torch.device
) -> tuple[Tensor, Tensor, Tensor]:
    """Up to ``count`` samples of the experience, taken in turn from each of its classes (the
    first of each class, then the second, ...): streams hold an experience's samples sorted by
    class, so its first samples would show one class only. Deterministic, drawing nothing from
    the RNG; read without indexing the dataset sample by sample (which would send the
    strategy's later gather down its slow path)."""
    x, y, t = dataset_tensors(experience.dataset.eval())
    rank = torch.empty_like(y)
    for label in y.unique():
        members = (y == label).nonzero().flatten()
        rank[members] = torch.arange(len(members))
    chosen = torch.argsort(rank, stable=True)[:count]
    return x[chosen].to(device), y[chosen].to(device), t[chosen].to(device)


def routing_output(model: nn.Module) -> MoEOutput:
    """The last forward pass's routing of a :class:`MixtureOfExperts` (clear error otherwise)."""
    output = getattr(model, "last_output", None)
    if output is None:
        raise TypeError(
            "routing plugins need a MixtureOfExperts model that ran a forward pass; "
            f"got {type(model).__name__}"
        )
    return output


__all__ = [
    "ExpertPolicy",
    "MixtureOfExperts",
    "MixtureOfExpertsCore",
    "SingleExpertModel",
    "routing_output",
]
