"""The run folder: what a run writes where, how it is written, who may write it, and how its end
is read.

Every command that makes or reads run folders (``run``, the suites, distillation from a finished
teacher) goes through these names and functions, so the contract is stated once:

- ``config.yaml`` (the resolved settings), ``results.json`` (``status``: running, complete or
  failed), ``checkpoint.pt`` (after every experience), ``logs/`` and ``figures/``;
- one process at a time: a command that trains, writes or deletes in a run folder first claims
  it (:func:`claim_folder`): ``.lock``, made atomically, names the holder (host, pid, SLURM
  job); a second command gets one line naming the holder (exit 2); a lock whose process is gone
  is taken over, and the command says so;
- every file is written whole or not at all: to a temporary name unique to its writer, then
  renamed over the old one (two writers never share a temporary file); a full disk leaves the
  previous file and no temporary file (:class:`NoSpaceError`);
- exit codes: 0 done, 2 usage error, 3 a NaN or infinite loss stopped training, 4 no space left
  to write a file (free some, then resume); a failed run ends the same way under every command
  (:func:`end_failed_run`): a NaN loss marks results.json failed, a usage error or a full disk
  removes the folder the command made for the run if nothing worth keeping (results,
  checkpoint) was written in it.

This module imports neither torch nor Avalanche.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from moe_cl.errors import NO_SPACE, NON_FINITE_LOSS, USAGE_ERROR, exit_code, out_of_space
from moe_cl.storage.slurm_jobs import slurm_job_ended

CONFIG = "config.yaml"
RESULTS = "results.json"
CHECKPOINT = "checkpoint.pt"
LOGS = "logs"
FIGURES = "figures"
LOCK = ".lock"
# What a run writes in its folder (besides its lock and temporary files).
RUN_ENTRIES = (CONFIG, RESULTS, CHECKPOINT, LOGS, FIGURES)
# results.json's "status"
RUNNING, COMPLETE, FAILED = "running", "complete", "failed"



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


# ----------------------------------------------------------------------------- writing


class NoSpaceError(RuntimeError):
    """A file could not be written for lack of space (a full file system or quota); the
    previous version of the file is intact and the run can resume once space is freed."""

    exit_code = NO_SPACE

    def __init__(self, path: Path, cause: OSError) -> None:
        reason = "disk quota exceeded" if cause.errno == errno.EDQUOT else "no space left"
        super().__init__(f"cannot write {path}: {reason} ({_free_space(path)} free on its "
                         "file system)")


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` whole or not at all: ``write`` fills a temporary file of this writer's
    own in the same folder, which is synced and renamed over ``path``. On any error the
    temporary file is removed and ``path`` keeps its previous content; lack of space is a
    :class:`NoSpaceError` naming ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        full = out_of_space(error)
        if full is not None:
            raise NoSpaceError(path, full) from error
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda handle: handle.write(text.encode()))


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def _is_temporary(path: Path) -> bool:
    """A file :func:`_temporary_name` named (``.NAME.PID-HEX.tmp``), not any hidden .tmp."""
    return re.fullmatch(r"\..+\.\d+-[0-9a-f]+\.tmp", path.name) is not None


def _free_space(path: Path) -> str:
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("/"))
    free = float(shutil.disk_usage(existing).free)
    for unit in ("bytes", "kB", "MB", "GB"):
        if free < 1000:
            return f"{free:.0f} {unit}" if unit == "bytes" else f"{free:.1f} {unit}"
        free /= 1000
    return f"{free:.1f} TB"


# ----------------------------------------------------------------------------- reading


class ResultsError(ValueError):
    """A whole results.json that is not a run's results (edited by hand, or another file):
    trusting it would tabulate or print what no run measured (a usage error)."""

    exit_code = USAGE_ERROR


# results.json's fields that readers (the summary, the suites' tables) rely on, and their types.
_NUMBER = (int, float)
RESULTS_FIELDS: dict[str, tuple[type, ...]] = {
    "status": (str,), "benchmark": (str,), "strategy": (str,), "method": (str,),
    "scenario": (str,), "seed": (int,), "device": (str,), "experiences_completed": (int,),
    "n_experiences": (int,), "accuracy_matrix": (list,), "average_accuracy": _NUMBER,
    "forgetting": _NUMBER, "num_experts": (int,), "experts_added": (int,),
    "num_parameters": (int,), "wall_time_s": _NUMBER, "config": (dict,),
}
# Numbers that a run may not have measured (null).
OPTIONAL_NUMBERS = ("task_aware_average_accuracy", "train_error", "train_error_reference",
                    "test_error", "top5_error", "router_error", "H_s", "H_u", "MI", "MI_pred")


def results_problem(results: Any) -> str | None:
    """What makes ``results`` (results.json's parsed content) not a run's results; None when
    they are."""
    if not isinstance(results, dict):
        return f"it holds a {type(results).__name__}, not a mapping of results"
    missing = [key for key in RESULTS_FIELDS if key not in results]
    if missing:
        return f"missing {', '.join(missing)}"
    for key, types in (*RESULTS_FIELDS.items(), *((k, (*_NUMBER, type(None)))
                                                   for k in OPTIONAL_NUMBERS)):
        value = results.get(key)
        if not isinstance(value, types) or isinstance(value, bool):
            return f"{key} is {value!r}, not {' or '.join(t.__name__ for t in types)}"
    if results["status"] not in (RUNNING, COMPLETE, FAILED):
        return f"status is {results['status']!r}, not {RUNNING}, {COMPLETE} or {FAILED}"
    rows = results["accuracy_matrix"]
    if not all(isinstance(row, list) and all(_is_number(v) for v in row) for row in rows):
        return "accuracy_matrix is not a list of rows of numbers"
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, _NUMBER) and not isinstance(value, bool)


def check_results(folder: Path) -> dict | None:
    """The run's results.json; None if it is missing or cut short (not JSON: a run rebuilds
    it from its checkpoint); a :class:`ResultsError` naming the file and the problem when it
    is whole but not a run's results. The one reader of results.json."""
    path = folder / RESULTS
    try:
        results = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    problem = results_problem(results)
    if problem:
        raise ResultsError(f"{path} is not a run's results ({problem}); delete it to rebuild "
                           "it from the run's checkpoint")
    return results


