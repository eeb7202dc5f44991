"""The run command end to end on the tiny benchmark: outputs, determinism, errors, resume."""

import errno
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from moe_cl.run.cli import main
from moe_cl.storage.run_folder import LOCK

FAST = ["logging.interactive=false", "logging.tensorboard=false"]
VOLATILE = {"wall_time_s", "config", "figures"}


def _run(tmp_path: Path, *args: str, name: str = "run") -> tuple[int, Path]:
    out = tmp_path / name
    keys = {a.split("=", 1)[0] for a in args}
    fast = [a for a in FAST if a.split("=", 1)[0] not in keys]
    code = main([*fast, *args, f"out_dir={out}"])
    return code, out


def _stable(results: dict) -> dict:
    return {k: v for k, v in results.items() if k not in VOLATILE}


def test_moe_with_growth_writes_every_output(tmp_path):
    code, out = _run(tmp_path, "benchmark=tiny", "strategy=attentive_ls",
                     "logging.tensorboard=true")
    assert code == 0
    for name in ("config.yaml", "results.json", "checkpoint.pt", "logs/log.txt",
                 "logs/metrics.csv", "logs/csv/eval_results.csv", "figures/accuracy_matrix.png",
                 "figures/expert_usage.png", "figures/expert_class_after_exp02.png"):
        assert (out / name).is_file(), name
    assert any((out / "logs" / "tensorboard").iterdir())
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "complete"
    matrix = results["accuracy_matrix"]
    assert len(matrix) == 3 and all(len(row) == 3 for row in matrix)
    assert len(results["task_aware_accuracy_matrix"]) == 3
    for key in ("average_accuracy", "forgetting", "H_s", "H_u", "MI", "MI_pred", "num_experts",
                "experts_added", "num_parameters", "wall_time_s", "device", "seed", "versions"):
        assert key in results, key
    assert results["num_experts"] == 4 and results["experts_added"] == 2
    assert results["average_accuracy"] == pytest.approx(sum(matrix[-1]) / 3)
    assert 0 <= results["H_s"] <= 2.0 and 0 <= results["MI"] <= 2.6
    assert results["versions"]["avalanche-lib"] == "0.6.0"
    for png in (out / "figures").glob("*.png"):
        with Image.open(png) as image:
            assert image.format == "PNG" and image.size[0] > 50
    metrics = (out / "logs" / "metrics.csv").read_text()
    assert "Routing_MI/eval_phase/test_stream" in metrics
    assert "model:\n" in (out / "config.yaml").read_text()


def test_same_seed_gives_identical_results_and_other_seed_differs(tmp_path):
    args = ["benchmark=tiny", "strategy=moe_ls", "seed=3", "logging.figures=false"]
    assert _run(tmp_path, *args, name="a")[0] == 0
    assert _run(tmp_path, *args, name="b")[0] == 0
    assert _run(tmp_path, *args[:-2], "seed=4", "logging.figures=false", name="c")[0] == 0
    a, b, c = (json.loads((tmp_path / n / "results.json").read_text()) for n in "abc")
    assert _stable(a) == _stable(b)
    assert _stable(a) != _stable(c)


def test_avalanche_baseline_runs_on_the_same_benchmark(tmp_path):
    code, out = _run(tmp_path, "benchmark=tiny", "strategy=replay", "replay.mem_size=40",
                     "logging.figures=false")
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == "replay" and results["num_experts"] == 1
    assert results["H_s"] is None and len(results["accuracy_matrix"]) == 3


def test_joint_training_is_one_stage(tmp_path):
    code, out = _run(tmp_path, "benchmark=tiny", "strategy=joint", "logging.figures=false")
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert len(results["accuracy_matrix"]) == 1 and results["average_accuracy"] > 0.6


def test_task_scenario_and_distilled_strategy(tmp_path):
    code, out = _run(tmp_path, "benchmark=tiny", "strategy=distilled", "scenario=task",
                     "logging.figures=false", "eval.top_k=1")
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["scenario"] == "task" and results["task_aware_accuracy_matrix"] is None
    assert results["average_accuracy"] > 0.6


