"""The reviewer's baselines: streaming LDA fitted a batch at a time with Avalanche's statistics,
the gate network as a parameter-matched classifier, SI with its CPU snapshot bug fixed; each a
method of the registry with its preset, its comparison rows, resumable runs and one-line errors."""

import json
import math

import pytest
import torch
from avalanche.training import Naive, StreamingLDA
from avalanche.training.plugins import SynapticIntelligencePlugin
from torch import nn

from moe_cl.core.bank import count_parameters
from moe_cl.core.zoo import Architecture, mlp_architecture
from moe_cl.run import experiment
from moe_cl.run.cli import main
from moe_cl.run.config import compose
from moe_cl.suite import compare
from moe_cl.training.baselines import (
    BatchedStreamingLDA,
    GateClassifier,
    SLDAClassifier,
    SynapticIntelligenceFixed,
)
from moe_cl.training.checkpoint import (
    load_checkpoint,
    load_plugin_states,
    model_state,
    optimizer_state,
    plugin_states,
    rng_state,
    save_checkpoint,
)
from moe_cl.training.models import MixtureOfExperts, SingleExpertModel
from moe_cl.training.options import ROUTER_FEATURES
from tests.helpers import one_error_line, quiet_evaluator, tiny

QUIET = ["logging.interactive=false", "logging.tensorboard=false", "logging.figures=false"]
VOLATILE = {"wall_time_s", "config"}


def _slda(arch, features="pixels", scenario="class", **kwargs):
    model = SLDAClassifier(architecture=arch, features=features, scenario=scenario)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3) if model.network else None
    strategy = BatchedStreamingLDA(slda_model=model, criterion=nn.NLLLoss(),
                                   feature_optimizer=optimizer, train_mb_size=16,
                                   eval_mb_size=64, evaluator=quiet_evaluator(False), **kwargs)
    return model, strategy


def _avalanche_slda(num_features, num_classes):
    return StreamingLDA(slda_model=nn.Identity(), criterion=nn.NLLLoss(),
                        input_size=num_features, num_classes=num_classes,
                        evaluator=quiet_evaluator(False))


def _small_arch():
    return mlp_architecture((1, 2, 3), 5, width=8, hidden=4)


def _conv_gate_arch(bundle):
    """tiny's mlp experts with a gate network that has a convolutional, BatchNorm trunk."""
    mlp = mlp_architecture(bundle.input_shape, bundle.n_classes)

    def gate(kind):
        return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                             nn.Linear(4 * 6 * 6, 16), nn.ReLU())

    return Architecture("conv_gate", mlp.expert, gate, 16, 2)


# ----------------------------------------------------------------------------- streaming LDA


@pytest.mark.parametrize("features", ROUTER_FEATURES)
def test_slda_takes_every_feature_space_of_the_router(features):
    """The router's registry gives SLDA its maps: its own for all but the gate trunk, which
    comes with the gate classifier whose trunk it is."""
    bundle, _ = tiny()
    arch = _conv_gate_arch(bundle)
    model = SLDAClassifier(architecture=arch, features=features)
    assert (model.feature_map is None) == (model.network is not None) == (features == "gate_trunk")
    assert model.features(torch.randn(3, *arch.input_shape)).shape == (3, model.num_features)


def test_a_batch_fit_gives_avalanches_sample_by_sample_statistics():
    """Classes interleaved in a batch, first samples of classes inside a batch, a class that
    comes back in a later batch: the same muK, cK, Sigma and count as Avalanche's loop."""
    torch.manual_seed(0)
    model, ours = _slda(_small_arch())
    reference = _avalanche_slda(6, 5)
    batches = [(torch.randn(13, 6) + 2, torch.tensor([0, 1, 0, 0, 2, 1, 2, 2, 0, 1, 1, 0, 2])),
               (torch.randn(9, 6) * 3, torch.tensor([3, 0, 3, 1, 3, 3, 0, 2, 3])),
               (torch.randn(1, 6), torch.tensor([1]))]
    for x, y in batches:
        for i in range(len(y)):
            reference.fit(x[i:i + 1], y[i:i + 1])
        ours.fit(x, y)
        for name in ("muK", "cK", "Sigma"):
            assert torch.allclose(getattr(ours, name), getattr(reference, name), atol=1e-5)
        assert ours.num_updates == reference.num_updates
    assert ours.muK is model.muK and model.num_updates == 23  # the statistics are the model's
    assert torch.equal(model.cK, torch.tensor([7.0, 6.0, 5.0, 5.0, 0.0]))


