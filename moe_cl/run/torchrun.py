"""One run on several processes under torchrun: which settings it refuses, how the ranks join,
and the run on rank 0 (``lead``) and on the others (``follow``).

The ranks' communication (agreements, sums, the failure watcher) is
:class:`moe_cl.training.ranks.Ranks`; docs/scaling.md has the user's view. The run itself is
the one lifecycle of :mod:`moe_cl.run.lifecycle`: rank 0 holds the folder and decides whether to
resume; every rank then trains with :func:`moe_cl.run.lifecycle.train`.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from moe_cl.errors import ConfigError, exit_code
from moe_cl.run.lifecycle import train
from moe_cl.training.methods import METHODS
from moe_cl.training.ranks import Ranks, one_line, start_process_group


def data_parallel_problem(cfg: DictConfig, world_size: int) -> str | None:
    """What of ``cfg`` one run on ``world_size`` ranks cannot do (one line), or None."""
    if not METHODS[cfg.method].mixture:
        return (f"method={cfg.method} cannot run under torchrun: Avalanche's strategies neither "
                "synchronise the ranks' weights nor reduce their metrics (each rank would train "
                "its own model on its shard of the data); run it as one process (a suite's "
                "--jobs or --shard spreads many runs)")
    if not cfg.train.fast_data:
        return ("train.fast_data=false cannot run under torchrun: Avalanche's loaders split "
                "batches their own way; keep the fast data path")
    if cfg.replay.mem_size > 0:
        return ("replay.mem_size > 0 cannot run under torchrun: the replay plugin's loader "
                "splits batches its own way; run replay as one process")
    if cfg.train.batch_size < world_size:
        return (f"train.batch_size={cfg.train.batch_size} is the global batch, split across the "
                f"{world_size} ranks: it must be at least {world_size}")
    return None


def join(cfg: DictConfig | None) -> Ranks:
    """This process's place among torchrun's ranks: settings that data parallelism cannot run
    are refused first (a usage error on every rank, before any process group), then the
    process group and the failure watcher start. ``cfg``: the command's settings (None when it
    only names a run to resume: rank 0 checks those in :func:`lead`)."""
    env = os.environ
    rank, world_size = int(env["RANK"]), int(env["WORLD_SIZE"])
    if cfg is not None:
        _refuse_problem(cfg, world_size)
    # Avalanche makes loggers while it is imported, which it refuses on ranks but 0 once a
    # process group exists: it is imported first.
    import moe_cl.run.experiment  # noqa: F401
    start_process_group(rank, world_size)
    return Ranks(rank=rank, world_size=world_size, local_rank=int(env["LOCAL_RANK"]))


def _refuse_problem(cfg: DictConfig, world_size: int) -> None:
    problem = data_parallel_problem(cfg, world_size)
    if problem:
        raise ConfigError(problem)


def lead(ranks: Ranks, cfg: DictConfig, out: Path, resume: bool, *, checked: bool) -> dict:
    """Rank 0, once it holds the run folder: hand the run to the others and train it with
    them; returns results.json's dict. ``checked``: whether :func:`join` has seen these
    settings (not when they were read from the run's config.yaml)."""
    if not checked:
        _refuse_problem(cfg, ranks.world_size)
    ranks.share((cfg, out, resume))
    return _train(ranks, cfg, out, resume, echo=print)


def follow(ranks: Ranks) -> int:
    """Every rank but 0: train the run rank 0 hands over, writing nothing; the exit code."""
    try:
        cfg, out, resume = ranks.share(None)
        _train(ranks, cfg, out, resume, echo=_quiet)
        return 0
    except Exception as error:  # noqa: BLE001 - every failure ends as an exit code
        code = ranks.announce(error)
        if not getattr(error, "every_rank", False):  # rank 0 prints what all ranks share
            if exit_code(error) is None:
                traceback.print_exc()
            else:
                print(f"error: rank {ranks.rank}: {one_line(error)}", file=sys.stderr)
        ranks.wait_for_main()
        return code


def _train(ranks: Ranks, cfg: DictConfig, out: Path, resume: bool, echo) -> dict:
    import torch.distributed as dist

    results = train(cfg, out, resume=resume, ranks=ranks, echo=echo)
    dist.barrier()  # the others wait for rank 0's last files
    ranks.done()
    return results


def _quiet(*args: Any, **kwargs: Any) -> None:
    return None
