"""The Avalanche models: growth policies, freezing, optimizer state across growth, class and
task masking, copied and task-routed experts, state_dict round trips, the distilled copy."""

import copy

import pytest
import torch
from avalanche.core import SupervisedPlugin
from avalanche.training import Naive

from moe_cl.core.gates import AttentiveGate, SoftmaxGate
from moe_cl.core.zoo import mlp_architecture
from moe_cl.training.models import ExpertPolicy, MixtureOfExperts, SingleExpertModel
from tests.helpers import (
    grown_task_mixture,
    moe_strategy,
    quiet_evaluator,
    stream_from_tensors,
    tiny,
)


class _OptimizerSnapshots(SupervisedPlugin):
    """Adam state of the first expert group: after each experience and right after adaptation."""

    def __init__(self):
        super().__init__()
        self.after_exp, self.after_adaptation = [], []

    def _snapshot(self, strategy):
        group = strategy.model.core.bank.groups[0]
        return {
            name: copy.deepcopy(strategy.optimizer.state.get(p, {}))
            for name, p in group.named_parameters()
        }

    def after_training_exp(self, strategy, **kwargs):
        self.after_exp.append(self._snapshot(strategy))

    def before_training_epoch(self, strategy, **kwargs):
        if strategy.clock.train_exp_epochs == 0:
            self.after_adaptation.append(self._snapshot(strategy))


def test_grow_with_freeze_keeps_old_experts_bit_identical():
    torch.manual_seed(0)
    bundle, arch = tiny(3)
    model = MixtureOfExperts(architecture=arch, gate="attentive", num_experts=2,
                             policy=ExpertPolicy("grow", per_experience=2, freeze_old=True))
    strategy = moe_strategy(model)
    probe = torch.randn(16, *bundle.input_shape)
    outputs_of_first = []
    results = None
    for exp in bundle.benchmark.train_stream:
        strategy.train(exp)
        results = strategy.eval(bundle.benchmark.test_stream)
        model.eval()
        logits, hidden = model.core.bank.groups[0](probe)
        outputs_of_first.append((logits.clone(), hidden.clone()))
    assert model.num_experts == 6 and model.group_sizes == [2, 2, 2]
    assert [e["added"] for e in model.growth_log] == [2, 2]
    assert torch.equal(outputs_of_first[0][0], outputs_of_first[2][0])
    assert torch.equal(outputs_of_first[0][1], outputs_of_first[2][1])
    stream_keys = [k for k in results if k.startswith("Routing_num_experts/eval_phase/test_stream")]
    assert results[stream_keys[-1]] == 6.0
    for name in ("Routing_H_s", "Routing_H_u", "Routing_MI", "Routing_MI_pred",
                 "Routing_expert_usage", "Routing_expert_class_counts"):
        assert any(k.startswith(name + "/eval_phase/test_stream") for k in results), name
    usage = [v for k, v in results.items() if k == "Routing_expert_usage/eval_phase/test_stream"]
    assert usage[0].shape == (6,)


def test_growth_keeps_adam_state_of_existing_experts():
    torch.manual_seed(1)
    bundle, arch = tiny(2)
    model = MixtureOfExperts(architecture=arch, gate="softmax", num_experts=2,
                             policy=ExpertPolicy("grow", per_experience=1))
    snapshots = _OptimizerSnapshots()
    strategy = moe_strategy(model, epochs=2, plugins=[snapshots])
    old_params = [id(p) for p in model.parameters()]
    for exp in bundle.benchmark.train_stream:
        strategy.train(exp)
    assert model.num_experts == 3
    # The parameters that existed are the same objects, and their Adam moments survived growth.
    assert set(old_params) <= {id(p) for p in model.parameters()}
    before, after = snapshots.after_exp[0], snapshots.after_adaptation[1]
    for name, state in before.items():
        assert state, f"no optimizer state for {name}"
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state[key], after[name][key]), (name, key)
    new_group = model.core.bank.groups[1]
    assert all(p in strategy.optimizer.state for p in new_group.parameters())


def test_grow_on_demand_adds_for_new_classes_and_not_for_same_distribution():
    torch.manual_seed(2)
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 1, 8, 8, generator=g) * 3

    def sample(classes, n):
        y = torch.tensor(classes).repeat_interleave(n)
        return centres[y] + 0.3 * torch.randn(len(y), 1, 8, 8, generator=g), y

    arch = mlp_architecture((1, 8, 8), 4, width=32, hidden=16)
    # Same distribution twice: the pool fits the second experience.
    same = stream_from_tensors([sample([0, 1], 64), sample([0, 1], 64)], [sample([0, 1], 16)])
    model = MixtureOfExperts(architecture=arch, num_experts=2,
                             policy=ExpertPolicy("grow_on_demand", threshold=1.0))
    strategy = moe_strategy(model, epochs=8)
    for exp in same.train_stream:
        strategy.train(exp)
    assert model.num_experts == 2
    assert model.growth_log[0]["added"] == 0 and model.growth_log[0]["score"] < 1.0
    # New classes: no expert knows them, the best expert's loss is high, experts are added.
    # With copied experts, the decision's probe also picks the sources.
    new = stream_from_tensors([sample([0, 1], 64), sample([2, 3], 64)], [sample([0, 1], 16)])
    model = MixtureOfExperts(architecture=arch, num_experts=2,
                             policy=ExpertPolicy("grow_on_demand", per_experience=2,
                                                 threshold=1.0, init="copy"))
    strategy = moe_strategy(model, epochs=8)
    strategy.train(new.train_stream[0])
    expected = model.busiest_experts(new.train_stream[1], 2)
    strategy.train(new.train_stream[1])
    assert model.num_experts == 4
    entry = model.growth_log[0]
    assert entry["added"] == 2 and entry["score"] > 1.0 and "threshold" in entry["reason"]
    assert entry["copied_from"] == expected


