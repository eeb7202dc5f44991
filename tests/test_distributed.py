"""One run on two processes under torchrun (gloo, on the CPU): it trains what one process trains
at the same global batch, rank 0 alone writing; resume works with another number of ranks; a
fault on one rank stops both within seconds; what data parallelism cannot run is refused with
one line. Every torchrun start imports torch and Avalanche in two processes (tens of seconds on
a loaded 2-core machine); test-only faults live in tests/ddp_entry.py."""

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moe_cl.run import experiment
from moe_cl.run.cli import main
from moe_cl.run.config import compose
from moe_cl.run.torchrun import data_parallel_problem
from moe_cl.storage.run_folder import LOCK
from moe_cl.training.ranks import _device_kind

ENTRY = Path(__file__).with_name("ddp_entry.py")
# Batches of 25 of an experience's 128 samples: shards of 12 and 13, and a last batch of 3 split
# 1 + 2, so each rank's loss weight is its share; L_importance and L_s (attentive_ls, routed)
# need the whole batch's gate; the reference train error is summed over the ranks; growth every
# experience; the routed mixture's router takes each experience's statistics.
SETTINGS = ["benchmark=tiny", "train.epochs=2", "train.batch_size=25",
            "regularizer.importance=0.1", "train.reference_train_error=true",
            "logging.interactive=false", "logging.tensorboard=false", "logging.figures=false"]
NOT_COMPARED = {"wall_time_s", "versions", "config", "ranks"}


def torchrun(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         *args], cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        capture_output=True, text=True, timeout=300)


def exit_codes(done: subprocess.CompletedProcess) -> list[int]:
    """The ranks' exit codes, in rank order, from torchrun's report of a failed run."""
    report = re.findall(r"rank\s*: (\d+) \(local_rank: \d+\)\s*exitcode\s*: (-?\d+)",
                        done.stderr)
    return [int(code) for _, code in sorted(report)]


def error_lines(done: subprocess.CompletedProcess) -> list[str]:
    return [line for line in done.stderr.splitlines() if line.startswith("error:")]


def assert_close(a, b, path: str = "results") -> None:
    """Equal structure, numbers equal within float32 rounding of sums in another order."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_close(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and not isinstance(b, bool):
        assert math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6), (path, a, b)
    else:
        assert a == b, (path, a, b)


def assert_same_run(single: Path, ranks: Path) -> None:
    """The results and the trained model of two runs, up to float32 rounding."""
    a, b = (json.loads((folder / "results.json").read_text()) for folder in (single, ranks))
    assert (a["ranks"], b["ranks"]) == (1, 2)
    assert_close({k: v for k, v in a.items() if k not in NOT_COMPARED},
                 {k: v for k, v in b.items() if k not in NOT_COMPARED})
    models = [torch.load(folder / "checkpoint.pt", weights_only=True)["model"]["state_dict"]
              for folder in (single, ranks)]
    assert models[0].keys() == models[1].keys()
    for name, tensor in models[0].items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
            torch.testing.assert_close(models[1][name], tensor, rtol=1e-4, atol=1e-5,
                                       msg=name)


def files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The run of a strategy preset at SETTINGS trained by one process (in this one), once."""
    runs: dict[str, Path] = {}

    def run(strategy: str) -> Path:
        if strategy not in runs:
            out = tmp_path_factory.mktemp("one") / strategy
            assert main([*SETTINGS, f"strategy={strategy}", f"out_dir={out}"]) == 0
            runs[strategy] = out
        return runs[strategy]

    return run


