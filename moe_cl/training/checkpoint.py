"""Checkpoints made of tensors and plain containers only, loaded with ``weights_only=True``.

Avalanche 0.6's own checkpointing pickles the whole strategy with dill and fails with torch 2.14;
it would also execute whatever a checkpoint file contains. Here a checkpoint holds state_dicts,
the growth of the mixture, the state of the plugins that carry state across experiences
(replay buffer, EWC, LwF, SI), the RNG states and the run's progress. A file that is not such a
checkpoint (corrupt, truncated, or holding pickled objects) is refused with a clear error.
Streaming LDA keeps its statistics in its model's buffers (baselines.SLDAClassifier),
so the model's state_dict holds them.
"""

from __future__ import annotations

import pickle
import random
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from avalanche.benchmarks.utils import _make_taskaware_tensor_classification_dataset
from avalanche.training.plugins import (
    EWCPlugin,
    LwFPlugin,
    ReplayPlugin,
    SynapticIntelligencePlugin,
)
from avalanche.training.storage_policy import ReservoirSamplingBuffer
from avalanche.training.utils import ParamData

from moe_cl.core.zoo import copy_module
from moe_cl.data.tensors import dataset_tensors
from moe_cl.errors import USAGE_ERROR
from moe_cl.storage.run_folder import atomic_write
from moe_cl.training.models import MixtureOfExperts

FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint could not be read or does not fit the run (a usage error)."""

    exit_code = USAGE_ERROR


# ----------------------------------------------------------------------------- RNG


def rng_state(device: torch.device) -> dict:
    """Every random stream a run draws from: CPU, numpy, Python and, on a GPU, that GPU's (only
    the run's device: asking every GPU would start CUDA on each, or at all on a CPU run)."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": [torch.cuda.get_rng_state(device)] if device.type == "cuda" else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": _python_state_to_plain(random.getstate()),
    }


def set_rng_state(state: dict, device: torch.device) -> None:
    """The streams of :func:`rng_state`, the GPU's onto ``device`` (the run's, which may have
    another index than where it was saved: a resume on another machine or rank). Checkpoints
    written before held every visible GPU's state; the first is the one runs drew from."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"][0], device)
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def _python_state_to_plain(state: tuple) -> list:
    version, internal, gauss_next = state
    return [version, list(internal), gauss_next]


# ----------------------------------------------------------------------------- plugins


def plugin_states(plugins: list) -> dict:
    """State of the plugins that carry knowledge across experiences."""
    states: dict[str, Any] = {}
    for plugin in plugins:
        if isinstance(plugin, ReplayPlugin):
            policy = plugin.storage_policy
            groups = {}
            for key, group in policy.buffer_groups.items():
                x, y, t = _buffer_tensors(group.buffer)
                groups[int(key)] = {"x": x, "y": y, "t": t, "weights": group._buffer_weights,
                                    "max_size": group.max_size}
            states["replay"] = {"num_exps": getattr(policy, "_num_exps", 0), "groups": groups}
        elif isinstance(plugin, EWCPlugin):
            states["ewc"] = {
                "saved_params": _param_dicts(plugin.saved_params),
                "importances": _param_dicts(plugin.importances),
            }
        elif isinstance(plugin, LwFPlugin):
            lwf = plugin.lwf
            states["lwf"] = {
                "expcount": lwf.expcount,
                "prev_model": None if lwf.prev_model is None else lwf.prev_model.state_dict(),
                "prev_classes": {int(t): sorted(int(c) for c in cs)
                                 for t, cs in lwf.prev_classes_by_task.items()},
            }
        elif isinstance(plugin, SynapticIntelligencePlugin):
            states["si"] = {
                "ewc_data": [_tensors(data) for data in plugin.ewc_data],
                "syn_data": {key: _tensors(data) for key, data in plugin.syn_data.items()},
                "in_experience": getattr(plugin, "in_experience", False),
            }
    return states


def load_plugin_states(plugins: list, states: dict, model: torch.nn.Module) -> None:
    """Restore :func:`plugin_states` into ``plugins``; tensors the plugins compare with the
    model's parameters (EWC, SI) go onto the parameters' device."""
    device = next(model.parameters()).device
    for plugin in plugins:
        if isinstance(plugin, ReplayPlugin) and "replay" in states:
            policy = plugin.storage_policy
            policy._num_exps = states["replay"]["num_exps"]
            policy.buffer_groups = {}
            for key, group in sorted(states["replay"]["groups"].items()):
                buffer = ReservoirSamplingBuffer(group["max_size"])
                buffer.buffer = _make_taskaware_tensor_classification_dataset(
                    group["x"], group["y"], targets=group["y"], task_labels=group["t"]
                )
                buffer._buffer_weights = group["weights"]
                policy.buffer_groups[key] = buffer
        elif isinstance(plugin, EWCPlugin) and "ewc" in states:
            plugin.saved_params = _param_data(states["ewc"]["saved_params"], device)
            plugin.importances = _param_data(states["ewc"]["importances"], device)
        elif isinstance(plugin, LwFPlugin) and "lwf" in states:
            lwf = plugin.lwf
            lwf.expcount = states["lwf"]["expcount"]
            if states["lwf"]["prev_model"] is not None:
                lwf.prev_model = copy_module(model)
                lwf.prev_model.load_state_dict(states["lwf"]["prev_model"])
            lwf.prev_classes_by_task = defaultdict(
                set, {t: set(cs) for t, cs in states["lwf"]["prev_classes"].items()}
            )
        elif isinstance(plugin, SynapticIntelligencePlugin) and "si" in states:
            si = states["si"]
            plugin.ewc_data = tuple(_params(data, device) for data in si["ewc_data"])
            plugin.syn_data = {key: _params(data, device) for key, data in si["syn_data"].items()}
            if hasattr(plugin, "in_experience"):
                plugin.in_experience = si["in_experience"]


def _buffer_tensors(dataset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if len(dataset) == 0:
        return torch.empty(0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    return tuple(t.cpu() for t in dataset_tensors(dataset))


def _param_dicts(data: dict) -> dict:
    return {int(t): _tensors(params) for t, params in data.items()}


def _param_data(data: dict, device: torch.device) -> defaultdict:
    out: defaultdict = defaultdict(dict)
    for t, params in data.items():
        out[t] = _params(params, device)
    return out


def _tensors(params: dict[str, ParamData]) -> dict[str, torch.Tensor]:
    return {name: p.data.cpu() for name, p in params.items()}


def _params(tensors: dict[str, torch.Tensor], device: torch.device) -> dict[str, ParamData]:
    return {name: ParamData(name, init_tensor=tensor.to(device))
            for name, tensor in tensors.items()}


# ----------------------------------------------------------------------------- files


def save_checkpoint(path: Path, state: dict) -> None:
    """Written whole or not at all: a kill leaves the previous checkpoint."""
    atomic_write(path, lambda handle: torch.save({"format": FORMAT, **state}, handle))


# What every checkpoint holds, each part a mapping with these keys ("settings", the settings
# that shape training, came later: checkpoints without it still load).
CHECKPOINT_PARTS = {"model": ("state_dict",), "optimizer": ("state_dict", "param_names"),
                    "plugins": (), "rng": ("torch", "cuda", "numpy", "python"), "progress": ()}


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint safely (never runs code stored in the file) and check its structure,
    so a file with the right format tag but wrong contents is one clear error, not a crash."""
    try:
        with warnings.catch_warnings():  # torch's warnings would add lines to the one error
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {path}") from None
    except pickle.UnpicklingError as err:  # torch's advice (weights_only=False) is not ours
        found = [line.strip() for line in str(err).splitlines() if "GLOBAL" in line]
        raise CheckpointError(
            f"checkpoint {path} is corrupt or unsafe and was not loaded (it holds objects other "
            f"than tensors and plain data{': ' + found[0] if found else ''})") from None
    except Exception as err:  # noqa: BLE001 - every unreadable file gets the same clear error
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"checkpoint {path} is corrupt or unsafe and was not loaded ({first})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a moe-cl checkpoint (format {FORMAT})")
    problem = _structure_problem(state)
    if problem:
        raise CheckpointError(f"checkpoint {path} is not a whole moe-cl checkpoint ({problem}); "
                              "it was not loaded")
    return state