def test_distilling_a_finished_teacher_equals_training_it_again(tmp_path, capsys):
    one = ["benchmark=tiny", "data.n_experiences=1", "logging.figures=false"]
    assert _run(tmp_path, *one, "strategy=attentive_ls", name="teacher")[0] == 0
    code, full = _run(tmp_path, *one, "strategy=distilled", name="full")
    assert code == 0
    teacher = f"distill.teacher={tmp_path / 'teacher'}"
    code, reused = _run(tmp_path, *one, "strategy=distilled", teacher, name="reused")
    assert code == 0
    assert "distilling the trained model of" in capsys.readouterr().out
    expected = _stable(json.loads((full / "results.json").read_text()))
    assert _stable(json.loads((reused / "results.json").read_text())) == expected
    # A teacher that is not this run's configuration, or not a single experience, is refused.
    for args, message in (
        ([*one, "seed=1"], "trained with different seed"),
        (["benchmark=tiny", "logging.figures=false"], "single-experience"),
        ([*one, f"distill.teacher={tmp_path / 'none'}"], "no finished run there"),
        ([*one, f"distill.teacher={full}"], "itself a distilled run"),
    ):
        own = any(a.startswith("distill.teacher=") for a in args)
        code, out = _run(tmp_path, "strategy=distilled", *([] if own else [teacher]), *args,
                         name="refused")
        assert code == 2 and message in capsys.readouterr().err, message
        assert not out.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["benchmark=nope"], "unknown benchmark preset 'nope'; choose one of"),
        (["benchmark=tiny", "strategy=nope"], "unknown strategy preset 'nope'"),
        (["benchmark=tiny", "model.num_experts=abc"], "model.num_experts"),
        (["benchmark=tiny", "train.epochs=-1"], "train.epochs must be a finite number >= 0"),
        (["benchmark=tiny", "train.lr=nan"], "train.lr must be a finite number > 0"),
        (["benchmark=tiny", "experts.threshold=inf"], "experts.threshold must be a finite"),
        (["benchmark=tiny", "strategy=lwf", "baseline.lwf_temperature=0"], "> 0, got 0"),
        (["benchmark=tiny", "strategy=naive", "replay.mem_size=5"],
         "replay.mem_size does not apply to method=naive"),
        (["benchmark=tiny", "strategy=naive", "model.num_experts=7", "eval.top_k=1"],
         "model.num_experts, eval.top_k do not apply to method=naive"),
        (["benchmark=tiny", "strategy=moe", "baseline.ewc_lambda=3"], "does not apply"),
        (["benchmark=tiny", "eval.top_k=1"], "eval.top_k needs a gate that routes before"),
        (["benchmark=tiny", "model.gate=softmax", "eval.top_k=50"],
         "eval.top_k must be in [1, model.num_experts=2]"),
        (["benchmark=tiny", "seed=99999999999999999999"], "seed must be in [0, 4294967295]"),
        (["benchmark=tiny", "train=3"], "train is a section, not a value"),
        (["benchmark=tiny", "train.epochs=${oops}"], "train.epochs: Interpolation key 'oops'"),
        (["benchmark=tiny", "train.epochs=1", "train.epochs=2"], "train.epochs is given twice"),
        (["benchmark=tiny", "regularizer.importance=heavy"], "regularizer.importance"),
        (["benchmark=tiny", "model.gaet=softmax"], "unknown key 'model.gaet'"),
        (["benchmark=tiny", "model.gate=linear"], "choose one of: softmax, attentive"),
        (["benchmark=tiny", "experts.policy=sometimes"], "experts.policy"),
        (["benchmark=tiny", "experts.init=zeros"], "choose one of: random, copy"),
        (["benchmark=tiny", "experts.route_by_task=true"], "needs scenario=task"),
        (["benchmark=tiny", "strategy=naive", "regularizer.importance=1"],
         "regularizer.importance does not apply to method=naive"),
        (["benchmark=tiny", "model.architecture=cifar100"], "expects inputs"),
        (["benchmark=paper_mnist"], "MNIST"),
        (["benchmark=paper_fmnist", "data.n_experiences=5"], "is one experience"),
        (["notakeyvalue"], "expected key=value"),
    ],
)
def test_usage_errors_exit_2_without_a_run_folder(tmp_path, capsys, args, message):
    code, out = _run(tmp_path, *args, f"data.root={tmp_path / 'no-data'}")
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()
    assert not (tmp_path / "no-data").exists()


