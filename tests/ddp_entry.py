"""A torchrun entry point for tests/test_distributed.py: ``python -m moe_cl.run`` with test-only
faults and checks, switched on by environment variables (none of this is in the package).

- MOE_CL_TEST_FAULT=nan|error and MOE_CL_TEST_FAULT_RANK=R: at the third training iteration
  rank R's loss is NaN, or its criterion raises; the time of the fault is printed.
- MOE_CL_TEST_NO_WRITES_UNDER=DIR: ranks other than 0 fail on anything that would create,
  write, rename or delete a file or folder under DIR.
- MOE_CL_TEST_STATE_DIR=DIR: each rank saves its model's state_dict to DIR/rank<R>.pt after
  every stage.
"""

import builtins
import io
import os
import sys
import time
from pathlib import Path

import torch

from moe_cl.run import experiment
from moe_cl.run.cli import main
from moe_cl.training.strategies import MoEStrategy

RANK = int(os.environ["RANK"])
FAULT_ITERATION = 2  # the third iteration (Avalanche's clock counts from 0)


def inject_fault(kind: str) -> None:
    criterion = MoEStrategy.criterion

    def faulty(strategy):
        loss = criterion(strategy)
        if strategy.clock.train_iterations == FAULT_ITERATION:
            print(f"fault injected at {time.time()}", flush=True)
            if kind == "error":
                raise RuntimeError("injected failure")
            loss = loss * float("nan")
        return loss

    MoEStrategy.criterion = faulty


def forbid_writes_under(folder: Path) -> None:
    """Make every call that would change the file system under ``folder`` raise."""
    folder = folder.resolve()

    def check(path, what: str) -> None:
        if isinstance(path, int):
            return
        resolved = Path(os.fsdecode(path)).resolve()
        if resolved == folder or folder in resolved.parents:
            raise AssertionError(f"rank {RANK} would {what} {resolved}")

    real_open, real_os_open = builtins.open, os.open

    def open_checked(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            check(file, "write")
        return real_open(file, mode, *args, **kwargs)

    def os_open_checked(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            check(path, "write")
        return real_os_open(path, flags, *args, **kwargs)

    def checked(function, what: str, paths: int):
        def wrapper(*args, **kwargs):
            if kwargs.get("dir_fd") is not None or kwargs.get("src_dir_fd") is not None:
                raise AssertionError(f"rank {RANK} would {what} relative to a folder")
            for path in args[:paths]:
                check(path, what)
            return function(*args, **kwargs)

        return wrapper

    builtins.open = io.open = open_checked
    os.open = os_open_checked
    for name, paths in (("mkdir", 1), ("remove", 1), ("unlink", 1), ("rmdir", 1),
                        ("rename", 2), ("replace", 2)):
        setattr(os, name, checked(getattr(os, name), name, paths))


def save_states_in(folder: Path) -> None:
    write = experiment._write

    def write_and_save(run, evaluated, echo):
        results = write(run, evaluated, echo)
        torch.save(run.model.state_dict(), folder / f"rank{RANK}.pt")
        return results

    experiment._write = write_and_save


if __name__ == "__main__":
    if os.environ.get("MOE_CL_TEST_FAULT") and int(os.environ["MOE_CL_TEST_FAULT_RANK"]) == RANK:
        inject_fault(os.environ["MOE_CL_TEST_FAULT"])
    if os.environ.get("MOE_CL_TEST_NO_WRITES_UNDER") and RANK != 0:
        forbid_writes_under(Path(os.environ["MOE_CL_TEST_NO_WRITES_UNDER"]))
    if os.environ.get("MOE_CL_TEST_STATE_DIR"):
        save_states_in(Path(os.environ["MOE_CL_TEST_STATE_DIR"]))
    sys.exit(main())