def _structure_problem(state: dict) -> str | None:
    for part, keys in CHECKPOINT_PARTS.items():
        if not isinstance(state.get(part), dict):
            return f"{part} is missing" if part not in state else f"{part} is not a mapping"
        missing = [key for key in keys if key not in state[part]]
        if missing:
            return f"{part} lacks {', '.join(missing)}"
    if not isinstance(state["model"]["state_dict"], dict):
        return "model.state_dict is not a mapping"
    if not isinstance(state.get("settings", {}), dict):
        return "settings is not a mapping"
    return None


def model_state(model: torch.nn.Module) -> dict:
    return {"state_dict": model.state_dict()}  # a mixture's structure is in its extra state


def load_model_state(model: torch.nn.Module, state: dict) -> None:
    state_dict = dict(state["state_dict"])
    if isinstance(model, MixtureOfExperts) and "_extra_state" not in state_dict:
        state_dict["_extra_state"] = state["extra"]  # written before the extra state moved in
    try:
        model.load_state_dict(state_dict)
    except (RuntimeError, ValueError, KeyError) as err:
        detail = " ".join(str(err).split())
        raise CheckpointError(
            "the saved model does not fit the run's settings (was config.yaml edited?): "
            f"{detail[:300]}{'...' if len(detail) > 300 else ''}"
        ) from None


def optimizer_state(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict:
    """The optimizer's state with its parameters named (their order in the param groups)."""
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
    return {"state_dict": optimizer.state_dict(), "param_names": groups}


def restore_optimizer(optimizer: torch.optim.Optimizer, model: torch.nn.Module,
                      state: dict) -> dict:
    """Point the optimizer at the model's parameters in the saved order and load its state.
    Returns the name -> parameter map that Avalanche's ``update_optimizer`` keeps."""
    params = dict(model.named_parameters())
    try:
        for group, names in zip(optimizer.param_groups, state["param_names"], strict=True):
            group["params"] = [params[n] for n in names]
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"optimizer state does not fit the model ({err})") from None
    optimizer.state = defaultdict(dict)
    optimizer.load_state_dict(state["state_dict"])
    return params
