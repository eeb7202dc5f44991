"""The experiment: builders read the method registry, metrics are read per test experience, the
gate is distilled on a copy, and a run goes through its stages once."""

import pytest
import torch

from moe_cl.core.gates import AttentiveGate, SoftmaxGate
from moe_cl.run.builders import (
    build_benchmark,
    build_model,
    build_optimizer,
    build_strategy,
    weight_decay,
)
from moe_cl.run.config import compose
from moe_cl.run.experiment import (
    EpochCheckpoint,
    Run,
    distill,
    per_experience_values,
    run_experiment,
)
from moe_cl.training.models import MixtureOfExperts, SingleExpertModel
from moe_cl.training.options import ExpertPolicy
from moe_cl.training.plugins import ImportanceRegularizer, NonFiniteLossGuard
from tests.helpers import moe_strategy, quiet_evaluator

QUIET = ["logging.interactive=false", "logging.tensorboard=false", "logging.figures=false"]


def _cfg(*args):
    return compose(["benchmark=tiny", *QUIET, *args])


def test_per_experience_values_match_by_prefix_and_leave_gaps_nan():
    metrics = {"Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp000": 0.5,
               "Top1_Acc_Exp/eval_phase/test_stream/Task001/Exp001": 0.75,
               "Loss_Exp/eval_phase/test_stream/Task000/Exp002": 9.0}
    row = per_experience_values(metrics, "Top1_Acc_Exp/eval_phase/test_stream", 3)
    assert row[:2] == [0.5, 0.75] and row[2] != row[2]  # nan: no accuracy on experience 2


def test_models_and_strategies_follow_the_method():
    cfg = _cfg("strategy=attentive_importance", "experts.init=copy")
    bundle = build_benchmark(cfg)
    model = build_model(cfg, bundle)
    assert isinstance(model, MixtureOfExperts)
    assert model.policy == ExpertPolicy("grow", init="copy")
    strategy = build_strategy(cfg, model, build_optimizer(cfg, model), quiet_evaluator(), bundle,
                              torch.device("cpu"))
    assert [type(p) for p in strategy.plugins[:2]] == [NonFiniteLossGuard, ImportanceRegularizer]
    cfg = _cfg("strategy=ewc")
    model = build_model(cfg, bundle)
    assert isinstance(model, SingleExpertModel)
    strategy = build_strategy(cfg, model, build_optimizer(cfg, model), quiet_evaluator(False),
                              bundle, torch.device("cpu"))
    assert type(strategy).__name__ == "EWC" and isinstance(strategy.plugins[0], NonFiniteLossGuard)
    assert [p.ewc_lambda for p in strategy.plugins if hasattr(p, "ewc_lambda")] == [100.0]


@pytest.mark.parametrize("args, expected", [
    (["strategy=moe"], 1e-3), (["strategy=naive"], 1e-3), (["strategy=attentive"], 0.0),
    (["strategy=attentive", "train.weight_decay=0.5"], 0.5),
])
def test_weight_decay_follows_the_paper_on_cifar100(args, expected):
    cfg = _cfg(*args)

    class Model:
        architecture = type("Arch", (), {"name": "cifar100"})

    assert weight_decay(cfg, Model()) == expected


def test_epoch_checkpoints_count_from_where_a_resumed_experience_stood():
    saved = []
    plugin = EpochCheckpoint(2, saved.append)
    strategy = type("Strategy", (), {"train_epochs": 5})
    plugin.offset = 1
    plugin.before_training_exp(strategy)
    for _ in range(5):
        plugin.after_training_epoch(strategy)
    assert saved == [2, 4]  # 6 is the end of the experience: its own checkpoint follows


def test_distill_trains_a_copy_and_leaves_the_teacher_alone():
    torch.manual_seed(0)
    cfg = _cfg("strategy=distilled", "data.n_experiences=1", "distill.epochs=1")
    bundle = build_benchmark(cfg)
    teacher = build_model(cfg, bundle)
    moe_strategy(teacher, epochs=1).train(bundle.benchmark.train_stream[0])
    before = {k: v.clone() for k, v in teacher.state_dict().items() if torch.is_tensor(v)}
    run = Run(cfg, None, bundle, torch.device("cpu"), teacher, None, None,
              evaluator=quiet_evaluator())
    student = distill(run, bundle.benchmark.train_stream[0]).model
    assert isinstance(student.core.gate, SoftmaxGate)
    assert isinstance(teacher.core.gate, AttentiveGate)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    assert student.num_experts == teacher.num_experts and student.growth_log == teacher.growth_log


def test_a_finished_run_is_read_back_not_trained_again(tmp_path):
    cfg = _cfg("strategy=moe", "train.epochs=1")
    results = run_experiment(cfg, tmp_path, echo=lambda _: None)
    assert results["status"] == "complete" and results["experiences_completed"] == 3
    said = []
    again = run_experiment(cfg, tmp_path, resume=True, echo=said.append)
    assert said == [f"{tmp_path} is already complete"] and again == results
