"""The suites on a real SLURM (``scripts/slurm_local.sh up``, as CI does): finish, resume, shards,
requeue at a time limit, scancel mid-run then rerun, Ctrl-C, a rejected partition, a task that
can never start, and the lock a cancelled task leaves. Skipped where no SLURM answers."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moe_cl.storage.run_folder import LOCK, claim_folder, read_results
from tests.helpers import one_error_line
from tests.suite_helpers import FAST, compare_tiny

pytestmark = [pytest.mark.slurm, pytest.mark.filterwarnings("error::UserWarning")]
SLURM = ("--launcher", "slurm", "--slurm-time", "5")
# Long enough to stop mid-run (a task goes on for KillWait, 5 s, after scancel): about 20 s of
# training (a tiny epoch takes 20 ms), a checkpoint every 25 epochs.
LONG_RUN = ("train.epochs=300", "train.checkpoint_every_epochs=25", "logging.figures=false")
NOT_TAKING_JOBS = {"down", "drain", "drng", "fail", "failg", "maint", "unk", "inval", "npc",
                   "pow_dn", "boot", "futr"}


def _slurm_problem() -> str | None:
    if shutil.which("sbatch") is None:
        return "no SLURM here (scripts/slurm_local.sh up starts one, as root)"
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True)
    if ping.returncode != 0 or "UP" not in ping.stdout:
        return "SLURM's controller does not answer (scripts/slurm_local.sh up starts one)"
    nodes = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True).stdout
    if all(n.rstrip("*~#!%$@^-") in NOT_TAKING_JOBS for n in nodes.split()):
        return f"no SLURM node takes jobs (sinfo: {' '.join(nodes.split()) or 'none'})"
    return None


@pytest.fixture(autouse=True)
def slurm(monkeypatch):
    """A SLURM that answers, and a suite that looks at its queue every second."""
    problem = _slurm_problem()
    if problem:
        pytest.skip(problem)
    slurm = pytest.importorskip("moe_cl.suite.slurm")
    monkeypatch.setattr(slurm.SlurmArray, "poll_s", 1.0)
    return slurm


def _active(job: str) -> list[str]:
    """The states of ``job``'s tasks that SLURM has not ended."""
    listed = subprocess.run(["squeue", "-h", "-r", "-j", job, "-o", "%T"], capture_output=True,
                            text=True).stdout
    return listed.split()


def _wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {seconds} s"
        time.sleep(0.5)


@pytest.fixture
def suite_process():
    """Starts python -m moe_cl.compare tiny on SLURM, naive only, as a separate process
    (killed, with its tasks, if the test ends first)."""
    started = []

    def start(out: Path, *options: str, overrides=FAST) -> subprocess.Popen:
        argv = [sys.executable, "-u", "-m", "moe_cl.compare", "tiny", *overrides, "--seeds",
                "1", "--scenarios", "class", "--only", "naive", "--out", str(out), *SLURM,
                *options]
        started.append((out, subprocess.Popen(argv, stdout=subprocess.PIPE,
                                              stderr=subprocess.PIPE, text=True)))
        return started[-1][1]

    yield start
    for out, process in started:
        if process.poll() is None:
            process.kill()
            process.wait()
        for submitted in (out / "slurm").glob("*_submitted.pkl"):
            subprocess.run(["scancel", submitted.name.split("_")[0]], capture_output=True)


def _job_of(out: Path) -> str:
    """The SLURM job of the suite's one run (its submitit file, once submitted)."""
    _wait_for(lambda: any((out / "slurm").glob("*_submitted.pkl")), 30, "submission")
    return next((out / "slurm").glob("*_submitted.pkl")).name.split("_")[0]


def test_shards_finish_and_a_second_call_redoes_nothing(tmp_path, capsys):
    for part, run in (("1/2", "naive-class"), ("2/2", "ewc-class")):
        assert compare_tiny(tmp_path, "--only", "naive", "ewc", "--shard", part, *SLURM) == 0
        said = capsys.readouterr().out
        assert "submitted 1 run(s) to SLURM as job" in said and "waiting for 1 SLURM task" in said
        assert f"[1/1] {run} seed 0" in said
    assert compare_tiny(tmp_path, "--only", "naive", "ewc", *SLURM) == 0
    said = capsys.readouterr().out
    assert "submitted" not in said and said.count("(done before)") == 2
    assert not list(tmp_path.rglob(LOCK))


