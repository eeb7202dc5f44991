"""The routed mixture: a router of class statistics picks the experience, experts per
experience stay frozen, groups are reused past the cap, the expert groups may vote across
experiences (SEED), and no training sample is kept."""

import copy
import math

import pytest
import torch
from avalanche.training.plugins import ReplayPlugin

from moe_cl.core.experience_routing import seed_vote
from moe_cl.core.router import ClassStatistics
from moe_cl.core.zoo import mlp_architecture
from moe_cl.data.streams import make_benchmark
from moe_cl.data.tensors import dataset_tensors
from moe_cl.training.models import MixtureOfExperts
from moe_cl.training.options import FEATURE_SPACES, ROUTER_FEATURES, ExpertPolicy, RouterOptions
from moe_cl.training.routed import RoutedMixture, RouterUpdate, mean_pairwise_kl
from moe_cl.training.strategies import MoEStrategy
from tests.helpers import one_error_line, quiet_evaluator


def _tiny(n_experiences=3, scenario="class", seed=0):
    bundle = make_benchmark("tiny", n_experiences=n_experiences, scenario=scenario, seed=seed)
    arch = mlp_architecture(bundle.input_shape, bundle.n_classes, width=32, hidden=16)
    return bundle, arch


def _routed(arch, *, feature="pixels", scenario="class", experts_vote="none", **policy):
    policy = ExpertPolicy("grow", per_experience=policy.pop("per_experience", 2), **policy)
    return RoutedMixture(architecture=arch, num_experts=2, policy=policy, scenario=scenario,
                         router=RouterOptions(feature=feature, experts_vote=experts_vote))


def _strategy(model, *, epochs=3, plugins=()):
    return MoEStrategy(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=3e-3),
                       train_mb_size=32, train_epochs=epochs, eval_mb_size=256,
                       plugins=list(plugins), evaluator=quiet_evaluator())


def _stream_accuracy(results: dict) -> float:
    return next(v for k, v in results.items() if k.startswith("Top1_Acc_Stream"))


def test_routed_mixture_remembers_what_a_gate_trained_on_the_stream_forgets():
    torch.manual_seed(0)
    bundle, arch = _tiny()
    routed = _routed(arch, feature="random_conv")
    plain = MixtureOfExperts(architecture=arch, num_experts=2,
                             policy=ExpertPolicy("grow", per_experience=2))
    accuracy = {}
    for name, model in (("routed", routed), ("plain", plain)):
        strategy = _strategy(model)
        for experience in bundle.benchmark.train_stream:
            strategy.train(experience)
        accuracy[name] = _stream_accuracy(strategy.eval(bundle.benchmark.test_stream))
    assert accuracy["routed"] > 0.9
    assert accuracy["routed"] > accuracy["plain"] + 0.15, accuracy  # the plain one forgets
    assert routed.expert_experiences == [[0], [0], [1], [1], [2], [2]]
    assert routed.statistics.counts.tolist() == [
        64.0 if c in bundle.class_order else 0.0 for c in range(bundle.n_classes)]


def test_router_update_is_added_once_by_the_strategy():
    _, arch = _tiny()
    strategy = _strategy(_routed(arch), plugins=[RouterUpdate()])
    assert sum(isinstance(p, RouterUpdate) for p in strategy.plugins) == 1
    strategy = _strategy(_routed(arch))
    assert sum(isinstance(p, RouterUpdate) for p in strategy.plugins) == 1


def test_old_experts_and_the_gate_stay_bit_identical():
    torch.manual_seed(1)
    bundle, arch = _tiny()
    model = _routed(arch)
    strategy = _strategy(model, epochs=2)
    strategy.train(bundle.benchmark.train_stream[0])
    before = copy.deepcopy({k: v for k, v in model.state_dict().items()
                            if k.startswith(("core.gate.", "core.bank.groups.0."))})
    for experience in bundle.benchmark.train_stream[1:]:
        strategy.train(experience)
    after = model.state_dict()
    assert before and all(torch.equal(v, after[k]) for k, v in before.items())
    assert model.gate_frozen and not any(p.requires_grad for p in model.core.gate.parameters())