def test_unusable_out_dir_is_a_usage_error(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    for out in (a_file, a_file / "run"):
        assert main(["benchmark=tiny", *FAST, f"out_dir={out}"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and str(a_file) in err and "Traceback" not in err
    assert a_file.read_text() == "not a folder"


def test_resume_false_never_resumes(tmp_path, capsys):
    code, out = _run(tmp_path, "benchmark=tiny", "strategy=moe", "logging.figures=false")
    assert code == 0
    before = (out / "results.json").read_text()
    for value in ("false", "False"):
        assert main([f"resume={value}", f"out_dir={out}", *FAST]) == 2
        assert "is not empty" in capsys.readouterr().err
    assert (out / "results.json").read_text() == before


def test_resume_with_other_settings_names_them(tmp_path, capsys):
    args = ["benchmark=tiny", "strategy=moe", "logging.figures=false"]
    code, out = _run(tmp_path, *args)
    assert code == 0
    assert main([*args, *FAST, "resume=true", f"out_dir={out}", "train.lr=0.01"]) == 2
    err = capsys.readouterr().err
    assert "settings differ" in err and "train.lr: 0.001 -> 0.01" in err
    assert main([*args, *FAST, "resume=true", f"out_dir={out}"]) == 0  # the original command


def test_resume_refuses_an_edited_or_emptied_config(tmp_path, capsys):
    code, out = _run(tmp_path, "benchmark=tiny", "strategy=moe", "logging.figures=false")
    assert code == 0
    (out / "results.json").unlink()  # rebuilt from the checkpoint's model on resume
    config = (out / "config.yaml").read_text()
    (out / "config.yaml").write_text(config.replace("num_experts: 2", "num_experts: 3"))
    assert main([f"resume={out}", *FAST]) == 2
    err = capsys.readouterr().err  # the checkpoint's settings name what changed
    assert "model.num_experts: 2 -> 3" in err and len(err.strip().splitlines()) == 1
    (out / "config.yaml").write_text(config.replace("mlp_width: 32", "mlp_width: 48"))
    assert main([f"resume={out}", *FAST]) == 2
    assert "no longer matches its checkpoint" in capsys.readouterr().err
    (out / "config.yaml").write_text("")
    assert main([f"resume={out}", *FAST]) == 2
    assert "does not hold a run's settings" in capsys.readouterr().err


def test_finished_run_rebuilds_lost_results_and_figures_on_resume(tmp_path, capsys):
    code, out = _run(tmp_path, "benchmark=tiny", "strategy=attentive_ls")
    assert code == 0
    original = json.loads((out / "results.json").read_text())
    (out / "results.json").unlink()
    for png in (out / "figures").glob("*.png"):
        png.unlink()
    assert main([f"resume={out}", *FAST]) == 0
    rebuilt = json.loads((out / "results.json").read_text())
    assert _stable(rebuilt) == _stable(original)
    assert (out / "figures" / "accuracy_matrix.png").is_file()
    (out / "results.json").write_text('{"status": "comp')  # cut short by a kill
    assert main([f"resume={out}", *FAST]) == 0
    assert _stable(json.loads((out / "results.json").read_text())) == _stable(original)


def test_help_lists_presets_and_keys(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for name in ("split_cifar100", "paper_fmnist", "tiny", "attentive_ls", "ewc", "joint",
                 "experts.policy", "regularizer.ls.beta_s", "data.root"):
        assert name in text


def test_malformed_preset_yaml_is_a_usage_error(tmp_path, monkeypatch, capsys):
    import moe_cl.run.config as config

    for kind in ("strategies", "benchmarks"):
        (tmp_path / kind).mkdir()
    (tmp_path / "benchmarks" / "tiny.yaml").write_text("data: {stream: tiny\n")
    (tmp_path / "strategies" / "moe.yaml").write_text("method: moe\n")
    monkeypatch.setattr(config, "preset_dirs", lambda: {
        "strategy": tmp_path / "strategies", "benchmark": tmp_path / "benchmarks"})
    assert main(["benchmark=tiny", "strategy=moe", f"out_dir={tmp_path / 'x'}"]) == 2
    assert "malformed YAML" in capsys.readouterr().err


def test_nan_loss_stops_with_exit_3_and_keeps_the_checkpoint(tmp_path, capsys):
    code, out = _run(tmp_path, "benchmark=tiny", "strategy=moe", "train.lr=1e30")
    assert code == 3
    err = capsys.readouterr().err
    assert "loss is nan at training experience" in err and "iteration" in err


def test_corrupt_or_unsafe_checkpoint_is_refused(tmp_path, capsys):
    code, out = _run(tmp_path, "benchmark=tiny", "strategy=moe", "logging.figures=false")
    assert code == 0
    results_before = (out / "results.json").read_text()
    (out / "results.json").write_text(results_before.replace('"complete"', '"running"'))
    (out / "checkpoint.pt").write_bytes(b"\x80\x04not a checkpoint")
    assert main([f"resume={out}", *FAST]) == 2
    assert "corrupt or unsafe" in capsys.readouterr().err

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"format": 1, "payload": Payload()}, out / "checkpoint.pt")
    assert main([f"resume={out}", *FAST]) == 2
    assert "corrupt or unsafe" in capsys.readouterr().err
    assert not (tmp_path / "pwned").exists()


def _cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "moe_cl.run", *args, *FAST],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.mark.parametrize(("strategy", "every_epochs"), [("attentive_ls", 0),
                                                         ("attentive_ls", 10), ("routed", 10)])
def test_killed_run_resumes_to_identical_results(tmp_path, strategy, every_epochs):
    """Killed after the first checkpoint: the end of experience 0, or epoch 10 inside it."""
    args = [f"strategy={strategy}", "benchmark=tiny", "train.epochs=30", "seed=7",
            "logging.figures=false", f"train.checkpoint_every_epochs={every_epochs}"]
    whole = _cli(*args, f"out_dir={tmp_path / 'whole'}")
    killed = _cli(*args, f"out_dir={tmp_path / 'killed'}")
    checkpoint = tmp_path / "killed" / "checkpoint.pt"
    deadline = time.time() + 120
    while not checkpoint.exists() and time.time() < deadline and killed.poll() is None:
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert whole.wait(timeout=300) == 0
    partial = tmp_path / "killed" / "results.json"  # may not be written yet
    if partial.exists():
        partial = json.loads(partial.read_text())
        assert partial["status"] == "running" and partial["experiences_completed"] < 3
    resumed = _cli(f"resume={tmp_path / 'killed'}")
    output = resumed.communicate(timeout=300)[0].decode()
    assert resumed.returncode == 0, output
    assert "resuming at experience" in output
    a = json.loads((tmp_path / "whole" / "results.json").read_text())
    b = json.loads((tmp_path / "killed" / "results.json").read_text())
    assert _stable(a) == _stable(b)


def test_installed_wheel_runs_from_another_directory(tmp_path):
    root = Path(__file__).resolve().parents[1]
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(wheels), str(root)], check=True, capture_output=True)
    wheel = next(wheels.glob("moe_cl-*.whl"))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(target), str(wheel)], check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = ("import moe_cl, sys; from moe_cl.run.cli import main; print(moe_cl.__file__); "
            "sys.exit(main(['--help']))")
    done = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert str(target) in done.stdout
    assert "split_cifar100" in done.stdout and "attentive_ls" in done.stdout