def test_unseen_classes_score_minus_inf_where_avalanche_gives_them_zero():
    torch.manual_seed(1)
    model, ours = _slda(_small_arch())
    reference = _avalanche_slda(6, 5)
    x, y = torch.randn(40, 6) + 3, torch.randint(0, 3, (40,))
    ours.fit(x, y)
    for i in range(len(y)):
        reference.fit(x[i:i + 1], y[i:i + 1])
    probe = torch.randn(20, 6) * 3
    theirs, mine = reference.predict(probe), ours.predict(probe)
    assert torch.allclose(mine[:, :3], theirs[:, :3], rtol=1e-3, atol=1e-3)
    assert (theirs[:, 3:] == 0).all() and torch.isneginf(mine[:, 3:]).all()
    assert (theirs.argmax(1) >= 3).any()  # Avalanche predicts classes it never saw
    assert (mine.argmax(1) < 3).all()


def test_a_sample_whose_allowed_classes_were_never_fitted_gets_equal_scores():
    """Task-incremental evaluation of a task not trained yet: no NaN, uniform over its classes."""
    model = SLDAClassifier(architecture=_small_arch(), features="pixels", scenario="task")
    model.seen = torch.tensor([[True, True, False, False, False],
                               [False, False, True, True, False]])
    model.fit(torch.randn(10, 6), torch.tensor([0, 1] * 5))
    log_probs = model(torch.randn(4, 1, 2, 3), torch.tensor([0, 1, 1, 0]))
    assert torch.isfinite(log_probs[[0, 3]][:, :2]).all()
    assert torch.allclose(log_probs[1:3, 2:4], torch.full((2, 2), math.log(0.5)))
    assert torch.isneginf(log_probs[1:3, [0, 1, 4]]).all()