def test_routing_metrics_describe_the_routed_gate():
    torch.manual_seed(2)
    bundle, arch = _tiny()
    model = _routed(arch, feature="random_conv")
    strategy = _strategy(model, epochs=2)
    for experience in bundle.benchmark.train_stream:
        strategy.train(experience)
    model.eval()
    x = torch.randn(16, *bundle.input_shape)
    log_probs = model(x)
    out = model.last_output
    assert torch.allclose(out.gate.sum(-1), torch.ones(16), atol=1e-5)
    assert torch.allclose(log_probs.exp().sum(-1), torch.ones(16), atol=1e-5)
    # The selected expert serves the experience of the predicted class, most of the time
    # exactly (the gate mass is p(t | x) g(. | t)).
    experience_of_class = model.class_experience[log_probs.argmax(-1)]
    served = [model.expert_experiences[e] for e in out.selected.tolist()]
    agree = sum(int(t) in s for t, s in zip(experience_of_class.tolist(), served, strict=True))
    assert agree >= 12
    assert out.router_log_probs is not None


def test_past_the_cap_the_best_separating_group_is_reused_and_distilled():
    torch.manual_seed(3)
    bundle, arch = _tiny(n_experiences=3)
    model = _routed(arch, max=4, reuse_distillation=5.0)
    seen_aux = []

    class Spy(RouterUpdate):
        def before_backward(self, strategy, **kwargs):
            seen_aux.append(strategy.model.last_output.auxiliary_loss is not None)

    strategy = _strategy(model, epochs=2, plugins=[Spy()])
    strategy.train(bundle.benchmark.train_stream[0])
    strategy.train(bundle.benchmark.train_stream[1])
    assert not any(seen_aux)
    frozen = copy.deepcopy(model.state_dict())
    strategy.train(bundle.benchmark.train_stream[2])
    assert all(seen_aux[-4:])
    entry = model.growth_log[-1]
    assert entry["decision"] == "reuse" and len(entry["scores"]) == 2
    assert all(score > 0 for score in entry["scores"])  # both classes reached the probe
    reused = entry["reused_group"]
    assert reused == max(range(2), key=lambda g: entry["scores"][g])
    assert model.num_experts == 4
    assert all(2 in model.expert_experiences[e] for e in entry["reused_experts"])
    after = model.state_dict()
    other = 1 - reused
    assert all(torch.equal(frozen[k], after[k]) for k in frozen
               if k.startswith(f"core.bank.groups.{other}."))
    assert any(not torch.equal(frozen[k], after[k]) for k in frozen
               if k.startswith(f"core.bank.groups.{reused}."))


def test_state_dict_round_trip_restores_router_and_routing():
    torch.manual_seed(4)
    bundle, arch = _tiny()
    model = _routed(arch, feature="random_conv", max=4)
    strategy = _strategy(model, epochs=1)
    for experience in bundle.benchmark.train_stream:
        strategy.train(experience)
    fresh = _routed(arch, feature="random_conv", max=4)
    fresh.load_state_dict(model.state_dict())
    assert fresh.expert_experiences == model.expert_experiences
    assert fresh.gate_frozen and torch.equal(fresh.class_experience, model.class_experience)
    model.eval()
    fresh.eval()
    x = torch.randn(8, *bundle.input_shape)
    assert torch.allclose(fresh(x), model(x))


def _holds_rows_of(value, rows: torch.Tensor, seen: set) -> bool:
    """Whether ``value`` (a tensor, container, module or object, searched recursively) holds a
    tensor containing one of ``rows`` (flattened inputs)."""
    if id(value) in seen:
        return False
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        if value.dim() == 0 or value.numel() % rows.shape[1]:
            return False
        flat = value.detach().reshape(-1, rows.shape[1]).float().cpu()
        return bool((torch.cdist(flat, rows) < 1e-6).any())
    if isinstance(value, torch.nn.Module):
        return any(_holds_rows_of(t, rows, seen) for t in [*value.state_dict().values(),
                                                            *vars(value).values()])
    if isinstance(value, dict):
        return any(_holds_rows_of(v, rows, seen) for v in value.values())
    if isinstance(value, list | tuple | set):
        return any(_holds_rows_of(v, rows, seen) for v in value)
    if hasattr(value, "__dict__") and type(value).__module__.startswith(("moe_cl", "avalanche")):
        return any(_holds_rows_of(v, rows, seen) for v in vars(value).values())
    return False


