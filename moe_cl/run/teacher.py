"""Distilling a finished run: its checkpoint is the teacher, if it was trained alike."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from torch import nn

from moe_cl.errors import ConfigError
from moe_cl.run.config import load_saved
from moe_cl.storage.run_folder import (
    CHECKPOINT,
    COMPLETE,
    CONFIG,
    RESULTS,
    folder_is_complete,
    has_checkpoint,
)
from moe_cl.training.checkpoint import load_checkpoint, load_model_state

# What must match between a run and the teacher it distils (the rest is bookkeeping).
TEACHER_KEYS = ("benchmark", "seed", "scenario", "data.stream", "data.max_train_samples",
                "model", "experts", "regularizer", "train.epochs", "train.batch_size", "train.lr",
                "train.weight_decay")


def load_teacher(cfg: DictConfig, model: nn.Module, n_stages: int) -> dict:
    """Load the trained model of the finished run ``cfg.distill.teacher`` into ``model`` and
    return its checkpoint; refuses a run whose training differs from this configuration's."""
    folder = Path(cfg.distill.teacher)
    if n_stages != 1:
        raise ConfigError("distill.teacher works on single-experience benchmarks (paper_*); "
                          f"{cfg.benchmark} has {n_stages} experiences")
    if not (folder_is_complete(folder) and has_checkpoint(folder)):
        raise ConfigError(f"distill.teacher={folder}: no finished run there (expected "
                          f"{CONFIG}, {RESULTS} with status {COMPLETE} and {CHECKPOINT})")
    saved = load_saved(folder / CONFIG)
    if saved.distill.epochs:
        raise ConfigError(f"distill.teacher={folder} is itself a distilled run")
    differing = [key for key in TEACHER_KEYS
                 if _plain(OmegaConf.select(saved, key)) != _plain(OmegaConf.select(cfg, key))]
    if differing:
        raise ConfigError(f"distill.teacher={folder} was trained with different "
                          f"{', '.join(differing)}")
    checkpoint = load_checkpoint(folder / CHECKPOINT)
    load_model_state(model, checkpoint["model"])
    return checkpoint


def _plain(node):
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
