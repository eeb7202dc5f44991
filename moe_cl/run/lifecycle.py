"""The life of one run, written once for the single run, the suites and torchrun alike.

1. claim the run folder (its lock; :func:`claimed`);
2. resume from its checkpoint, or start anew, removing what a start that finished no experience
   left (:func:`resume_or_start`);
3. build the stream and train (:func:`train`, through :func:`moe_cl.run.experiment.run_experiment`);
4. end a failed run the one way (:func:`moe_cl.storage.run_folder.end_failed_run`: a NaN loss
   marks results.json failed, a usage error or a full disk discards a folder this command made
   and left empty) and release the lock on every way out.
What comes before (which folder, which settings) is each command's own: ``moe_cl.run.cli``
reads the command line, ``moe_cl.suite`` its grid, ``moe_cl.run.torchrun`` rank 0's settings.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from moe_cl.errors import ConfigError, out_of_space
from moe_cl.storage.run_folder import (
    RunLock,
    claim_folder,
    end_failed_run,
    has_checkpoint,
    start_anew,
)

if TYPE_CHECKING:
    from moe_cl.training.ranks import Ranks


class RunFailed(Exception):
    """A run that ended in a failure the command reports in one line (not a bug)."""

    def __init__(self, exit_code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.message = message


@contextmanager
def claimed(folder: Path, *, ranks: Ranks | None = None,
            echo: Callable[[str], None] = print) -> Iterator[RunLock]:
    """Hold ``folder``'s lock for the block. A failure inside ends the run (see the module) and
    comes out as :class:`RunFailed`; a bug is raised as it is. Under torchrun, another rank's
    failure releases the lock too, and this rank's failure is announced to the others first."""
    lock: RunLock | None = None
    try:
        lock = _claim(folder, echo)
        if ranks is not None:
            ranks.on_abort(lock.release)  # another rank's failure ends this process
        yield lock
    except Exception as err:
        if ranks is not None:
            ranks.announce(err)  # first: the other ranks stop
        code, message = end_failed_run(err, folder, lock.made if lock else None)  # bug: raised
        raise RunFailed(code, message) from err
    finally:
        if lock is not None:
            lock.release()


def _claim(folder: Path, echo: Callable[[str], None]) -> RunLock:
    try:
        return claim_folder(folder, echo)
    except OSError as err:
        if out_of_space(err) is not None:
            raise
        raise ConfigError(f"cannot create the run folder {folder}: {err.strerror}") from None


def resume_or_start(folder: Path) -> bool:
    """Whether the run in ``folder`` resumes from its checkpoint; if not, what a start that
    finished no experience left is removed first. Rank 0's decision under torchrun."""
    resume = has_checkpoint(folder)
    if not resume:
        start_anew(folder)
    return resume


def train(cfg: DictConfig, folder: Path, *, resume: bool, ranks: Ranks | None = None,
          echo: Callable[[str], None] = print, overridden: Collection[str] = ()) -> dict:
    """Build the run's stream and train it to its end from its checkpoint (``resume``) or from
    the start (with ``ranks``: this rank's part of a torchrun). ``overridden``: the settings
    safe to change that the command line changed, which may differ from the checkpoint's.
    Returns results.json's dict."""
    from moe_cl.run.builders import build_benchmark
    from moe_cl.run.experiment import run_experiment

    if ranks is None:
        bundle = build_benchmark(cfg)
        echo(f"run folder: {folder}")
    else:
        ranks.take_device(cfg.device)
        bundle = ranks.main_first(lambda: build_benchmark(cfg))  # a download happens once
        count = f"{ranks.world_size} rank{'s' if ranks.world_size > 1 else ''}"
        echo(f"run folder: {folder} ({count} on {ranks.device.type})")
    return run_experiment(cfg, folder, resume=resume, bundle=bundle, echo=echo, ranks=ranks,
                          overridden=overridden)