def test_task_incremental_masks_each_task_and_reaches_high_accuracy():
    torch.manual_seed(3)
    bundle, arch = tiny(3, scenario="task")
    model = MixtureOfExperts(architecture=arch, num_experts=3, scenario="task")
    strategy = moe_strategy(model, epochs=6)
    for exp in bundle.benchmark.train_stream:
        assert exp.task_label == exp.current_experience
        strategy.train(exp)
    results = strategy.eval(bundle.benchmark.test_stream)
    stream_acc = [v for k, v in results.items() if k.startswith("Top1_Acc_Stream")]
    assert stream_acc[0] > 0.9
    # Predictions stay inside each sample's task.
    x = torch.randn(4, *bundle.input_shape)
    pred = model(x, torch.tensor([0, 1, 2, 0])).argmax(-1)
    for p, task in zip(pred.tolist(), [0, 1, 2, 0], strict=True):
        assert p in bundle.classes_per_experience[task]


def test_class_incremental_masks_unseen_classes():
    bundle, arch = tiny(3)
    model = MixtureOfExperts(architecture=arch, num_experts=2)
    strategy = moe_strategy(model, epochs=1)
    strategy.train(bundle.benchmark.train_stream[0])
    model.eval()
    pred = model(torch.randn(32, *bundle.input_shape)).argmax(-1)
    assert set(pred.tolist()) <= set(bundle.classes_per_experience[0])


def test_single_expert_model_runs_under_avalanche_baselines():
    bundle, arch = tiny(2)
    model = SingleExpertModel(architecture=arch)
    strategy = Naive(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=3e-3),
                     criterion=torch.nn.NLLLoss(), train_mb_size=32, train_epochs=3,
                     evaluator=quiet_evaluator(False))
    strategy.train(bundle.benchmark.train_stream[0])
    results = strategy.eval(bundle.benchmark.test_stream[:1])
    assert [v for k, v in results.items() if k.startswith("Top1_Acc_Stream")][0] > 0.8


def test_plain_state_dict_round_trip_restores_a_grown_model():
    """A fresh model loads a grown one's state_dict (no helper needed) and trains on alike."""
    model, build, bundle = grown_task_mixture()
    fresh = build()
    fresh.load_state_dict(model.state_dict())
    assert fresh.group_sizes == model.group_sizes and len(model.group_sizes) == 2
    assert [g.frozen for g in fresh.core.bank.groups] == [True, False]
    assert fresh.expert_tasks == model.expert_tasks and torch.equal(fresh.seen, model.seen)
    x, tasks = torch.randn(6, *bundle.input_shape), torch.tensor([0, 1, 0, 1, 1, 0])
    model.eval(), fresh.eval()
    assert torch.equal(model(x, tasks), fresh(x, tasks))
    for m in (model, fresh):  # the next experience grows both alike
        torch.manual_seed(9)
        moe_strategy(m, epochs=1).train(bundle.benchmark.train_stream[2])
    assert fresh.group_sizes == model.group_sizes and len(model.group_sizes) == 3
    assert fresh.growth_log == model.growth_log and fresh.expert_tasks == model.expert_tasks
    model.eval(), fresh.eval()
    assert torch.equal(model(x, tasks), fresh(x, tasks))
    with pytest.raises(ValueError, match="cannot grow expert groups"):
        MixtureOfExperts(architecture=model.architecture, num_experts=3, scenario="task",
                         policy=model.policy).load_state_dict(model.state_dict())


@pytest.mark.parametrize("scenario", ["class", "task"])
def test_avalanche_lwf_runs_on_both_models(scenario):
    """LwF asks a multi-task module for every task's output with task_labels=None."""
    from avalanche.training import LwF

    bundle, arch = tiny(2, scenario=scenario)
    for model in (SingleExpertModel(architecture=arch, scenario=scenario),
                  MixtureOfExperts(architecture=arch, num_experts=2, scenario=scenario)):
        strategy = LwF(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=3e-3),
                       criterion=torch.nn.NLLLoss(), alpha=1.0, temperature=2.0,
                       train_mb_size=32, train_epochs=1, evaluator=quiet_evaluator(False))
        for exp in bundle.benchmark.train_stream:
            strategy.train(exp)
        outputs = model(torch.randn(3, *bundle.input_shape), None)
        assert isinstance(outputs, dict) and all(v.shape == (3, 4) for v in outputs.values())