@pytest.mark.parametrize("replay", [False, True])
def test_no_training_sample_of_an_earlier_experience_is_kept(replay):
    from moe_cl.training.checkpoint import model_state, optimizer_state, plugin_states

    torch.manual_seed(5)
    bundle, arch = _tiny(n_experiences=2)
    model = _routed(arch, feature="random_conv")
    plugins = [ReplayPlugin(mem_size=20)] if replay else []
    strategy = _strategy(model, epochs=1, plugins=plugins)
    first, second = bundle.benchmark.train_stream
    from moe_cl.data.tensors import dataset_tensors

    rows = dataset_tensors(first.dataset)[0].flatten(1).float()
    strategy.train(first)
    strategy.train(second)
    checkpoint = {"model": model_state(model), "optimizer": optimizer_state(strategy.optimizer,
                                                                             model),
                  "plugins": plugin_states(strategy.plugins)}
    keeps = {name: _holds_rows_of(value, rows, set()) for name, value in (
        ("checkpoint", checkpoint), ("model", model),
        ("strategy", {k: v for k, v in vars(strategy).items() if k != "experience"}))}
    if replay:  # the detector finds the replay buffer's samples
        assert keeps["checkpoint"] and keeps["strategy"]
    else:
        assert not any(keeps.values()), keeps


def test_bad_configurations_fail_with_one_line():
    _, arch = _tiny()
    with pytest.raises(ValueError, match="experts.max=1 is below"):
        _routed(arch, max=1)
    with pytest.raises(ValueError, match="experts.policy must be grow"):
        RoutedMixture(architecture=arch, policy=ExpertPolicy("fixed"))


def test_a_class_in_two_experiences_is_refused():
    torch.manual_seed(6)
    bundle, arch = _tiny()
    model = _routed(arch)
    strategy = _strategy(model, epochs=1)
    first = bundle.benchmark.train_stream[0]
    strategy.train(first)
    again = copy.copy(first)
    again.current_experience = 1
    with pytest.raises(ValueError, match="each class in one experience"):
        strategy.train(again)


def test_mean_pairwise_kl_is_zero_for_one_class_and_grows_with_separation():
    torch.manual_seed(7)
    noise = torch.randn(200, 3)
    labels = torch.arange(200) % 2
    assert mean_pairwise_kl(noise, torch.zeros(200, dtype=torch.long)) == 0.0
    near = mean_pairwise_kl(noise + labels[:, None] * 0.5, labels)
    far = mean_pairwise_kl(noise + labels[:, None] * 3.0, labels)
    assert 0 < near < far


def test_a_reuse_in_progress_survives_a_state_dict_round_trip():
    torch.manual_seed(8)
    bundle, arch = _tiny()
    model = _routed(arch, max=4)
    strategy = _strategy(model, epochs=1)
    for experience in bundle.benchmark.train_stream:
        strategy.train(experience)
    reused = model.reused_group
    assert reused is not None
    fresh = _routed(arch, max=4)
    fresh.load_state_dict(model.state_dict())
    assert fresh.reused_group == reused
    teacher, restored = model.reuse_teacher.state_dict(), fresh.reuse_teacher.state_dict()
    assert teacher.keys() == restored.keys()
    assert all(torch.equal(teacher[k], restored[k]) for k in teacher)
    group = fresh.core.bank.groups[reused]
    assert all(p.requires_grad for p in group.parameters())
    assert not any(p.requires_grad for g in fresh.core.bank.groups if g is not group
                   for p in g.parameters())


@pytest.mark.parametrize(("override", "message"), [
    ("experts.max=1", "experts.max=1 is below"),
    ("experts.policy=fixed", "experts.policy must be grow"),
    ("router.feature=nope", "router.feature='nope' is not valid"),
    ("router.combine=sum", "router.combine='sum' is not valid"),
    ("router.shrinkage=0", "router.shrinkage must be"),
    ("router.experts_vote=mos", "router.experts_vote='mos' is not valid"),
    ("router.vote_temperature=0", "router.vote_temperature must be"),
    ("router.vote_weight=-1", "router.vote_weight must be"),
    ("experts.freeze_old=true", "does not apply to method=routed"),
])
def test_bad_router_settings_are_one_line_usage_errors(tmp_path, capsys, override, message):
    from moe_cl.run.cli import main

    out = tmp_path / "run"
    code = main(["benchmark=tiny", "strategy=routed", override, f"out_dir={out}",
                 "logging.interactive=false"])
    assert code == 2 and message in one_error_line(capsys)
    assert not out.exists()


@pytest.mark.parametrize("feature", ROUTER_FEATURES)
def test_every_feature_space_of_the_registry_serves_the_router(feature):
    """Each entry builds its frozen map (none for the gate trunk, which is the gate's own
    network) and the router's statistics take its features."""
    _, arch = _tiny()
    model = _routed(arch, feature=feature)
    assert (model.features is None) == (feature == "gate_trunk")
    x = torch.randn(5, *arch.input_shape)
    features = model.router_features(x)
    assert features.shape == (5, model.statistics.num_features)
    built = FEATURE_SPACES[feature](arch.input_shape, model.router)
    if built is not None:
        assert torch.equal(built(x), features)


