"""The run folder's contract: atomic writes, a failed run's marks, what a failed command
leaves behind, exit codes."""

import json
from pathlib import Path

import pytest

from moe_cl import run_folder
from moe_cl.run_folder import (
    NON_FINITE_LOSS,
    USAGE_ERROR,
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
    write_json(tmp_path / "results.json", {"status": "running", "accuracy_matrix": [[0.5]]})
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    assert "checkpoint of the last finished experience is kept" in record_failure(
        tmp_path, "loss is nan")
    assert json.loads((tmp_path / "results.json").read_text()) == {
        "status": "failed", "error": "loss is nan", "accuracy_matrix": [[0.5]]}


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
    from moe_cl.checkpoint import CheckpointError
    from moe_cl.config import ConfigError
    from moe_cl.datasets import DataError
    from moe_cl.plugins import NonFiniteLossError

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