def test_truncated_data_file_is_a_usage_error_naming_the_file(tmp_path, capsys):
    from tests.datafiles import write_mnist_like

    raw = write_mnist_like(tmp_path / "data", folder="MNIST", n_train=64, n_test=32)
    images = raw / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:1000])
    code, out = _run(tmp_path, "benchmark=paper_mnist", f"data.root={tmp_path / 'data'}")
    assert code == 2
    err = capsys.readouterr().err
    assert "train-images-idx3-ubyte" in err and "Traceback" not in err
    assert not out.exists()


def test_two_runs_in_one_folder_at_once_end_cleanly(tmp_path):
    """Before the lock, one of them died in a race on a temporary file both wrote."""
    out = tmp_path / "same"
    args = ["benchmark=tiny", "strategy=moe", f"out_dir={out}"]  # figures too: where it died
    runs = [_cli(*args), _cli(*args)]
    outputs = [run.communicate(timeout=300)[0].decode() for run in runs]
    codes = [run.returncode for run in runs]
    assert sorted(codes) == [0, 2], outputs
    refused = outputs[codes.index(2)]
    assert f"run folder {out} is in use by process" in refused and "Traceback" not in refused
    assert json.loads((out / "results.json").read_text())["status"] == "complete"
    assert not list(out.rglob("*.tmp")) and not (out / LOCK).exists()