def test_a_feature_map_larger_than_the_input_is_a_usage_error(tmp_path, capsys):
    from moe_cl.run.cli import main

    out = tmp_path / "run"
    code = main(["benchmark=tiny", "strategy=routed", "router.kernel=9", f"out_dir={out}",
                 "logging.interactive=false"])
    err = capsys.readouterr().err
    assert code == 2 and "router" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("gate", ["attentive", "softmax"])
def test_a_checkpoint_inside_an_experience_restores_what_trains(gate):
    """Loaded inside experience 1, the model trains exactly what the original trains: the new
    experts (and a softmax gate's rows for them), nothing older."""
    from avalanche.core import SupervisedPlugin

    torch.manual_seed(9)
    bundle, arch = _tiny()
    model = RoutedMixture(architecture=arch, gate=gate, num_experts=2,
                          policy=ExpertPolicy("grow", per_experience=2),
                          router=RouterOptions(feature="pixels"))
    snapshots = []

    class Snapshot(SupervisedPlugin):
        def before_training_epoch(self, strategy, **kwargs):
            trainable = sorted(n for n, p in strategy.model.named_parameters() if p.requires_grad)
            snapshots.append((copy.deepcopy(strategy.model.state_dict()), trainable))

    strategy = _strategy(model, epochs=1, plugins=[Snapshot()])
    strategy.train(bundle.benchmark.train_stream[0])
    strategy.train(bundle.benchmark.train_stream[1])
    state, trainable = snapshots[-1]
    fresh = RoutedMixture(architecture=arch, gate=gate, num_experts=2,
                          policy=ExpertPolicy("grow", per_experience=2),
                          router=RouterOptions(feature="pixels"))
    fresh.load_state_dict(state)
    assert sorted(n for n, p in fresh.named_parameters() if p.requires_grad) == trainable
    assert trainable and all(".groups.1." in n or ".heads.1." in n for n in trainable)