@pytest.mark.parametrize("strategy", ["attentive_ls", "routed"])
def test_two_ranks_train_what_one_process_trains_and_only_rank_0_writes(tmp_path, one_process,
                                                                        strategy):
    runs, states, cwd = tmp_path / "runs", tmp_path / "states", tmp_path / "cwd"
    for folder in (runs, states, cwd):
        folder.mkdir()
    done = torchrun(str(ENTRY), *SETTINGS, f"strategy={strategy}", f"out_dir={runs / 'two'}",
                    cwd=cwd, env={"MOE_CL_TEST_NO_WRITES_UNDER": str(runs),
                                  "MOE_CL_TEST_STATE_DIR": str(states)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "(2 ranks on cpu)" in done.stdout
    assert_same_run(one_process(strategy), runs / "two")
    assert files(runs / "two") == files(one_process(strategy))  # rank 1 fails on a write
    assert list(cwd.iterdir()) == []
    # every tensor of the model (a routed mixture's router statistics too) the same on each rank
    rank0, rank1 = (torch.load(states / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(rank0[name], rank1[name]) for name in rank0
               if isinstance(rank0[name], torch.Tensor))


def test_two_ranks_resume_what_one_process_began(tmp_path, one_process, monkeypatch):
    out = tmp_path / "run"
    evaluate = experiment._evaluate

    def killed_in_the_second_experience(run, evaluating):
        if run.progress.completed == 1:
            raise KeyboardInterrupt
        evaluate(run, evaluating)

    monkeypatch.setattr(experiment, "_evaluate", killed_in_the_second_experience)
    assert main([*SETTINGS, "strategy=attentive_ls", f"out_dir={out}"]) == 130  # Ctrl-C
    monkeypatch.undo()
    assert json.loads((out / "results.json").read_text())["experiences_completed"] == 1
    done = torchrun("-m", "moe_cl.run", f"resume={out}", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resuming at experience 1, epoch 0" in done.stdout
    assert_same_run(one_process("attentive_ls"), out)


@pytest.mark.parametrize(("fault", "codes", "message"), [
    ("nan", [3, 3], "error: loss is nan on rank 1 of 2 at training experience 0, epoch 0, "
                    "iteration 2; no experience had finished"),
    ("error", [1, 1], "error: rank 1 failed (RuntimeError: injected failure); every rank "
                      "stopped"),
])
def test_a_fault_on_one_rank_stops_both_within_seconds(tmp_path, fault, codes, message):
    out = tmp_path / "run"
    done = torchrun(str(ENTRY), *SETTINGS, "strategy=attentive_ls", f"out_dir={out}",
                    cwd=tmp_path, env={"MOE_CL_TEST_FAULT": fault, "MOE_CL_TEST_FAULT_RANK": "1"})
    ended = time.time()
    injected = float(re.search(r"fault injected at ([\d.]+)", done.stdout).group(1))
    assert ended - injected < 15, done.stdout + done.stderr
    assert exit_codes(done) == codes, done.stderr
    assert error_lines(done) == [message], done.stderr
    assert not (out / LOCK).exists()  # rank 0 released the run folder


@pytest.mark.parametrize(("setting", "message"), [
    ("strategy=naive", "error: method=naive cannot run under torchrun: Avalanche's strategies "
                       "neither synchronise the ranks' weights nor reduce their metrics"),
    ("device=cuda", "error: device=cuda but no CUDA device is available"),
])
def test_what_cannot_run_is_one_line_and_exit_2_before_anything_starts(tmp_path, setting,
                                                                        message):
    if setting == "device=cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "run"
    done = torchrun("-m", "moe_cl.run", "benchmark=tiny", setting, f"out_dir={out}",
                    cwd=tmp_path)
    assert exit_codes(done) == [2, 2], done.stderr
    lines = error_lines(done)
    assert len(lines) == 1 and lines[0].startswith(message), done.stderr
    assert not out.exists()


@pytest.mark.parametrize(("overrides", "message"), [
    (["train.fast_data=false"], "train.fast_data=false cannot run under torchrun"),
    (["replay.mem_size=100"], "replay.mem_size > 0 cannot run under torchrun"),
    (["train.batch_size=3"], "train.batch_size=3 is the global batch, split across the 4 ranks"),
    (["strategy=slda"], "method=slda cannot run under torchrun"),
])
def test_settings_data_parallelism_cannot_run(overrides, message):
    problem = data_parallel_problem(compose(["benchmark=tiny", *overrides]), 4)
    assert problem is not None and problem.startswith(message)
    assert data_parallel_problem(compose(["benchmark=tiny", "strategy=routed"]), 4) is None


def test_a_rank_without_its_gpu_is_a_usage_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert _device_kind("cuda", 1) == "cuda"
    assert _device_kind("cpu", 3) == "cpu"
    with pytest.raises(ValueError, match=r"local rank 2 on .* has no GPU of its own \(2 there\); "
                                         r"start at most 2 processes per node"):
        _device_kind("auto", 2)

