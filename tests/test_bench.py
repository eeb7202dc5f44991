"""``python -m moe_cl.bench`` runs end to end on tiny sizes and reports what it measured.

Timings here are only checked for being positive: on a shared 2-core machine nothing more is
stable. The comparisons themselves (same weights, same L_s value, same samples per epoch) are
checked exactly, since a benchmark comparing unequal work would be meaningless.
"""

import json
import os

import pytest
import torch

from moe_cl import bench

TIMED_SECTIONS = ("bank", "ls", "epoch", "topk")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Other jobs on a 2-core machine make two intra-op threads crawl; tests need no speed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory, one_thread) -> dict:
    out = tmp_path_factory.mktemp("bench")
    code = bench.main(
        [
            "--tiny",
            "--synthetic",
            "--device",
            "cpu",
            "--json",
            str(out / "bench.json"),
            "--data-root",
            str(out / "data"),
        ]
    )
    assert code == 0
    return json.loads((out / "bench.json").read_text())


def test_json_has_machine_info_and_every_section(tiny_results):
    machine = tiny_results["machine"]
    for key in ("date", "cpu_count", "cpu_model", "torch_threads", "torch", "avalanche", "device"):
        assert machine[key] not in (None, ""), key
    assert machine["device"] == "cpu"
    assert tiny_results["preset"] == "tiny"
    assert set(tiny_results["sections"]) == set(bench.DEFAULT_SECTIONS)


@pytest.mark.parametrize("name", TIMED_SECTIONS)
def test_timed_sections_have_positive_timings_and_targets(tiny_results, name):
    section = tiny_results["sections"][name]
    assert section["rows"]
    for row in section["rows"]:
        assert row["median_s"] > 0 and row["min_s"] > 0
        assert all(t > 0 for t in row["samples_s"])
        assert row["speedup"] is None or row["speedup"] > 0
    assert section["targets"]
    for t in section["targets"]:
        assert isinstance(t["met"], bool) and t["value"] > 0


def test_compared_variants_do_the_same_work(tiny_results):
    sections = tiny_results["sections"]
    for info in sections["bank"]["info"].values():
        assert info["max_abs_diff_bank_vs_loop"] < 1e-4
    for info in sections["ls"]["info"].values():
        assert info["max_rel_diff"] < 1e-4


def test_layers_section_compares_identical_networks_and_every_convolution(tiny_results):
    section = tiny_results["sections"]["layers"]
    assert set(section["info"]) == {"mnist mixture B=16", "fmnist mixture B=16",
                                    "cifar100 mixture B=8"}
    for info in section["info"].values():
        assert info == {"layer_order_differs": True, "outputs_and_gradients_identical": True}
    convs = {row["case"] for row in section["rows"] if " conv " in row["case"]}
    assert len(convs) == 4
    assert all(row["median_s"] > 0 and row["speedup"] > 0 for row in section["rows"])


def test_memory_section_reports_a_peak_per_case(tiny_results):
    results = tiny_results["sections"]["memory"]["info"]["results"]
    assert results
    for res in results:
        assert "error" not in res, res
        assert res["peak_mb"] > 0 and res["extra_mb"] >= 0


def test_every_epoch_variant_sees_the_same_samples(tiny_results):
    info = tiny_results["sections"]["epoch"]["info"]
    per_variant = info["samples_per_epoch"]
    assert set(per_variant) == set(bench.EPOCH_VARIANTS)
    for counts in per_variant.values():
        assert counts and all(c == info["samples"] for c in counts)


def test_plain_loop_and_strategy_epochs_see_the_same_samples():
    # 300 samples, batch 128: two full batches and a partial one.
    experience = bench.synthetic_benchmark(300, 20, (1, 28, 28), 10).train_stream[0]
    cpu = torch.device("cpu")
    plain = bench.run_plain_loop(experience, epochs=1, batch=128, device=cpu)
    fast = bench.run_moe_strategy(experience, epochs=1, batch=128, device=cpu, fast_data=True)
    assert plain.samples == fast.samples == [300]
    assert len(plain.epoch_s) == len(fast.epoch_s) == 1


def test_cli_options():
    args = bench.parse_args(["--quick", "--only", "bank", "ls", "--repeats", "2"])
    sizes = bench.sizes_for(args)
    assert args.preset == "quick" and args.only == ["bank", "ls"] and sizes.repeats == 2
    assert bench.parse_args([]).preset == "full"
    assert bench.sizes_for(bench.parse_args(["--epoch-batch", "128"])).epoch_batch == 128
    for wrong in (["--quick", "--tiny"], ["--epoch-batch", "0"]):
        with pytest.raises(SystemExit):
            bench.parse_args(wrong)


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "option", ["--gpu-epochs=-1", "--gpu-epochs=0", "--repeats=0", "--threads=0",
               "--epoch-batch=-2"]
)
def test_numeric_options_must_be_positive(option, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.parse_args([option])
    assert exc.value.code == 2
    assert option.split("=")[0] + " must be >= 1" in capsys.readouterr().err


def test_json_path_is_checked_before_measuring(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for wrong in (tmp_path, a_file / "results.json", a_file / "sub" / "results.json"):
        with pytest.raises(SystemExit) as exc:
            bench.parse_args(["--json", str(wrong)])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert f"--json {wrong}: " in err and ("is a folder" in err or "not a folder" in err)
    # A folder still to be created is fine, and the check leaves nothing behind.
    args = bench.parse_args(["--json", str(tmp_path / "new" / "deeper" / "results.json")])
    assert args.json.name == "results.json" and not (tmp_path / "new").exists()
    (tmp_path / "locked").mkdir(mode=0o500)
    if not os.access(tmp_path / "locked", os.W_OK):  # root may write anyway
        with pytest.raises(SystemExit):
            bench.parse_args(["--json", str(tmp_path / "locked" / "results.json")])


def test_results_are_written_whole(tmp_path, monkeypatch):
    result = {"machine": {"date": "today", "cpu_model": "cpu", "cpu_count": 1,
                          "torch_threads": 1, "device": "cpu"}, "elapsed_s": 1.0}
    monkeypatch.setattr(bench, "run_bench", lambda args: result)
    path = tmp_path / "new" / "results.json"
    assert bench.main(["--json", str(path)]) == 0
    assert json.loads(path.read_text()) == result
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # no temporary left


def test_missing_cuda_is_a_usage_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = tmp_path / "results.json"
    with pytest.raises(SystemExit) as exc:
        bench.main(["--tiny", "--only", "ls", "--device", "cuda", "--json", str(path)])
    assert exc.value.code == 2
    assert "--device cuda: " in capsys.readouterr().err and not path.exists()