def test_a_task_requeued_at_its_time_limit_resumes_its_run(tmp_path, suite_process):
    suite = suite_process(tmp_path, overrides=LONG_RUN)
    run = tmp_path / "naive-class" / "seed-0"
    job = _job_of(tmp_path)
    _wait_for(lambda: (run / "checkpoint.pt").exists(), 120, "the run's first checkpoint")
    # What SLURM sends before a time limit (submitit's --signal=USR2@90): submitit requeues.
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    # SLURM holds a requeued job for a while (reason BeginTime): let it start again now.
    _wait_for(lambda: _active(job) == ["PENDING"], 60, "the requeue")
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
    out, err = suite.communicate(timeout=240)
    assert suite.returncode == 0, err
    assert "[1/1] naive-class seed 0" in out and not err
    shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True)
    assert "Restarts=1" in shown.stdout
    assert read_results(run)["status"] == "complete"


def test_scancel_mid_run_ends_in_one_line_and_the_rerun_resumes(tmp_path, capsys, suite_process):
    suite = suite_process(tmp_path, overrides=LONG_RUN)
    run = tmp_path / "naive-class" / "seed-0"
    job = _job_of(tmp_path)
    _wait_for(lambda: (run / "checkpoint.pt").exists(), 120, "the run's first checkpoint")
    subprocess.run(["scancel", job], check=True)
    _, err = suite.communicate(timeout=90)  # before the fix: waited forever
    assert suite.returncode == 1
    assert len(err.strip().splitlines()) == 1, err
    assert "run naive-class seed 0" in err and f"SLURM task {job} ended CANCELLED" in err
    assert f"{job}_0_log.err" in err  # it started: its log is named
    assert compare_tiny(tmp_path, "--only", "naive", *SLURM, overrides=LONG_RUN) == 0
    assert "[1/1] naive-class seed 0" in capsys.readouterr().out
    assert read_results(run)["status"] == "complete" and not (run / LOCK).exists()


def test_ctrl_c_cancels_the_tasks_and_exits_130_in_one_line(tmp_path, suite_process):
    suite = suite_process(tmp_path, overrides=LONG_RUN)
    job = _job_of(tmp_path)
    time.sleep(1)
    suite.send_signal(signal.SIGINT)
    _, err = suite.communicate(timeout=60)
    assert suite.returncode == 130
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert f"interrupted (SLURM task(s) cancelled {job})" in err
    assert "run the same command again to resume" in err
    _wait_for(lambda: not _active(job) or _active(job) == ["COMPLETING"], 30, "the cancel")


def test_a_rejected_partition_is_one_line_and_leaves_nothing(tmp_path, capsys):
    assert compare_tiny(tmp_path, "--only", "naive", *SLURM, "--slurm-partition", "nosuch") == 2
    line = one_error_line(capsys)
    assert "SLURM refused the job array" in line and "invalid partition" in line.lower()
    assert "nothing was submitted" in line
    assert list(tmp_path.iterdir()) == []


def test_a_task_that_can_never_start_is_cancelled_and_named(tmp_path, capsys):
    assert compare_tiny(tmp_path, "--only", "naive", *SLURM, "--slurm-cpus-per-task",
                        "512") == 2
    line = one_error_line(capsys)
    assert "can never start (pending, reason PartitionConfig" in line and "cancelled" in line
    job = next((tmp_path / "slurm").glob("*_submitted.pkl")).name.split("_")[0]
    assert not _active(job)


def test_the_lock_of_an_ended_slurm_job_on_another_node_is_taken_over(tmp_path, capsys):
    def submit(command: str) -> str:
        return subprocess.run(["sbatch", "--parsable", "--output=/dev/null", "--wrap", command],
                              capture_output=True, text=True, check=True).stdout.strip()

    def lock_of(job: str) -> None:
        (tmp_path / LOCK).write_text(json.dumps({"host": "node07", "pid": 4242,
                                                 "slurm_job": job, "slurm_restart": 0}))

    ended, running = submit("true"), submit("sleep 60")
    try:
        _wait_for(lambda: not _active(ended), 30, f"job {ended} to end")
        lock_of(ended)
        claim_folder(tmp_path).release()
        assert "taking over the lock of process 4242 on node07" in capsys.readouterr().out
        _wait_for(lambda: _active(running) == ["RUNNING"], 30, f"job {running} to start")
        lock_of(running)
        with pytest.raises(RuntimeError, match=f"in use by process 4242 on node07, SLURM job "
                                               f"{running}"):
            claim_folder(tmp_path)
    finally:
        subprocess.run(["scancel", running])