def test_the_model_holds_the_classifier_a_strategy_never_resets_it():
    torch.manual_seed(2)
    model, strategy = _slda(_small_arch())
    strategy.fit(torch.randn(30, 6), torch.randint(0, 5, (30,)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rebuilt = BatchedStreamingLDA(slda_model=model, criterion=nn.NLLLoss(),
                                  evaluator=quiet_evaluator(False))
    assert rebuilt.num_updates == 30
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    fresh = SLDAClassifier(architecture=_small_arch(), features="pixels")
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(7, 1, 2, 3)
    model.eval(), fresh.eval()
    assert torch.equal(model(x), fresh(x)) and fresh.num_updates == 30
    assert model.statistics_bytes == (5 * 6 + 5 + 6 * 6) * 4
    StreamingLDA.fit(rebuilt, torch.randn(1, 6), torch.tensor([4]))  # Avalanche's own update
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(model(x), fresh(x)) and torch.isfinite(model(x)[:, 4]).all()


def test_each_experience_is_fitted_once_whatever_train_epochs_says():
    torch.manual_seed(3)
    bundle, arch = tiny(3)
    model, strategy = _slda(arch, features="random_conv")
    strategy.train_epochs = 5  # what the experiment asks of every strategy
    sizes = []
    for exp in bundle.benchmark.train_stream:
        strategy.train(exp)
        sizes.append(len(exp.dataset))
        assert model.num_updates == sum(sizes) == int(model.cK.sum())
    results = strategy.eval(bundle.benchmark.test_stream)
    assert next(v for k, v in results.items() if k.startswith("Top1_Acc_Stream")) > 0.9


def test_the_gate_trunk_trains_on_the_first_experience_then_stays_frozen():
    torch.manual_seed(4)
    bundle, _ = tiny(3)
    model, strategy = _slda(_conv_gate_arch(bundle), features="gate_trunk", feature_epochs=2)
    assert model.num_features == 4 * 6 * 6 and model.needs_feature_training
    start = {k: v.clone() for k, v in model.network.state_dict().items()}
    stream = bundle.benchmark.train_stream
    strategy.train(stream[0])
    trained = {k: v.clone() for k, v in model.network.state_dict().items()}
    assert not torch.equal(trained["0.weight"], start["0.weight"])
    assert not torch.equal(trained["1.running_mean"], start["1.running_mean"])
    assert not model.needs_feature_training
    for exp in stream[1:]:
        strategy.train(exp)
    assert all(torch.equal(v, model.network.state_dict()[k]) for k, v in trained.items())
    assert not model.network.training


# ----------------------------------------------------------------------------- the gate network


def test_the_gate_classifier_has_about_the_mixtures_parameters_on_fmnist():
    gate = GateClassifier(architecture="fmnist")
    mixture = MixtureOfExperts(architecture="fmnist", num_experts=10)  # split_fmnist's last size
    assert count_parameters(gate) == 709_578 and count_parameters(mixture) == 844_296
    assert count_parameters(SingleExpertModel(architecture="fmnist")) == 13_300
    gate.seen[0, [2, 5]] = True
    log_probs = gate(torch.randn(3, 1, 28, 28))
    assert torch.isneginf(log_probs[:, [0, 1, 3]]).all()
    assert torch.allclose(log_probs.exp().sum(1), torch.ones(3))


# ----------------------------------------------------------------------------- SI


@pytest.mark.parametrize("plugin_class", [SynapticIntelligencePlugin, SynapticIntelligenceFixed])
def test_si_importances_on_the_cpu_are_zero_with_avalanches_plugin_and_not_with_the_fix(
        plugin_class):
    torch.manual_seed(5)
    bundle, arch = tiny(3)
    model = SingleExpertModel(architecture=arch)
    plugin = plugin_class(si_lambda=1.0)
    strategy = Naive(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-2),
                     criterion=nn.NLLLoss(), train_mb_size=16, train_epochs=2,
                     plugins=[plugin], evaluator=quiet_evaluator(False))
    strategy.train(bundle.benchmark.train_stream[0])
    importance = torch.cat([p.data for p in plugin.ewc_data[1].values()])
    if plugin_class is SynapticIntelligencePlugin:  # Avalanche 0.6's bug, documented
        assert (importance == 0).all()
    else:
        assert (importance > 0).sum() > importance.numel() / 2
        assert not plugin.in_experience


def test_si_state_survives_a_checkpoint_file(tmp_path):
    torch.manual_seed(6)
    bundle, arch = tiny(3)
    model = SingleExpertModel(architecture=arch)
    plugin = SynapticIntelligenceFixed(si_lambda=1.0)
    strategy = Naive(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-2),
                     criterion=nn.NLLLoss(), train_mb_size=16, plugins=[plugin],
                     evaluator=quiet_evaluator(False))
    strategy.train(bundle.benchmark.train_stream[0])
    save_checkpoint(tmp_path / "c.pt", {
        "plugins": plugin_states([plugin]), "model": model_state(model),
        "optimizer": optimizer_state(strategy.optimizer, model),
        "rng": rng_state(torch.device("cpu")), "progress": {}})
    restored = SynapticIntelligenceFixed(si_lambda=1.0)
    restored.in_experience = True
    load_plugin_states([restored], load_checkpoint(tmp_path / "c.pt")["plugins"], model)
    assert restored.in_experience is False
    for saved, loaded in ((plugin.ewc_data[0], restored.ewc_data[0]),
                          (plugin.ewc_data[1], restored.ewc_data[1]),
                          (plugin.syn_data["cum_trajectory"], restored.syn_data["cum_trajectory"])):
        assert saved.keys() == loaded.keys()
        assert all(torch.equal(saved[k].data, loaded[k].data) for k in saved)


# ----------------------------------------------------------------------------- runs


def _run(tmp_path, *args, name="run"):
    out = tmp_path / name
    code = main(["benchmark=tiny", *QUIET, *args, f"out_dir={out}"])
    return code, (json.loads((out / "results.json").read_text()) if code == 0 else None)


@pytest.mark.parametrize("args", [
    ["strategy=slda", "slda.features=pixels"], ["strategy=slda", "slda.features=random_conv"],
    ["strategy=slda", "slda.features=gate_trunk"], ["strategy=si"],
    ["strategy=si", "scenario=task"], ["strategy=slda", "scenario=task"],
    *[[f"strategy={m}", "model.backbone=gate"] for m in ("naive", "ewc", "lwf", "replay")],
])
def test_each_new_method_runs_end_to_end(tmp_path, args):
    code, results = _run(tmp_path, *args)
    assert code == 0 and results["status"] == "complete"
    assert len(results["accuracy_matrix"]) == 3 and results["average_accuracy"] > 0.4
    method = results["method"]
    if method == "slda":
        features = {"pixels": 64, "random_conv": 96, "gate_trunk": 64}[results["config"]["slda"]
                                                                       ["features"]]
        assert results["statistics_bytes"] == (6 * features + 6 + features ** 2) * 4
        assert results["average_accuracy"] > 0.9
    else:
        assert results["statistics_bytes"] is None
    if "model.backbone=gate" in args:  # mlp gate 64-32-16 and a head over 6 classes
        assert results["num_parameters"] == 64 * 32 + 32 + 32 * 16 + 16 + 16 * 6 + 6
    if results["scenario"] == "class":
        assert results["task_aware_average_accuracy"] is not None