def test_split_cifar100_runs_the_routed_mixture_from_files_in_the_real_format(tmp_path):
    """The default split CIFAR-100 strategy end to end on synthetic CIFAR-100 pickles (the real
    set is GPU work; two experiences keep it short on a CPU): the second experience adds its
    experts, the router keeps 100 classes' means in its 2,400 features."""
    import json

    from moe_cl.run.cli import main
    from tests.datafiles import write_cifar100_like

    write_cifar100_like(tmp_path / "data", n_train=200, n_test=100, seed=0)
    out = tmp_path / "run"
    code = main(["benchmark=split_cifar100", "strategy=routed", f"data.root={tmp_path / 'data'}",
                 "data.n_experiences=2", "train.epochs=1", f"out_dir={out}",
                 "logging.interactive=false", "logging.tensorboard=false",
                 "logging.figures=false"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "complete" and results["num_experts"] == 4 + 2
    assert results["statistics_bytes"] == 8 * (100 + 100 * 2400 + 2400 * 2400)
    assert results["router_error"] is not None
    assert results["experts_vote"] is None  # router.experts_vote=none


def _trained(model, bundle, *, epochs=1):
    strategy = _strategy(model, epochs=epochs)
    for experience in bundle.benchmark.train_stream:
        strategy.train(experience)
    return strategy


def test_the_seed_vote_averages_tempered_posteriors_over_the_groups_holding_a_class():
    # Temperature 2 halves these: group 0 holds classes 0-2, softmax (1/4, 1/4, 1/2); group 1
    # holds 1 and 2, softmax (3/4, 1/4); group 2 holds nothing; no group holds class 3.
    inf, ln2, ln3 = float("inf"), math.log(2), math.log(3)
    scores = torch.tensor([[[0.0, 0.0, 2 * ln2, -inf]],
                           [[-inf, 2 * ln3, 0.0, -inf]],
                           [[-inf, -inf, -inf, -inf]]])
    vote = seed_vote(scores, temperature=2.0)
    expected = torch.tensor([[math.log(1 / 4), math.log(1 / 2), math.log(3 / 8), -inf]])
    torch.testing.assert_close(vote, expected)


def test_expert_groups_hold_exact_statistics_of_every_class_from_their_experience_on():
    """Group g arrived with experience g and has been frozen since: its statistics are those of
    every class from experience g on computed at once, whatever the batches they came in (up to
    the float32 features, whose last bits depend on the batch size)."""
    torch.manual_seed(10)
    bundle, arch = _tiny()
    model = _routed(arch, experts_vote="seed")
    _trained(model, bundle)
    model.eval()
    stream = bundle.benchmark.train_stream
    data = [dataset_tensors(experience.dataset.eval())[:2] for experience in stream]
    with torch.no_grad():
        hidden = [model.core.bank(x)[1] for x, _ in data]
    split = _routed(arch, experts_vote="seed")
    split.load_state_dict(model.state_dict())
    for statistics in (split.statistics, *split.vote_statistics):
        for tensor in (statistics.counts, statistics.means, statistics.scatter):
            tensor.zero_()
    for experience in stream:
        split.update_router(experience, chunk=7)
    assert len(model.vote_statistics) == len(model.group_sizes) == 3
    for group, statistics in enumerate(model.vote_statistics):
        one_shot = ClassStatistics(model.num_classes, statistics.num_features)
        one_shot.update(torch.cat([model._group_hidden(h, group) for h in hidden[group:]]),
                        torch.cat([y for _, y in data[group:]]))
        for other, tolerance in ((one_shot, 1e-10), (split.vote_statistics[group], 1e-6)):
            for name in ("counts", "means", "scatter"):
                torch.testing.assert_close(getattr(statistics, name), getattr(other, name),
                                           rtol=tolerance, atol=tolerance)


def test_a_vote_weight_of_zero_gives_exactly_the_router_only_output():
    torch.manual_seed(11)
    bundle, arch = _tiny()
    model = _routed(arch, experts_vote="seed")
    _trained(model, bundle)
    alone = _routed(arch)
    unexpected = alone.load_state_dict(model.state_dict(), strict=False).unexpected_keys
    assert unexpected and all(k.startswith("vote_statistics.") for k in unexpected)
    model.eval()
    alone.eval()
    x = torch.randn(32, *bundle.input_shape)
    model.router.vote_weight = 0.0
    assert torch.equal(model(x), alone(x))
    out = model.last_output
    assert torch.equal(out.voted_log_probs, out.router_log_probs)
    assert alone.last_output.voted_log_probs is None
    model.router.vote_weight = 1.0
    assert not torch.equal(model(x), alone(x))  # the vote does move the posterior


def test_a_reused_group_keeps_its_old_classes_statistics_and_adds_the_new_ones():
    """Past experts.max the reused group is fine-tuned: its older classes' data is gone, so
    their statistics stay as they were and the new classes' join them (as in SEED)."""
    torch.manual_seed(12)
    bundle, arch = _tiny()
    model = _routed(arch, experts_vote="seed", max=4)
    strategy = _strategy(model, epochs=1)
    stream = bundle.benchmark.train_stream
    strategy.train(stream[0])
    strategy.train(stream[1])
    before = copy.deepcopy(model.vote_statistics.state_dict())
    strategy.train(stream[2])
    reused = model.growth_log[-1]["reused_group"]
    statistics = model.vote_statistics[reused]
    new = sorted(stream[2].classes_in_this_experience)
    old = [c for c in range(model.num_classes) if c not in new]
    assert len(model.vote_statistics) == 2 and (statistics.counts[new] > 0).all()
    assert torch.equal(statistics.counts[old], before[f"{reused}.counts"][old])
    assert torch.equal(statistics.means[old], before[f"{reused}.means"][old])
    fresh = _routed(arch, experts_vote="seed", max=4)
    fresh.load_state_dict(model.state_dict())
    model.eval()
    fresh.eval()
    x = torch.randn(8, *bundle.input_shape)
    assert torch.equal(fresh(x), model(x))


def test_a_run_with_the_seed_vote_records_what_the_vote_changed(tmp_path):
    import json

    from moe_cl.run.cli import main
    from moe_cl.training.checkpoint import load_checkpoint

    out = tmp_path / "run"
    code = main(["benchmark=tiny", "strategy=routed", "router.experts_vote=seed",
                 "train.epochs=1", f"out_dir={out}", "logging.interactive=false",
                 "logging.tensorboard=false", "logging.figures=false"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    vote = results["experts_vote"]
    assert set(vote) == {"changed", "fixed", "broke"}
    assert vote["changed"] >= vote["fixed"] + vote["broke"] >= 0
    state = load_checkpoint(out / "checkpoint.pt")["model"]["state_dict"]
    kept = [t for k, t in state.items() if k.startswith(("statistics.", "vote_statistics."))
            and k.endswith((".counts", ".means", ".scatter"))]
    assert any(k.startswith("vote_statistics.") for k in state)
    assert results["statistics_bytes"] == sum(t.numel() * t.element_size() for t in kept)