def test_resume_starts_a_run_that_never_got_going(tmp_path, capsys):
    """A preempted job requeued with its own command, resume=true, whenever it was stopped."""
    args = ["benchmark=tiny", "strategy=moe", "logging.figures=false", "resume=true"]
    code, out = _run(tmp_path, *args)  # stopped before it made its folder
    assert code == 0
    whole = json.loads((out / "results.json").read_text())
    # Stopped before its first checkpoint: config.yaml, logs and the lock of a process gone.
    (out / "checkpoint.pt").unlink()
    (out / "results.json").unlink()
    (out / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    assert main([f"resume={out}", *FAST]) == 0
    assert "taking over the lock of process" in capsys.readouterr().out
    assert _stable(json.loads((out / "results.json").read_text())) == _stable(whole)
    assert not (out / LOCK).exists()
    mine = tmp_path / "mine"  # a folder that is not a run's is never taken for one
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert main([*FAST, *args, f"out_dir={mine}"]) == 2
    assert "is not a run folder" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    typo = tmp_path / "rum"  # a folder to resume must be one
    assert main([*FAST, *args[:-1], f"resume={typo}"]) == 2
    assert f"resume: {typo} is not a run folder" in capsys.readouterr().err
    assert not typo.exists()


def _save_on_a_full_disk(save):
    """torch.save whose file system fills after a few bytes (torch then raises a RuntimeError
    whose context is the OSError)."""

    class FullDisk(io.RawIOBase):
        def __init__(self, handle):
            self.handle = handle

        def writable(self):
            return True

        def write(self, data):
            self.handle.write(bytes(data[:10]))
            raise OSError(errno.ENOSPC, "No space left on device")

    return lambda state, handle: save(state, FullDisk(handle))


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()


def test_a_full_disk_stops_the_run_and_resume_continues(tmp_path, capsys, monkeypatch):
    args = ["benchmark=tiny", "strategy=moe", "logging.figures=false"]
    assert _run(tmp_path, *args, name="whole")[0] == 0
    real_save, saves = torch.save, []

    def save(state, handle):  # the checkpoint after the second experience finds the disk full
        saves.append(state["progress"]["completed"])
        writer = real_save if len(saves) < 2 else _save_on_a_full_disk(real_save)
        writer(state, handle)

    monkeypatch.setattr(torch, "save", save)
    code, out = _run(tmp_path, *args, name="full")
    assert code == 4 and saves == [1, 2]
    line = _error_line(capsys)
    assert f"cannot write {out / 'checkpoint.pt'}: no space left (" in line
    assert "free on its file system" in line and f"resume={out}" in line
    assert "the checkpoint of the last finished experience is kept" in line
    monkeypatch.undo()
    assert torch.load(out / "checkpoint.pt", weights_only=True)["progress"]["completed"] == 1
    assert not list(out.rglob("*.tmp")) and not (out / LOCK).exists()
    assert main([f"resume={out}", *FAST]) == 0  # space freed
    expected = json.loads((tmp_path / "whole" / "results.json").read_text())
    assert _stable(json.loads((out / "results.json").read_text())) == _stable(expected)


def test_a_full_disk_while_a_figure_is_drawn(tmp_path, capsys, monkeypatch):
    from matplotlib.figure import Figure

    def savefig(figure, handle, **kwargs):
        handle.write(b"\x89PNG")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", savefig)
    code, out = _run(tmp_path, "benchmark=tiny", "strategy=moe")
    assert code == 4
    assert f"cannot write {out / 'figures' / 'expert_class_after_exp00.png'}" in _error_line(
        capsys)
    assert not list(out.rglob("*.tmp")) and not list(out.rglob("*.png"))
    monkeypatch.undo()
    assert main([f"resume={out}", *FAST]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "complete" and "figures/accuracy_matrix.png" in results["figures"]