@pytest.mark.parametrize("args", [
    ["strategy=slda", "slda.features=gate_trunk"],
    ["strategy=si", "baseline.si_lambda=1000", "train.checkpoint_every_epochs=1"],  # inside
])
def test_killed_runs_resume_to_identical_results(tmp_path, monkeypatch, args):
    args = [*args, "train.epochs=3", "seed=5"]
    code, whole = _run(tmp_path, *args, name="whole")
    assert code == 0
    real_save = experiment.save_checkpoint

    class Killed(Exception):
        pass

    def save_then_die(path, state):
        real_save(path, state)
        raise Killed

    monkeypatch.setattr(experiment, "save_checkpoint", save_then_die)
    cfg = compose(["benchmark=tiny", *QUIET, *args, f"out_dir={tmp_path / 'killed'}"])
    with pytest.raises(Killed):
        experiment.run_experiment(cfg, tmp_path / "killed", echo=lambda _: None)
    monkeypatch.setattr(experiment, "save_checkpoint", real_save)
    resumed = experiment.run_experiment(cfg, tmp_path / "killed", resume=True,
                                        echo=lambda _: None)
    assert {k: v for k, v in resumed.items() if k not in VOLATILE} == {
        k: v for k, v in whole.items() if k not in VOLATILE}


@pytest.mark.parametrize("args, message", [
    (["strategy=slda", "slda.features=edges"], "slda.features='edges' is not valid; choose one "
                                               "of: pixels, random_conv, gate_trunk"),
    (["strategy=slda", "model.backbone=gate"], "model.backbone does not apply to method=slda"),
    (["strategy=attentive", "model.backbone=gate"], "model.backbone does not apply to method=moe"),
    (["strategy=naive", "model.backbone=wide"], "model.backbone='wide' is not valid"),
    (["strategy=slda", "slda.shrinkage=2"], "slda.shrinkage must be in (0, 1], got 2"),
    (["strategy=slda", "slda.shrinkage=0"], "slda.shrinkage must be a finite number > 0"),
    (["strategy=naive", "slda.shrinkage=0.1"], "slda.shrinkage does not apply to method=naive"),
    (["strategy=si", "baseline.si_lambda=-1"], "baseline.si_lambda must be a finite number >= 0"),
    (["strategy=ewc", "baseline.si_lambda=2"], "baseline.si_lambda does not apply"),
])
def test_bad_settings_are_one_line_usage_errors(tmp_path, capsys, args, message):
    code, _ = _run(tmp_path, *args)
    assert code == 2
    assert message in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- the comparison


def test_the_comparison_has_slda_in_each_feature_space_and_the_gate_network_rows():
    for scenario in ("class", "task"):
        names = [v.name for v in compare.variants(scenario)]
        expected = [f"{n}-{scenario}" for n in (
            "naive", "ewc", "lwf", "replay", "joint", "si", "slda+pixels", "slda+random_conv",
            "slda+gate_trunk", "gate-naive", "gate-ewc", "gate-lwf", "gate-replay", "gate-si")]
        assert names[-len(expected):] == expected
        argv = {v.name: v.argv for v in compare.variants(scenario)}
        assert "model.backbone=gate" in argv[f"gate-replay-{scenario}"]
        assert "replay.mem_size=500" in argv[f"gate-replay-{scenario}"]
        assert "slda.features=gate_trunk" in argv[f"slda+gate_trunk-{scenario}"]
        assert argv[f"naive-{scenario}"] == ("strategy=naive", f"scenario={scenario}")


def test_targets_name_the_baselines_that_have_rows():
    def row(accuracy):
        return {"average_accuracy": (accuracy, None)}

    summary = {"moe-grow-class": row(0.21), "naive-class": row(0.18), "ewc-class": row(0.19)}
    assert compare.targets(summary)[0] == ("- class-incremental, no replay: best MoE "
                                           "moe-grow-class 0.210 vs best of naive/ewc ewc-class "
                                           "0.190: met")
    summary |= {"slda+random_conv-class": row(0.89), "gate-naive-class": row(0.2)}
    assert compare.targets(summary)[0].endswith(
        "best of naive/ewc/slda slda+random_conv-class 0.890: NOT met")
