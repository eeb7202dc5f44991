"""Checkpoints: what a run saves and restores (models, optimizer, plugins, RNG), loaded safely."""

import random

import numpy as np
import pytest
import torch
from avalanche.training import Naive
from avalanche.training.plugins import EWCPlugin, LwFPlugin, ReplayPlugin

from moe_cl.data.tensors import dataset_tensors
from moe_cl.training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_model_state,
    load_plugin_states,
    model_state,
    optimizer_state,
    plugin_states,
    restore_optimizer,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from moe_cl.training.models import SingleExpertModel
from tests.helpers import grown_task_mixture, quiet_evaluator, tiny

CPU = torch.device("cpu")


def test_checkpoints_of_the_earlier_format_still_load():
    """Checkpoints written before the structure moved into the state_dict's extra state."""
    model, build, bundle = grown_task_mixture()
    x, tasks = torch.randn(6, *bundle.input_shape), torch.tensor([0, 1, 0, 1, 1, 0])
    model.eval()
    # Checkpoints written before: the structure beside the state_dict, not inside it.
    old_format = {"state_dict": {k: v for k, v in model.state_dict().items()
                                 if k != "_extra_state"},
                  "extra": {**model.get_extra_state(), "seen_shape": list(model.seen.shape)}}
    from_old = build()
    load_model_state(from_old, old_format)
    assert from_old.group_sizes == model.group_sizes and torch.equal(from_old.seen, model.seen)
    assert torch.equal(model(x, tasks), from_old.eval()(x, tasks))


def test_rng_states_round_trip():
    state = rng_state(CPU)
    first = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(state, CPU)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and (first[1] == again[1]).all()
    assert first[2] == again[2]


def test_plugin_and_optimizer_states_survive_a_checkpoint_file(tmp_path):
    torch.manual_seed(1)
    bundle, arch = tiny(2)
    model = SingleExpertModel(architecture=arch)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    plugins = [ReplayPlugin(mem_size=20), EWCPlugin(1.0), LwFPlugin()]
    strategy = Naive(model=model, optimizer=optimizer, criterion=torch.nn.NLLLoss(),
                     train_mb_size=32, plugins=plugins, evaluator=quiet_evaluator(False))
    for exp in bundle.benchmark.train_stream:
        strategy.train(exp)
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"plugins": plugin_states(plugins), "model": model_state(model),
                           "optimizer": optimizer_state(optimizer, model), "rng": rng_state(CPU),
                           "progress": {}})
    state = load_checkpoint(path)
    fresh = SingleExpertModel(architecture=arch)
    fresh.load_state_dict(model.state_dict())
    restored = [ReplayPlugin(mem_size=20), EWCPlugin(1.0), LwFPlugin()]
    load_plugin_states(restored, state["plugins"], fresh)
    for group in (0, 1):
        x, y, _ = dataset_tensors(restored[0].storage_policy.buffer_groups[group].buffer)
        x0, y0, _ = dataset_tensors(plugins[0].storage_policy.buffer_groups[group].buffer)
        assert torch.equal(x, x0) and torch.equal(y, y0)
    for name, param in plugins[1].importances[1].items():
        assert torch.equal(restored[1].importances[1][name].data, param.data.cpu()), name
    assert restored[2].lwf.expcount == plugins[2].lwf.expcount == 2
    for key, value in plugins[2].lwf.prev_model.state_dict().items():
        assert torch.equal(restored[2].lwf.prev_model.state_dict()[key], value), key
    new_optimizer = torch.optim.Adam(fresh.parameters(), lr=1e-3)
    restore_optimizer(new_optimizer, fresh, state["optimizer"])
    names = dict(model.named_parameters())
    for name, param in fresh.named_parameters():
        assert torch.equal(new_optimizer.state[param]["exp_avg"],
                           optimizer.state[names[name]]["exp_avg"]), name


def test_files_that_are_not_checkpoints_are_refused(tmp_path):
    path = tmp_path / "checkpoint.pt"
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(path)
    path.write_bytes(b"\x80\x04not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt or unsafe"):
        load_checkpoint(path)
    torch.save({"model": {}}, path)
    with pytest.raises(CheckpointError, match="not a moe-cl checkpoint"):
        load_checkpoint(path)
    for part in ("model", "optimizer", "plugins", "rng", "progress"):  # the right tag only
        whole = {"model": {"state_dict": {}}, "optimizer": {"state_dict": {}, "param_names": []},
                 "plugins": {}, "rng": rng_state(CPU), "progress": {}}
        torch.save({"format": 1, **whole, part: []}, path)
        with pytest.raises(CheckpointError, match=f"not a whole moe-cl checkpoint .{part} is"):
            load_checkpoint(path)
