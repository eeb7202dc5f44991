"""Suites across processes and machines: --jobs (worker processes, threads divided, GPUs shared
out), --shard, --launcher slurm (submitit's local executor), their bad input, and the order a
distilled run keeps after its teacher."""

import json
import os
import socket
import subprocess
import sys
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from types import SimpleNamespace

import pytest

from moe_cl.storage.run_folder import LOCK, read_results
from moe_cl.suite import launch, reproduce, schedule
from moe_cl.suite.launch import Launch, RunDied
from moe_cl.suite.spec import Outcome, RunSpec
from tests.helpers import one_error_line
from tests.suite_helpers import compare_tiny, table_files


def _accuracies(out: Path) -> dict:
    table = json.loads((out / "table.json").read_text())
    return {name: entry["average_accuracy"][0] for name, entry in table.items()}


def test_jobs_train_in_worker_processes_and_tabulate_once(finished_suite, tmp_path, capsys):
    assert compare_tiny(tmp_path, "--only", "naive", "ewc", "--jobs", "2") == 0
    said = capsys.readouterr().out
    assert "[1/2]" in said and "[2/2]" in said
    # One thread per run instead of two: the same runs, to float precision.
    assert _accuracies(tmp_path) == pytest.approx(_accuracies(finished_suite), abs=1e-6)
    assert not list(tmp_path.rglob(LOCK)) and not list(tmp_path.rglob("*.tmp"))


def test_a_failed_job_ends_the_suite_with_its_exit_code(tmp_path, capsys):
    """(That nothing new starts after a failure: test_after_a_failure_nothing_new_starts.)"""
    nan_for_lwf = ["baseline.lwf_temperature=1e-39"]  # LwF's distillation overflows: NaN
    assert compare_tiny(tmp_path, "--only", "naive", "lwf", "--jobs", "2",
                        overrides=nan_for_lwf) == 3
    line = one_error_line(capsys)
    assert "run lwf-class seed 0" in line and "loss is nan" in line
    assert read_results(tmp_path / "naive-class" / "seed-0")["status"] == "complete"
    assert not (tmp_path / "table.md").exists()


@pytest.mark.parametrize(("options", "message"), [
    (["--jobs", "0"], "--jobs: must be >= 1, got 0"),
    (["--per-gpu", "0"], "--per-gpu: must be >= 1"),
    (["--shard", "0/2"], "--shard: expected I/N with 1 <= I <= N"),
    (["--shard", "3/2"], "got '3/2'"),
    (["--shard", "a/b"], "got 'a/b'"),
    (["--shard", "1/0"], "got '1/0'"),
    (["--shard", "2"], "got '2'"),
    (["--slurm-time", "30"], "--slurm-time: only with --launcher slurm"),
    (["--launcher", "cluster"], "--launcher: invalid choice"),
])
def test_bad_launch_options_are_one_line_and_start_nothing(tmp_path, capsys, options, message):
    with pytest.raises(SystemExit) as exit_:
        compare_tiny(tmp_path, "--only", "naive", *options)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert list(tmp_path.iterdir()) == []


def test_slurm_without_submitit_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit fails
    with pytest.raises(SystemExit) as exit_:
        compare_tiny(tmp_path, "--launcher", "slurm", "--slurm-time", "30")
    assert exit_.value.code == 2
    assert "needs submitit: pip install 'moe-cl[slurm]'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_more_jobs_than_the_gpus_allow_is_a_usage_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(launch, "visible_gpus", lambda device: ["cuda:0", "cuda:1"])
    assert compare_tiny(tmp_path, "--only", "naive", "ewc", "lwf", "--jobs", "3") == 2
    line = one_error_line(capsys)
    assert "--jobs 3 would put up to 2 runs on each of the 2 GPU(s)" in line
    assert "use --jobs 2, or --per-gpu 2" in line
    assert list(tmp_path.iterdir()) == []


