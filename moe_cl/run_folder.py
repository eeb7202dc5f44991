"""The run folder: what a run writes where, how it is written, and how its end is read.

Every command that makes or reads run folders (``run``, the suites, distillation from a finished
teacher) goes through these names and functions, so the contract is stated once:

- ``config.yaml`` (the resolved settings), ``results.json`` (``status``: running, complete or
  failed), ``checkpoint.pt`` (after every experience), ``logs/`` and ``figures/``;
- every file is written whole or not at all: to a temporary name unique to its writer, then
  renamed over the old one (two writers never share a temporary file);
- exit codes: 0 done, 2 usage error, 3 a NaN or infinite loss stopped training; a failed run
  ends the same way under every command (:func:`end_failed_run`): a NaN loss marks results.json
  failed, a usage error removes the folder the command made for the run if nothing worth
  keeping (results, checkpoint) was written in it.

This module imports neither torch nor Avalanche.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

CONFIG = "config.yaml"
RESULTS = "results.json"
CHECKPOINT = "checkpoint.pt"
# results.json's "status"
RUNNING, COMPLETE, FAILED = "running", "complete", "failed"

USAGE_ERROR = 2
NON_FINITE_LOSS = 3


def folder_problem(folder: Path, *, writable: bool = False) -> str | None:
    """Why ``folder`` cannot be (or become) a folder to read, or with ``writable`` to write,
    files in; None when it can. Checked before long work, which should not end on it."""
    path = folder
    try:
        while not path.exists() and path != path.parent:
            path = path.parent
        is_dir = path.is_dir()
    except OSError as exc:
        return f"cannot inspect {path}: {exc.strerror or exc}"
    if not is_dir:
        if path == folder:
            return f"{folder} is not a folder (it is a file)"
        return f"{folder} cannot be a folder: {path} is a file, not a folder"
    if writable and not os.access(path, os.W_OK):
        return f"{path} is not writable"
    return None


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` whole or not at all: ``write`` fills a temporary file of this writer's
    own in the same folder, which is synced and renamed over ``path``. On any error the
    temporary file is removed and ``path`` keeps its previous content."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda handle: handle.write(text.encode()))


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_results(folder: Path) -> dict | None:
    """The run's results.json, or None if it is missing or unreadable (truncated, not JSON)."""
    try:
        results = json.loads((folder / RESULTS).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return results if isinstance(results, dict) else None


def is_complete(results: dict | None) -> bool:
    """Whether results (as :func:`read_results` gives them) are those of a finished run."""
    return results is not None and results.get("status") == COMPLETE


def folder_is_complete(folder: Path) -> bool:
    return is_complete(read_results(folder))


def has_checkpoint(folder: Path) -> bool:
    return (folder / CHECKPOINT).exists()


# ----------------------------------------------------------------------------- failures


def exit_code(error: BaseException) -> int | None:
    """The exit status of a command whose run failed with ``error``: the error class's own
    ``exit_code`` (ConfigError, DataError, CheckpointError: 2; NonFiniteLossError: 3), 2 for
    any other ValueError (a combination of settings the schema cannot express); None for
    anything else, which is a bug to let through."""
    code = getattr(error, "exit_code", None)
    if code is None and isinstance(error, ValueError):
        return USAGE_ERROR
    return code


def end_failed_run(error: BaseException, folder: Path, made: Path | None) -> tuple[int, str]:
    """Leave the run ``folder`` as a failure with ``error`` leaves it, and return the exit code
    and the error line: a NaN loss marks results.json failed and says what the run keeps; a
    usage error discards what this command made (``made``, see :func:`make_folder`) if nothing
    worth keeping was written. Raises ``error`` again when it is a bug (:func:`exit_code`)."""
    code = exit_code(error)
    if code is None:
        raise error
    if code == NON_FINITE_LOSS:
        return code, f"{error}; {record_failure(folder, str(error))}"
    discard_if_empty(folder, made)
    return code, str(error)


def record_failure(folder: Path, message: str) -> str:
    """Mark a stopped run's results.json (there when an experience had finished) as failed with
    ``message``; returns what the run keeps, for the error line."""
    results = read_results(folder)
    if results is not None:
        write_json(folder / RESULTS, {**results, "status": FAILED, "error": message})
    if has_checkpoint(folder):
        return "the checkpoint of the last finished experience is kept"
    return "no experience had finished"


def make_folder(folder: Path) -> Path | None:
    """Create ``folder`` and its missing parents; returns the topmost folder created (None when
    ``folder`` existed): what :func:`discard_if_empty` may remove again."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    return missing[-1] if missing else None


def discard_if_empty(folder: Path, made: Path | None) -> None:
    """Remove the run ``folder`` if this command made it (``made``: the topmost folder it
    created) and it holds neither results nor a checkpoint, then the folders up to ``made``
    that this leaves empty."""
    if made is None or made not in (folder, *folder.parents) or not folder.exists():
        return
    if (folder / RESULTS).exists() or has_checkpoint(folder):
        return
    shutil.rmtree(folder, ignore_errors=True)
    for parent in folder.parents:
        if made not in (parent, *parent.parents) or any(parent.iterdir()):
            break
        parent.rmdir()
