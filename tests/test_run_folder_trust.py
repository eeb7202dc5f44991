"""What a run folder says is checked before it is trusted (issue 25): an edited or crafted
checkpoint, results.json or config.yaml, a stop by SIGTERM or Ctrl-C, and the command each
error line advises. Every probe ends in one line with its exit code, no traceback."""

import errno
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from moe_cl.run import cli
from moe_cl.run.cli import main
from moe_cl.storage.run_folder import LOCK, RESULTS, read_results
from tests.helpers import one_error_line

FAST = ["logging.interactive=false", "logging.tensorboard=false", "logging.figures=false"]
TINY = ["benchmark=tiny", "strategy=moe", *FAST]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """One finished tiny run (3 experiences, 1 epoch each), copied by each test."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main([*TINY, "train.epochs=1", f"out_dir={out}"]) == 0
    return out


@pytest.fixture
def run(finished, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


def _unfinished(run: Path) -> Path:
    """The run as a kill after its first experience leaves it."""
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    progress = state["progress"]
    progress["completed"] = 1
    for key in ("accuracy_matrix", "task_aware_matrix", "routing_history", "train_errors",
                "reference_train_errors"):
        progress[key] = progress[key][:1]
    torch.save(state, run / "checkpoint.pt")
    (run / RESULTS).unlink()
    return run


def _edit_config(run: Path, old: str, new: str) -> None:
    config = (run / "config.yaml").read_text()
    assert old in config
    (run / "config.yaml").write_text(config.replace(old, new))


@pytest.mark.parametrize(("state", "message"), [
    ({"format": 1}, "model is missing"),
    ({"progress": {"bogus": 1}}, "unknown field 'bogus'"),
    ({"progress": {"completed": "x"}}, "progress.completed is 'x'"),
])
def test_a_checkpoint_with_the_right_tag_but_wrong_contents_is_refused(run, capsys, state,
                                                                       message):
    saved = torch.load(run / "checkpoint.pt", weights_only=True)
    torch.save(state if "format" in state else {**saved, **state}, run / "checkpoint.pt")
    assert main([f"resume={run}", *FAST]) == 2
    line = one_error_line(capsys)
    assert str(run / "checkpoint.pt") in line and message in line


@pytest.mark.parametrize(("content", "message"), [
    ({"status": "complete"}, "missing benchmark"),
    ("accuracy_matrix", "accuracy_matrix is 'oops'"),
])
def test_an_edited_results_json_is_refused_and_never_tabulated(run, capsys, content, message):
    if content == "accuracy_matrix":
        content = {**json.loads((run / RESULTS).read_text()), "accuracy_matrix": "oops"}
    (run / RESULTS).write_text(json.dumps(content))
    assert read_results(run) is None  # what the suites' tables read
    assert main([f"resume={run}", *FAST]) == 2
    line = one_error_line(capsys)
    assert str(run / RESULTS) in line and message in line and "delete it" in line


def test_an_edited_config_yaml_is_refused_naming_the_keys(run, capsys):
    _edit_config(run, "epochs: 1", "epochs: 5")  # a finished run: contradicts its results
    assert main([f"resume={run}", *FAST]) == 2
    assert "train.epochs: 1 -> 5" in one_error_line(capsys)
    assert main([f"resume={run}", "train.epochs=5", *FAST]) == 2  # finished: not even so
    assert "no longer matches its checkpoint" in one_error_line(capsys)
    _edit_config(run, "epochs: 5", "epochs: 1")
    _unfinished(run)
    _edit_config(run, "lr: 0.001", "lr: 0.01")
    assert main([f"resume={run}", *FAST]) == 2
    assert "train.lr: 0.001 -> 0.01" in one_error_line(capsys)
    _edit_config(run, "lr: 0.01", "lr: 0.001")
    _edit_config(run, "epochs: 1", "epochs: 2")
    assert main([f"resume={run}", *FAST]) == 2
    assert "train.epochs: 1 -> 2" in one_error_line(capsys)
    (run / "config.yaml").write_text("method: moe\n")
    assert main([f"resume={run}", *FAST]) == 2
    assert "benchmark, strategy, seed" in one_error_line(capsys)


def test_an_explicit_override_changes_what_is_safe_and_says_so(run, capsys):
    _unfinished(run)
    assert main([f"resume={run}", "train.epochs=2", *FAST]) == 0
    assert "train.epochs: 1 -> 2: changed on the command line" in capsys.readouterr().out
    assert "epochs: 2" in (run / "config.yaml").read_text()
    assert json.loads((run / RESULTS).read_text())["status"] == "complete"


def test_yaml_python_tags_in_config_yaml_are_refused_unexecuted(run, tmp_path, capsys):
    (run / "config.yaml").write_text(
        f"method: !!python/object/apply:os.system ['touch {tmp_path / 'pwned'}']\n")
    assert main([f"resume={run}", *FAST]) == 2
    assert "cannot read" in one_error_line(capsys)
    assert not (tmp_path / "pwned").exists()


def _stop_in_training(monkeypatch, stop) -> None:
    """``stop()`` during the second experience's first epoch."""
    from avalanche.training.templates import SupervisedTemplate

    real = SupervisedTemplate._after_training_epoch

    def after_epoch(strategy, **kwargs):
        real(strategy, **kwargs)
        if strategy.clock.train_exp_counter == 1:
            stop()

    monkeypatch.setattr(SupervisedTemplate, "_after_training_epoch", after_epoch)