def test_threads_and_gpus_are_shared_out():
    assert launch.run_threads(Launch(jobs=2), cpus=2) == 1
    assert launch.run_threads(Launch(jobs=3), cpus=2) == 1
    assert launch.run_threads(Launch(jobs=2), cpus=16) == 8
    assert launch.run_threads(Launch()) is None  # one run here: torch's default
    assert launch.run_threads(Launch(launcher="slurm", slurm_cpus_per_task=4)) == 4
    assert launch.visible_gpus("cpu") == [] and launch.visible_gpus("cuda:3") == ["cuda:3"]
    gpus = ["cuda:0", "cuda:1"]
    assert launch.least_loaded(gpus, []) == "cuda:0"
    assert launch.least_loaded(gpus, ["cuda:0"]) == "cuda:1"
    assert launch.least_loaded(gpus, ["cuda:0", "cuda:1", "cuda:1"]) == "cuda:0"
    assert launch.gpu_problem(4, 2, gpus) is None and launch.gpu_problem(5, 2, gpus)


class _Executor:
    """Takes ``capacity`` runs at once; a run ends on the first look after its start."""

    poll_s = 0.0

    def __init__(self, capacity: int, fail: str = "") -> None:
        self.capacity, self.fail, self.batches = capacity, fail, []

    def submit(self, fn, specs):
        self.batches.append(list(specs))
        handles = []
        for spec in specs:
            handle = Future()
            failed = spec.variant.name == self.fail
            handle.set_result(Outcome(exit_code=3, error=f"{spec.label}: loss is nan") if failed
                              else Outcome({"test_error": 0.5}))
            handles.append(handle)
        return handles

    def result(self, handle):
        return handle.result()


def _specs(names: list[str], seeds=(0,)) -> list[RunSpec]:
    variants = reproduce.variants("paper_fmnist", names, grid=False)
    return [RunSpec("paper_fmnist", v, s, Path("out")) for s in seeds for v in variants]


def _schedule(executor, specs, gpus=(), threads=None):
    said = []
    progress = schedule._Progress(len(specs), executor.capacity, said.append)
    failure = schedule._run_all(executor, specs, progress, list(gpus), threads)
    return failure, said


def test_a_distilled_run_starts_after_its_teacher_and_gpus_are_reused():
    executor = _Executor(capacity=2)
    specs = _specs(["attentive_ls", "distilled_ls", "moe", "single"])
    failure, said = _schedule(executor, specs, gpus=["cuda:0", "cuda:1"], threads=1)
    assert failure is None and len(said) == 4
    names = [[(s.variant.name, s.device, s.threads) for s in batch] for batch in executor.batches]
    assert names == [[("attentive_ls", "cuda:0", 1), ("moe", "cuda:1", 1)],
                     [("distilled_ls", "cuda:0", 1), ("single", "cuda:1", 1)]]


def test_after_a_failure_nothing_new_starts():
    executor = _Executor(capacity=2, fail="moe")
    failure, said = _schedule(executor, _specs(["moe", "single", "attentive"]))
    assert failure.exit_code == 3 and "run moe seed 0" in failure.error
    assert [s.variant.name for batch in executor.batches for s in batch] == ["moe", "single"]
    assert len(said) == 2 and "waiting for the 1 run(s) still running" in said[0]


def test_a_worker_that_died_is_named_not_a_traceback():
    dead = Future()
    dead.set_exception(BrokenProcessPool("a child process terminated abruptly"))
    with launch.Workers(1) as workers, pytest.raises(RunDied, match="worker process died"):
        workers.result(dead)


def test_shards_are_disjoint_cover_every_run_and_keep_a_teacher_with_its_student():
    runs = _specs(reproduce.categories(), seeds=(0, 1, 2))
    parts = [schedule.shard(runs, index, 4) for index in (1, 2, 3, 4)]
    assert sorted(s.key for part in parts for s in part) == sorted(s.key for s in runs)
    sizes = sorted(len(part) for part in parts)  # 27 runs: 6-8 each, a teacher with its student
    assert sizes[0] >= 6 and sizes[-1] - sizes[0] <= 2, sizes
    for part in parts:
        keys = {s.key for s in part}
        assert all(s.teacher_key in keys for s in part if s.variant.teacher)
    assert schedule.shard(runs, 1, 1) == runs