def test_copy_init_starts_new_experts_as_the_busiest_ones():
    torch.manual_seed(7)
    bundle, arch = tiny(2)
    model = MixtureOfExperts(architecture=arch, gate="attentive", num_experts=3,
                             policy=ExpertPolicy("grow", per_experience=2, init="copy"))
    moe_strategy(model, epochs=2).train(bundle.benchmark.train_stream[0])
    second = bundle.benchmark.train_stream[1]
    model.eval()
    probe = torch.stack([second.dataset[i][0] for i in range(len(second.dataset))][:256])
    expected = model.core(probe).gate.sum(0).argsort(descending=True)[:2].tolist()
    busiest = model.busiest_experts(second, 2)
    assert busiest == expected
    x = torch.randn(8, *bundle.input_shape)
    model.train()
    model.adaptation(second)  # what Avalanche calls before training the experience
    assert model.growth_log[-1]["copied_from"] == busiest and busiest[0] != busiest[1]
    model.eval()
    out = model.core(x)
    for new, source in zip((3, 4), busiest, strict=True):
        torch.testing.assert_close(out.expert_log_probs[:, new], out.expert_log_probs[:, source])
        torch.testing.assert_close(out.gate[:, new], out.gate[:, source])


def test_route_by_task_keeps_each_task_on_its_own_experts():
    torch.manual_seed(8)
    bundle, arch = tiny(3, scenario="task")
    policy = ExpertPolicy("grow", per_experience=1, freeze_old=True, init="copy",
                          route_by_task=True)
    model = MixtureOfExperts(architecture=arch, num_experts=2, scenario="task", policy=policy)
    strategy = moe_strategy(model, epochs=6)
    for exp in bundle.benchmark.train_stream:
        strategy.train(exp)
    assert model.expert_tasks == [0, 0, 1, 2]
    results = strategy.eval(bundle.benchmark.test_stream)
    assert [v for k, v in results.items() if k.startswith("Top1_Acc_Stream")][0] > 0.9
    model.eval()
    x = torch.randn(6, *bundle.input_shape)
    tasks = torch.tensor([0, 1, 2, 0, 1, 2])
    model(x, tasks)
    gate = model.last_output.gate
    owned = torch.tensor(model.expert_tasks)[None, :] == tasks[:, None]
    assert torch.all(gate[~owned] == 0) and torch.allclose(gate.sum(-1), torch.ones(6))
    # The routing survives a checkpoint (old checkpoints without it: every expert on task 0).
    clone = MixtureOfExperts(architecture=arch, num_experts=2, scenario="task", policy=policy)
    clone.set_extra_state(model.get_extra_state())
    assert clone.expert_tasks == [0, 0, 1, 2]
    state = {k: v for k, v in model.get_extra_state().items() if k != "expert_tasks"}
    clone = MixtureOfExperts(architecture=arch, num_experts=2, scenario="task", policy=policy)
    clone.set_extra_state(state)
    assert clone.expert_tasks == [0, 0, 0, 0]


def test_the_distilled_copy_keeps_the_experts_and_trains_only_its_softmax_gate():
    torch.manual_seed(4)
    bundle, arch = tiny(2)
    model = MixtureOfExperts(architecture=arch, num_experts=2, policy=ExpertPolicy("grow"))
    strategy = moe_strategy(model, epochs=1)
    for exp in bundle.benchmark.train_stream:
        strategy.train(exp)
    student = model.distilled_copy()
    assert isinstance(student.core.gate, SoftmaxGate) and isinstance(model.core.gate, AttentiveGate)
    assert student.group_sizes == model.group_sizes == [2, 1]
    assert all(g.frozen for g in student.core.bank.groups) and student.policy.policy == "fixed"
    x = torch.randn(8, *bundle.input_shape)
    model.eval(), student.eval()
    torch.testing.assert_close(student.core(x).expert_log_probs, model.core(x).expert_log_probs)
    moe_strategy(student, epochs=1).train(bundle.benchmark.train_stream[1])  # trained before
    assert student.group_sizes == [2, 1] and student.growth_log == model.growth_log
    student.eval()
    torch.testing.assert_close(student.core(x).expert_log_probs, model.core(x).expert_log_probs)


def test_probe_samples_cover_every_class_of_a_class_sorted_experience():
    from moe_cl.training.models import class_balanced_samples

    bundle, _ = tiny(2)
    experience = bundle.benchmark.train_stream[0]
    _, labels, _ = class_balanced_samples(experience, 64, torch.device("cpu"))
    first_half = labels[:32]
    assert sorted(labels.unique().tolist()) == bundle.classes_per_experience[0]
    assert abs(int((first_half == labels[0]).sum()) - 16) <= 1  # alternating classes
    x, _, _ = class_balanced_samples(experience, 64, torch.device("cpu"))
    assert torch.equal(x, class_balanced_samples(experience, 64, torch.device("cpu"))[0])