def read_results(folder: Path) -> dict | None:
    """The run's results.json, or None if it is missing, unreadable or not a run's results
    (:func:`check_results`): what is returned can be tabulated."""
    try:
        return check_results(folder)
    except ResultsError:
        return None


def is_complete(results: dict | None) -> bool:
    """Whether results (as :func:`read_results` gives them) are those of a finished run."""
    return results is not None and results.get("status") == COMPLETE


def folder_is_complete(folder: Path) -> bool:
    return is_complete(read_results(folder))


def has_checkpoint(folder: Path) -> bool:
    return (folder / CHECKPOINT).exists()


def holds_only_run_files(folder: Path) -> bool:
    """Whether everything in ``folder`` (if it exists) is a run's: its files, lock and
    temporary files; a folder that holds anything else is not a run folder to start in."""
    if not folder.is_dir():
        return True
    return all(p.name in (*RUN_ENTRIES, LOCK) or _is_temporary(p) for p in folder.iterdir())


def start_anew(folder: Path) -> None:
    """Remove what a run that finished no experience left in ``folder`` (config.yaml, logs,
    figures, temporary files), so it starts from nothing; its lock and anything that is not a
    run's stay."""
    for entry in folder.iterdir():
        if entry.name in RUN_ENTRIES or _is_temporary(entry):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()


# ----------------------------------------------------------------------------- the lock


class FolderInUse(RuntimeError):
    """Another process holds the run folder's lock: the command does nothing (usage error)."""

    exit_code = USAGE_ERROR


@dataclass(frozen=True)
class RunLock:
    """This process's claim on a run folder (see :func:`claim_folder`)."""

    folder: Path
    made: Path | None  # the topmost folder the claim created (what a failure may remove)

    def release(self) -> None:
        """Remove the lock, then the folders the claim made if they are left empty (a
        discarded run: :func:`end_failed_run`)."""
        (self.folder / LOCK).unlink(missing_ok=True)
        _remove_empty(self.folder, self.made)


def claim_folder(folder: Path, echo: Callable[[str], None] = print) -> RunLock:
    """Create ``folder`` (and its missing parents) and take its lock, which must be released
    on every path out (:meth:`RunLock.release`). ``.lock`` is created only if there is none
    (O_CREAT|O_EXCL) and names this process. A lock whose process is gone (:func:`_is_stale`)
    is taken over, and ``echo`` says so; a live holder is a :class:`FolderInUse` naming it.
    Temporary files that killed writers left are removed."""
    made = make_folder(folder)
    lock = folder / LOCK
    stale: dict | None = None  # said only once the lock is ours: a racing loser says nothing
    for _ in range(3):  # a stale lock another process took over first: look again
        try:
            _create_lock(lock)
            break
        except FileExistsError:
            holder = _read_lock(lock)
            if holder is None:
                continue  # released meanwhile
            if not _is_stale(holder):
                raise FolderInUse(_in_use(folder, holder)) from None
            _remove_stale(lock, holder)
            stale = holder
    else:
        raise FolderInUse(_in_use(folder, _read_lock(lock)))
    if stale is not None:
        echo(f"{folder}: taking over the lock of process {stale.get('pid')} on "
             f"{stale.get('host')}, which is gone")
    for leftover in (*folder.glob(".*.tmp"), *(folder / FIGURES).glob(".*.tmp")):
        if _is_temporary(leftover):  # a write of ours cut short; not a user's file
            leftover.unlink(missing_ok=True)
    return RunLock(folder, made)