def test_a_shard_trains_and_reports_only_its_part(suite_out, capsys):
    before = table_files(suite_out)
    assert compare_tiny(suite_out, "--only", "naive", "ewc", "--shard", "2/2") == 0
    said = capsys.readouterr().out
    assert "[1/1] ewc-class seed 0" in said and "naive-class" not in said.split("###")[0]
    assert table_files(suite_out) == before  # the table still covers every finished run


def test_a_run_in_use_by_another_process_stops_the_suite(suite_out, capsys):
    run = suite_out / "naive-class" / "seed-0"
    results = run / "results.json"
    results.write_text(results.read_text().replace('"complete"', '"running"'))  # to resume
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid}))
        assert compare_tiny(suite_out, "--only", "naive") == 2
    finally:
        holder.kill()
        holder.wait()
    line = one_error_line(capsys)
    assert "run naive-class seed 0" in line and f"in use by process {holder.pid}" in line
    assert (run / LOCK).exists()  # the holder's: left alone


@pytest.mark.filterwarnings("error::UserWarning")  # an empty array was submitted on each poll
def test_slurm_array_through_submitits_local_executor(finished_suite, tmp_path, capsys,
                                                      monkeypatch):
    slurm = pytest.importorskip("moe_cl.suite.slurm")  # submitit is the dev extra's
    monkeypatch.setattr(slurm, "CLUSTER", "local")
    monkeypatch.setattr(slurm.SlurmArray, "poll_s", 0.2)
    assert compare_tiny(tmp_path, "--only", "naive", "--launcher", "slurm", "--slurm-time",
                        "10") == 0
    assert "[1/1] naive-class seed 0" in capsys.readouterr().out
    assert _accuracies(tmp_path)["naive-class"] == pytest.approx(
        _accuracies(finished_suite)["naive-class"], abs=1e-6)
    assert any((tmp_path / "slurm").glob("*_log.out"))


def test_slurm_needs_sbatch(tmp_path, capsys, monkeypatch):
    slurm = pytest.importorskip("moe_cl.suite.slurm")
    monkeypatch.setattr(slurm.shutil, "which", lambda name: None)
    assert compare_tiny(tmp_path, "--only", "naive", "--launcher", "slurm", "--slurm-time",
                        "10") == 2
    assert "sbatch not found" in one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_an_array_slurm_refuses_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    slurm = pytest.importorskip("moe_cl.suite.slurm")
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    sbatch = bin_ / "sbatch"  # what Debian's SLURM 22.05 says to a wrong partition
    sbatch.write_text("#!/bin/sh\necho 'sbatch: error: invalid partition specified: nosuch' >&2\n"
                      "echo 'sbatch: error: Batch job submission failed: Invalid partition name "
                      "specified' >&2\nexit 1\n")
    sbatch.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_}:{os.environ['PATH']}")
    out = tmp_path / "out"
    assert compare_tiny(out, "--only", "naive", "ewc", "--launcher", "slurm", "--slurm-time",
                        "10", "--slurm-partition", "nosuch") == 2
    line = one_error_line(capsys)
    assert "SLURM refused the job array: invalid partition specified: nosuch" in line
    assert not out.exists() and slurm.problem() is None


def test_a_task_slurm_ended_is_named_with_its_state_and_only_a_log_that_exists(tmp_path):
    slurm = pytest.importorskip("moe_cl.suite.slurm")
    array = slurm.SlurmArray(tmp_path, Launch(launcher="slurm", slurm_time=10), echo=print)
    paths = SimpleNamespace(result_pickle=tmp_path / "7_1_0_result.pkl",
                            stderr=tmp_path / "7_1_0_log.err")
    task = slurm.Task(SimpleNamespace(job_id="7_1", paths=paths), array)
    array._states["7_1"] = ("CANCELLED", "")  # cancelled while it pended: it wrote no log
    with pytest.raises(RunDied) as died:
        array.result(task)
    assert "SLURM task 7_1 ended CANCELLED without a result; it wrote no log" in str(died.value)
    paths.stderr.write_text("slurmstepd: error: *** JOB 8 CANCELLED ***")
    array._states["7_1"] = ("TIMEOUT", "")
    with pytest.raises(RunDied, match=f"ended TIMEOUT without a result; see {paths.stderr}"):
        array.result(task)
