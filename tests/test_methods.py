"""The method registry: the command line's choices, key validation, --help and the comparison's
baselines come from it, a new entry is a new method everywhere, and reading it is light."""

import json
import subprocess
import sys

import pytest

from moe_cl.errors import ConfigError
from moe_cl.run.cli import help_text, main
from moe_cl.run.config import CHOICES, compose, preset_names
from moe_cl.suite import compare
from moe_cl.training.methods import METHODS, Method, key_applies, naive_strategy


def test_choices_help_and_baselines_list_the_registry():
    assert list(CHOICES["method"]) == list(METHODS)
    assert {"moe", "naive", "ewc", "lwf", "replay", "joint"} <= set(METHODS)
    text = help_text()
    for method in METHODS.values():
        assert f"  {method.name:<22}{method.description}" in text
    assert compare.baselines() == [m.name for m in METHODS.values() if not m.mixture]
    assert {"naive", "ewc", "lwf", "replay", "joint"} <= set(compare.baselines())
    assert METHODS["moe"].mixture and not METHODS["naive"].mixture
    assert [m.name for m in METHODS.values() if m.joint] == ["joint"]


def test_every_method_has_a_strategy_preset_of_its_name():
    """The comparison runs each baseline as strategy=NAME."""
    assert set(METHODS) <= set(preset_names("strategy"))


def test_keys_apply_to_the_methods_that_list_them_and_other_keys_to_all():
    assert key_applies("moe", "experts.policy") and not key_applies("naive", "experts.policy")
    assert key_applies("moe", "replay.mem_size") and key_applies("replay", "replay.mem_size")
    assert not key_applies("ewc", "replay.mem_size")
    assert key_applies("ewc", "baseline.ewc_lambda")
    assert not key_applies("lwf", "baseline.ewc_lambda")
    assert all(key_applies(m, "train.lr") for m in METHODS)


@pytest.mark.parametrize("args, ignored", [
    (["strategy=naive", "model.gate=softmax"], "model.gate does not apply to method=naive"),
    # keys the strategy preset sets count too: its L_s would be dropped without a word
    (["strategy=attentive_ls", "method=naive"], "regularizer.ls.beta_s"),
    (["strategy=ewc", "baseline.lwf_alpha=2"], "baseline.lwf_alpha does not apply"),
])
def test_keys_a_method_would_ignore_are_refused(args, ignored):
    with pytest.raises(ConfigError, match=ignored.replace(".", r"\.")):
        compose(["benchmark=tiny", *args])
    # the benchmark preset's keys serve every method: tiny sets experts.* and model.*
    assert compose(["benchmark=tiny", "strategy=naive"]).method == "naive"


def test_an_unknown_method_is_named_with_the_choices():
    with pytest.raises(ConfigError, match="method='toy' is not valid; choose one of: ") as err:
        compose(["benchmark=tiny", "strategy=attentive", "method=toy"])
    assert str(err.value).endswith(", ".join(METHODS))


def test_a_new_entry_is_a_method_everywhere(monkeypatch, tmp_path, capsys):
    built = []

    def toy_strategy(cfg, common, bundle):
        built.append(type(common["model"]).__name__)
        return naive_strategy(cfg, common, bundle)

    toy = Method("toy", "a toy baseline for this test", toy_strategy, keys=("baseline.ewc_lambda",))
    monkeypatch.setitem(METHODS, "toy", toy)
    assert "toy" in CHOICES["method"] and "toy" in compare.baselines()
    assert "a toy baseline for this test" in help_text()
    assert key_applies("toy", "baseline.ewc_lambda") and not key_applies("naive",
                                                                         "baseline.ewc_lambda")
    out = tmp_path / "run"
    assert main(["benchmark=tiny", "strategy=naive", "method=toy", "train.epochs=1",
                 "logging.interactive=false", "logging.tensorboard=false",
                 "logging.figures=false", f"out_dir={out}"]) == 0
    assert built == ["SingleExpertModel"]
    assert json.loads((out / "results.json").read_text())["method"] == "toy"


def test_the_registry_and_the_configuration_load_without_avalanche():
    """--help and usage errors read them before anything trains (the lazy start)."""
    code = ("import sys, moe_cl.training.methods, moe_cl.training.options, moe_cl.core.choices; "
            "light = 'torch' not in sys.modules; import moe_cl.run.config, moe_cl.run.cli; "
            "print(light, 'avalanche' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.split() == ["True", "False"]
