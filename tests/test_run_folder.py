"""The run folder's contract: atomic writes, a full disk, the lock, a failed run's marks, what
a failed command leaves behind, exit codes."""

import errno
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from moe_cl.storage import run_folder
from moe_cl.storage.run_folder import (
    LOCK,
    NO_SPACE,
    NON_FINITE_LOSS,
    USAGE_ERROR,
    FolderInUse,
    NoSpaceError,
    RunLock,
    claim_folder,
    discard_if_empty,
    end_failed_run,
    exit_code,
    make_folder,
    record_failure,
    write_json,
)


def test_results_are_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    run_folder.write_json(path, {"status": "complete", "value": 1})

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(run_folder.os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        run_folder.write_json(path, {"status": "running", "value": 2})
    assert json.loads(path.read_text()) == {"status": "complete", "value": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file left


def test_each_writer_has_its_own_temporary_file(tmp_path, monkeypatch):
    seen = []
    real_replace = Path.replace

    def spy(self, target):
        seen.append(self.name)
        return real_replace(self, target)

    monkeypatch.setattr(Path, "replace", spy)
    run_folder.atomic_write_text(tmp_path / "a.png", "1")
    run_folder.atomic_write_text(tmp_path / "a.png", "2")
    assert len(set(seen)) == 2 and all(n.startswith(".a.png.") for n in seen)
    assert (tmp_path / "a.png").read_text() == "2"


def test_a_stopped_run_is_marked_failed_and_says_what_it_keeps(tmp_path):
    assert record_failure(tmp_path, "loss is nan") == "no experience had finished"
    assert not (tmp_path / "results.json").exists()
    running = {**{key: types[0]() for key, types in run_folder.RESULTS_FIELDS.items()},
               "status": "running", "accuracy_matrix": [[0.5]]}
    write_json(tmp_path / "results.json", running)
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    assert "checkpoint of the last finished experience is kept" in record_failure(
        tmp_path, "loss is nan")
    assert json.loads((tmp_path / "results.json").read_text()) == {
        **running, "status": "failed", "error": "loss is nan"}


def test_a_failed_command_removes_only_the_empty_folders_it_made(tmp_path):
    run = tmp_path / "suite" / "variant" / "seed-0"
    made = make_folder(run)
    assert made == tmp_path / "suite" and run.is_dir()
    assert make_folder(run) is None  # there already: not this call's to remove
    discard_if_empty(run, None)
    assert run.is_dir()
    (run / "config.yaml").write_text("method: moe\n")
    (tmp_path / "suite" / "other").mkdir()
    discard_if_empty(run, made)  # a config alone is nothing worth keeping
    assert not (tmp_path / "suite" / "variant").exists()
    assert (tmp_path / "suite" / "other").is_dir()  # not left empty: kept
    for kept in ("results.json", "checkpoint.pt"):
        made = make_folder(run)
        (run / kept).write_text("")
        discard_if_empty(run, made)
        assert (run / kept).exists()
        (run / kept).unlink()


class _Stopped(RuntimeError):
    exit_code = NON_FINITE_LOSS


def test_failures_end_with_their_exit_code_and_bugs_are_raised(tmp_path):
    from moe_cl.data.datasets import DataError
    from moe_cl.errors import ConfigError, NonFiniteLossError
    from moe_cl.training.checkpoint import CheckpointError

    for error in (ConfigError("x"), DataError("x"), CheckpointError("x"), ValueError("x")):
        assert exit_code(error) == USAGE_ERROR
    assert exit_code(NonFiniteLossError("x")) == NON_FINITE_LOSS
    assert exit_code(TypeError("x")) is None
    run = tmp_path / "run"
    made = make_folder(run)
    assert end_failed_run(ValueError("bad"), run, made) == (USAGE_ERROR, "bad")
    assert not run.exists()
    made = make_folder(run)
    code, message = end_failed_run(_Stopped("loss is nan"), run, made)
    assert code == NON_FINITE_LOSS and message == "loss is nan; no experience had finished"
    assert run.is_dir()  # a stopped run is kept (its logs say what happened)
    with pytest.raises(TypeError):
        end_failed_run(TypeError("a bug"), run, made)


# ----------------------------------------------------------------------------- a full disk


def _fills_the_disk_after(handle, data: bytes) -> None:
    handle.write(data)
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_names_the_file_and_keeps_the_previous_one(tmp_path):
    path = tmp_path / "checkpoint.pt"
    run_folder.atomic_write_text(path, "experience 1")
    with pytest.raises(NoSpaceError) as error:
        run_folder.atomic_write(path, lambda handle: _fills_the_disk_after(handle, b"experi"))
    message = str(error.value)
    assert str(path) in message and "no space left" in message
    assert re.search(r"\(\d+(\.\d)? (bytes|kB|MB|GB|TB) free on its file system\)", message)
    assert path.read_text() == "experience 1"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary file left
    assert exit_code(error.value) == NO_SPACE


def test_a_full_disk_behind_another_error_is_recognised(tmp_path):
    """torch's serializer reports the OSError as a RuntimeError whose context it is."""

    def serializer(handle):
        try:
            _fills_the_disk_after(handle, b"")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos") from None

    with pytest.raises(NoSpaceError, match="no space left"):
        run_folder.atomic_write(tmp_path / "checkpoint.pt", serializer)
    assert list(tmp_path.iterdir()) == []
    quota = OSError(errno.EDQUOT, "Disk quota exceeded", str(tmp_path / "logs" / "log.txt"))
    code, message = end_failed_run(quota, tmp_path, None)  # a write outside atomic_write
    assert code == NO_SPACE and "log.txt: disk quota exceeded" in message
    assert message.endswith("no experience had finished")


# ----------------------------------------------------------------------------- the lock


def _lock_of(folder: Path, **record) -> None:
    (folder / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                           "since": "2026-01-01 00:00:00", **record}))