@pytest.mark.parametrize(("stop", "code", "by"), [
    (lambda: os.kill(os.getpid(), signal.SIGTERM), 143, " by SIGTERM"),
    (lambda: (_ for _ in ()).throw(KeyboardInterrupt()), 130, ""),
])
def test_sigterm_and_ctrl_c_end_in_one_line_and_release_the_lock(tmp_path, capsys, monkeypatch,
                                                                 stop, code, by):
    _stop_in_training(monkeypatch, stop)
    out = tmp_path / "run"
    assert main([*TINY, "train.epochs=2", f"out_dir={out}"]) == code
    line = one_error_line(capsys)
    assert line == f"error: interrupted{by} at experience 1, epoch 1; continue with resume={out}"
    assert not (out / LOCK).exists() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    monkeypatch.undo()
    assert main([f"resume={out}", *FAST]) == 0


def test_a_full_disk_before_any_experience_advises_a_command_that_works(tmp_path, capsys,
                                                                       monkeypatch):
    import moe_cl.run.experiment as experiment

    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(experiment, "atomic_write_text", full)
    out = tmp_path / "run"
    assert main([*TINY, f"out_dir={out}"]) == 4
    line = one_error_line(capsys)
    assert "no experience had finished" in line and not out.exists()
    assert line.endswith("continue with the original command with resume=true")
    monkeypatch.undo()
    assert main([*TINY, "resume=true", f"out_dir={out}"]) == 0


def test_smaller_probes_end_in_one_line(run, tmp_path, capsys):
    assert main(["=3"]) == 2
    assert "expected key=value, got '=3'" in one_error_line(capsys)
    assert main([*TINY, f"train.epochs={10**23}", f"out_dir={tmp_path / 'x'}"]) == 2
    assert "train.epochs must be at most" in one_error_line(capsys)
    assert main([*TINY, f"out_dir={run}"]) == 2  # the advice works
    assert f"continue its run with resume={run}" in one_error_line(capsys)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert main([*TINY, f"out_dir={mine}"]) == 2
    line = one_error_line(capsys)
    assert line.endswith("is not empty; choose another out_dir") and "resume" not in line

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"format": 1, "payload": Payload()}, run / "checkpoint.pt")
    (run / RESULTS).unlink()
    assert main([f"resume={run}", *FAST]) == 2
    line = one_error_line(capsys)
    assert "GLOBAL posix.system" in line and "weights_only" not in line
    assert not (tmp_path / "pwned").exists()


def test_a_finished_run_on_a_read_only_mount_is_read_back(run, capsys, monkeypatch):
    def read_only(folder, writable=False):
        return f"{folder} is not writable" if writable else None

    def no_claim(*args, **kwargs):
        raise AssertionError("a read-only folder cannot be claimed")

    monkeypatch.setattr(cli, "folder_problem", read_only)
    monkeypatch.setattr(cli, "claimed", no_claim)
    assert main([f"resume={run}", *FAST]) == 0
    assert "average accuracy" in capsys.readouterr().out
