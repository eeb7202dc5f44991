"""What the Avalanche models accept, as plain Python: scenarios and the expert policy.

:class:`ExpertPolicy` is both the policy a :class:`~moe_cl.models.MixtureOfExperts` follows and
the ``experts`` section of the run configuration (``experts.policy=grow``, ...). This module
imports nothing heavy, so the configuration and the command line can offer these choices without
importing torch or Avalanche; ``moe_cl.models`` takes them from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

Scenario = Literal["class", "task"]
PolicyKind = Literal["fixed", "grow", "grow_on_demand"]
ExpertInit = Literal["random", "copy"]

SCENARIOS: tuple[str, ...] = get_args(Scenario)
POLICIES: tuple[str, ...] = get_args(PolicyKind)
EXPERT_INITS: tuple[str, ...] = get_args(ExpertInit)


@dataclass
class ExpertPolicy:
    """How the pool of experts changes from one training experience to the next.

    ``policy``: ``fixed``: the initial experts are reused on every experience. ``grow``:
    ``per_experience`` experts are added at each experience after the first.
    ``grow_on_demand``: experts are added only when the pool fits the new experience poorly:
    on up to ``probe_samples`` samples of it, the mean over samples of the lowest cross-entropy
    of any single expert (nats, masked to the classes known after adding the experience's ones)
    must exceed ``threshold``.
    ``freeze_old``: when experts are added, the existing ones stop training.
    ``init``: how added experts start. ``random``: freshly initialised. ``copy``: as copies of
    the experts the gate sends most of the new experience's probe samples to (the busiest
    first), so that they start with the same routing score as their source instead of losing
    to a gate that has saturated on it; they then diverge by training.
    ``route_by_task`` (task-incremental only): a sample is routed only among the experts added
    for its task (the initial experts belong to the first task; a task that added none may use
    them all), so the gate cannot send a task to experts that never learnt it.

    The fields are typed ``str`` where a ``Literal`` would do, so that the configuration
    reports a bad choice in its own words (``choose one of: ...``).
    """

    policy: str = "fixed"  # one of POLICIES
    per_experience: int = 1
    freeze_old: bool = False
    threshold: float = 1.0
    probe_samples: int = 256
    init: str = "random"  # one of EXPERT_INITS
    route_by_task: bool = False

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"experts.policy must be one of {POLICIES}, got {self.policy!r}")
        if self.per_experience < 1:
            raise ValueError(f"experts.per_experience must be >= 1, got {self.per_experience}")
        if self.probe_samples < 1:
            raise ValueError(f"probe_samples must be >= 1, got {self.probe_samples}")
        if self.init not in EXPERT_INITS:
            raise ValueError(f"experts.init must be one of {EXPERT_INITS}, got {self.init!r}")
