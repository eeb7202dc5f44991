"""The configuration takes its choices from the modules that implement them, and its experts
section is the models' ExpertPolicy; saved run configurations still load."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from moe_cl.core import choices, zoo
from moe_cl.data.streams import BENCHMARK_NAMES
from moe_cl.run import config
from moe_cl.training.methods import METHODS
from moe_cl.training.options import (
    EXPERT_INITS,
    EXPERTS_VOTES,
    POLICIES,
    SCENARIOS,
    ExpertPolicy,
)


def test_choices_come_from_their_owners():
    owners = {"data.stream": BENCHMARK_NAMES, "scenario": SCENARIOS, "model.gate": choices.GATES,
              "model.output": choices.OUTPUTS, "experts.policy": POLICIES,
              "experts.init": EXPERT_INITS, "regularizer.ls.scaling": choices.SCALINGS,
              "router.experts_vote": EXPERTS_VOTES}
    for key, owned in owners.items():
        assert config.CHOICES[key] is owned, key
    assert list(config.CHOICES["method"]) == list(METHODS)
    assert config.CHOICES["model.architecture"] == ("auto", *choices.PAPER_ARCHITECTURES, "mlp")
    assert tuple(zoo.ARCHITECTURES) == choices.PAPER_ARCHITECTURES


def test_the_experts_section_is_the_expert_policy():
    cfg = config.compose(["benchmark=tiny", "strategy=attentive", "experts.init=copy"])
    policy = ExpertPolicy(**cfg.experts)
    assert policy == ExpertPolicy("grow", per_experience=1, init="copy")
    assert OmegaConf.structured(config.RunConfig).experts == OmegaConf.structured(ExpertPolicy)


def test_saved_run_configurations_still_load():
    saved = sorted(Path(__file__).resolve().parents[1].glob("results/*/*/*/seed-0/config.yaml"))
    assert saved
    for path in saved:
        cfg = config.load_saved(path)
        assert ExpertPolicy(**cfg.experts).policy in POLICIES
        assert OmegaConf.merge(cfg, OmegaConf.load(path)) == cfg  # every saved value kept


def test_a_benchmark_preset_names_its_default_strategy():
    from moe_cl.run.config import compose

    assert compose(["benchmark=split_fmnist"]).strategy == "routed"
    assert compose(["benchmark=split_fmnist"]).method == "routed"
    assert compose(["benchmark=paper_fmnist"]).strategy == "attentive_ls"  # the paper's method
    assert compose(["benchmark=split_fmnist", "strategy=naive"]).method == "naive"
    assert "strategy" not in compose(["benchmark=split_fmnist"]).data  # a choice, not a setting


def test_a_gpu_by_number_is_a_device():
    """The suites' --jobs hands each run its own GPU as device=cuda:N."""
    assert config.compose(["benchmark=tiny", "device=cuda:1"]).device == "cuda:1"
    for bad in ("gpu", "cuda:x", "cuda:1:2", "cuda:-1"):
        with pytest.raises(config.ConfigError, match="choose one of: auto, cpu, cuda, cuda:N"):
            config.compose(["benchmark=tiny", f"device={bad}"])