def _create_lock(lock: Path) -> None:
    """Create ``lock`` holding this process's record; FileExistsError if there is one."""
    handle = os.fdopen(os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), "w")
    try:
        with handle:
            json.dump(_lock_record(), handle)
    except BaseException:
        lock.unlink(missing_ok=True)  # an empty lock would block the folder for good
        raise


def _lock_record() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "slurm_job": os.environ.get("SLURM_JOB_ID"), "slurm_restart": _slurm_restart()}


def _slurm_restart() -> int:
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0)


def _read_lock(lock: Path) -> dict | None:
    """The lock's record; None when it is gone; {} when it cannot be read, even after a moment
    for its writer to finish."""
    for _ in range(10):
        try:
            record = json.loads(lock.read_text())
            return record if isinstance(record, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            time.sleep(0.05)
    return {}


def _is_stale(holder: dict) -> bool:
    """Whether the process that took this lock is gone: an earlier start of this same SLURM
    job (requeued after preemption, it runs again under its job id), another SLURM job that
    squeue no longer shows (it ended: scancel), or a process of this host that is not alive
    (or has this process's own pid, as after a container restart)."""
    job = os.environ.get("SLURM_JOB_ID")
    if job and holder.get("slurm_job") == job and holder.get("slurm_restart", 0) < _slurm_restart():
        return True
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        other = str(holder.get("slurm_job") or "")
        return other != job and slurm_job_ended(other)
    return holder["pid"] == os.getpid() or not _alive(holder["pid"])


def _alive(pid: int) -> bool:
    try:
        return os.kill(pid, 0) is None
    except OSError as error:  # PermissionError: another user's process, alive
        return not isinstance(error, ProcessLookupError)


def _remove_stale(lock: Path, stale: dict) -> None:
    """Remove the stale lock, unless another process replaced it meanwhile (then put that one
    back): the lock is moved aside and checked before it is deleted."""
    aside = lock.with_name(f"{LOCK}.{os.getpid()}-{uuid.uuid4().hex[:8]}.aside")
    try:
        lock.rename(aside)
    except FileNotFoundError:
        return  # removed by another process first
    if _read_lock(aside) != stale:
        try:
            os.link(aside, lock)
        except FileExistsError:
            pass
    aside.unlink(missing_ok=True)


def _in_use(folder: Path, holder: dict | None) -> str:
    if not holder:
        return (f"run folder {folder} is locked ({folder / LOCK} cannot be read); delete it if "
                "no process uses the folder")
    job = f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else ""
    return (f"run folder {folder} is in use by process {holder.get('pid')} on "
            f"{holder.get('host')}{job} since {holder.get('since')}; wait for it to end, or "
            f"delete {folder / LOCK} if that process is gone")


# ----------------------------------------------------------------------------- failures


def end_failed_run(error: BaseException, folder: Path, made: Path | None) -> tuple[int, str]:
    """Leave the run ``folder`` as a failure with ``error`` leaves it, and return the exit code
    and the error line: a NaN loss marks results.json failed and says what the run keeps; a
    usage error or a full disk discards what this command made (``made``, see
    :func:`make_folder`) if nothing worth keeping was written, a full disk also saying what the
    run keeps. Raises ``error`` again when it is a bug (:func:`exit_code`)."""
    code = exit_code(error)
    if code is None:
        raise error
    if code == NON_FINITE_LOSS:
        return code, f"{error}; {record_failure(folder, str(error))}"
    discard_if_empty(folder, made)
    if code == NO_SPACE:
        full = out_of_space(error)
        if not isinstance(error, NoSpaceError) and full is not None:
            error = NoSpaceError(Path(full.filename or folder), full)
        return code, f"{error}; {_what_is_kept(folder)}"
    return code, str(error)


def record_failure(folder: Path, message: str) -> str:
    """Mark a stopped run's results.json (there when an experience had finished) as failed with
    ``message``; returns what the run keeps, for the error line."""
    results = read_results(folder)
    if results is not None:
        write_json(folder / RESULTS, {**results, "status": FAILED, "error": message})
    return _what_is_kept(folder)


def _what_is_kept(folder: Path) -> str:
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
    that this leaves empty. A locked folder goes when its lock is released."""
    if made is None or made not in (folder, *folder.parents) or not folder.exists():
        return
    if (folder / RESULTS).exists() or has_checkpoint(folder):
        return
    start_anew(folder)
    _remove_empty(folder, made)


def _remove_empty(folder: Path, made: Path | None) -> None:
    """Remove ``folder`` and its parents up to ``made`` while they are empty."""
    if made is None:
        return
    for path in (folder, *folder.parents):
        if made not in (path, *path.parents):
            return
        try:
            path.rmdir()
        except OSError:  # not empty (or gone): what is above is not empty either
            return