@pytest.fixture
def live_process():
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield process
    process.kill()
    process.wait()


def test_a_claimed_folder_names_its_holder_and_is_released(tmp_path):
    run = tmp_path / "suite" / "run"
    lock = claim_folder(run)
    assert lock.made == tmp_path / "suite"
    record = json.loads((run / LOCK).read_text())
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    (run / "config.yaml").write_text("method: moe\n")
    lock.release()
    assert not (run / LOCK).exists() and (run / "config.yaml").exists()  # a run: kept
    lock = claim_folder(run)
    assert lock.made is None
    discard_if_empty(run, tmp_path / "suite")  # a failed start: nothing worth keeping
    assert (run / LOCK).exists() and not (run / "config.yaml").exists()
    RunLock(run, tmp_path / "suite").release()  # the folders it made go with the lock
    assert not (tmp_path / "suite").exists()


def test_a_live_holder_is_refused_and_a_gone_one_taken_over(tmp_path, live_process, capsys):
    _lock_of(tmp_path, pid=live_process.pid, slurm_job="77")
    with pytest.raises(FolderInUse) as refused:
        claim_folder(tmp_path)
    message = str(refused.value)
    assert f"in use by process {live_process.pid} on {socket.gethostname()}" in message
    assert "SLURM job 77" in message and f"delete {tmp_path / LOCK}" in message
    assert exit_code(refused.value) == USAGE_ERROR
    live_process.kill()
    live_process.wait()
    (tmp_path / ".results.json.123-abcd.tmp").write_text("half")  # left by a killed writer
    (tmp_path / ".notes.tmp").write_text("a user's")  # not a name our writes use
    claim_folder(tmp_path, echo=print).release()
    assert f"taking over the lock of process {live_process.pid}" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == [".notes.tmp"]


def test_which_locks_are_stale(tmp_path, monkeypatch):
    _lock_of(tmp_path)  # this very pid, not held: a restarted container
    claim_folder(tmp_path, echo=lambda _: None).release()
    _lock_of(tmp_path, host="elsewhere", pid=1)  # another machine: cannot be checked
    with pytest.raises(FolderInUse, match="on elsewhere"):
        claim_folder(tmp_path)
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    _lock_of(tmp_path, host="elsewhere", pid=1, slurm_job="42", slurm_restart=1)
    with pytest.raises(FolderInUse):  # the same start of the job, on another node
        claim_folder(tmp_path)
    _lock_of(tmp_path, host="elsewhere", pid=1, slurm_job="42", slurm_restart=0)
    claim_folder(tmp_path, echo=lambda _: None).release()  # its start before the requeue
    (tmp_path / LOCK).write_text("")
    with pytest.raises(FolderInUse, match="cannot be read"):
        claim_folder(tmp_path)


def test_starting_anew_removes_only_what_a_run_writes(tmp_path):
    for name in ("config.yaml", "logs/log.txt", "figures/a.png", ".results.json.1-ab.tmp",
                 LOCK):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("x")
    assert run_folder.holds_only_run_files(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    assert not run_folder.holds_only_run_files(tmp_path)
    run_folder.start_anew(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK, "notes.txt"]


def test_of_two_claims_racing_for_a_stale_lock_only_the_winner_says_it_took_over(
        tmp_path, live_process, monkeypatch):
    """The loser's removal finds the winner's lock in place: it says nothing but the refusal."""
    _lock_of(tmp_path, pid=2**22 + 1)  # a pid that is gone
    real_remove = run_folder._remove_stale

    def winner_first(lock, stale):  # the other claim removed it and took the lock meanwhile
        real_remove(lock, stale)
        _lock_of(tmp_path, pid=live_process.pid)

    monkeypatch.setattr(run_folder, "_remove_stale", winner_first)
    said: list[str] = []
    with pytest.raises(FolderInUse, match=f"in use by process {live_process.pid}"):
        claim_folder(tmp_path, echo=said.append)
    assert said == []
    monkeypatch.undo()
    _lock_of(tmp_path, pid=2**22 + 1)
    claim_folder(tmp_path, echo=said.append).release()
    assert said == [f"{tmp_path}: taking over the lock of process {2**22 + 1} on "
                    f"{socket.gethostname()}, which is gone"]


@pytest.mark.parametrize(("script", "ended"), [
    ("echo RUNNING", False),                                      # listed: alive
    ("exit 0", True),                                             # nothing listed: ended
    ("echo 'slurm_load_jobs error: Invalid job id specified' >&2; exit 1", True),  # forgotten
    ("echo 'slurm_load_jobs error: Unable to contact controller' >&2; exit 1", False),
    (None, False),                                                # no squeue here: cannot tell
])
def test_a_slurm_job_has_ended_only_when_squeue_says_so(tmp_path, monkeypatch, script, ended):
    """A lock taken by a SLURM job on another node is taken over only on squeue's word."""
    from moe_cl.storage.slurm_jobs import slurm_job_ended

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if script is not None:
        squeue = bin_dir / "squeue"
        squeue.write_text(f"#!/bin/sh\n{script}\n")
        squeue.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    assert slurm_job_ended("12") is ended
    assert slurm_job_ended("12; rm -rf /") is False  # never a shell, never a guess
