"""``python -m moe_cl.bench`` runs end to end on tiny sizes and reports what it measured.

Timings here are only checked for being positive: on a shared 2-core machine nothing more is
stable. The comparisons themselves (same weights, same L_s value, same samples per epoch) are
checked exactly, since a benchmark comparing unequal work would be meaningless.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moe_cl.bench.__main__ as cli
from moe_cl.bench import epoch, gpu, registry, report, runner, settings, training
from moe_cl.core.layouts import LAYOUTS
from moe_cl.training import precision
from moe_cl.training.plugins import ReferenceTrainError

TIMED_SECTIONS = ("bank", "ls", "epoch", "router", "topk")
DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Other jobs on a 2-core machine make two intra-op threads crawl; tests need no speed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_tiny(out: Path, *only: str) -> dict:
    """The tiny bench on the CPU; ``only``: the sections (and further options after them)."""
    args = ["--tiny", "--synthetic", "--device", "cpu", "--json", str(out / "bench.json"),
            "--data-root", str(out / "data")]
    assert cli.main(args + (["--only", *only] if only else [])) == 0
    return json.loads((out / "bench.json").read_text())


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory, one_thread) -> dict:
    return run_tiny(tmp_path_factory.mktemp("bench"))


def test_json_has_machine_info_and_every_section(tiny_results):
    machine = tiny_results["machine"]
    for key in ("date", "cpu_count", "cpu_model", "torch_threads", "torch", "avalanche", "device"):
        assert machine[key] not in (None, ""), key
    assert machine["device"] == "cpu"
    assert tiny_results["preset"] == "tiny"
    assert set(tiny_results["sections"]) == set(registry.DEFAULT_SECTIONS)


def _keys(results: dict) -> dict[str, set]:
    """The keys of each kind of record in a results file (its format, not its values)."""
    sections = results["sections"]
    out = {"top": set(results), "machine": set(results["machine"])}
    for name, section in sections.items():
        out[name] = set(section)
        for kind in ("rows", "targets"):
            for record in section[kind]:
                out[f"{name} {kind}"] = set(record)
    if "epoch" in sections:
        out["epoch info"] = set(sections["epoch"]["info"])
    if "memory" in sections:
        out["memory results"] = {k for r in sections["memory"]["info"]["results"] for k in r}
    return out


@pytest.mark.parametrize("committed", sorted(DOCS.glob("bench_cpu*.json")), ids=lambda p: p.name)
def test_results_keep_the_format_of_the_committed_measurements(tiny_results, committed):
    old = _keys(json.loads(committed.read_text()))
    new = _keys(tiny_results)
    assert old, committed
    for kind in old.keys() & new.keys():
        assert new[kind] == old[kind], kind


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
    assert set(per_variant) == set(epoch.EPOCH_VARIANTS)
    for counts in per_variant.values():
        assert counts and all(c == info["samples"] for c in counts)


def test_each_section_prints_its_own_report(tiny_results):
    for name, results in tiny_results["sections"].items():
        text = report.format_section(name, results, registry.load(name))
        assert text.startswith(f"[{name}] {results['title']}\n")
        assert f"({results['wall_s']:.1f} s" in text
    memory = tiny_results["sections"]["memory"]
    text = report.format_section("memory", memory, registry.load("memory"))
    assert "bank/mnist/bank" in text and " MB   peak " in text
    assert "WARNING" not in text  # memory is not a timing
    ls = tiny_results["sections"]["ls"]
    text = report.format_section("ls", ls, registry.load("ls"))
    assert "L_s B=16 M=20: {'max_rel_diff': " in text and "target G G^T vs double loop" in text


def test_gpu_section_runs_anywhere_in_each_variant(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)  # emulated where not
    section = run_tiny(tmp_path, "gpu", "--gpu-variants", "fp32", "bf16")["sections"]["gpu"]
    assert set(section["info"]) == {f"{name} {variant}" for name in ("paper_fmnist",
                                                                     "paper_cifar100")
                                    for variant in ("fp32", "bf16")}
    for res in section["info"].values():
        assert res["samples_per_epoch"] > 0 and 0 <= res["test_accuracy"] <= 1
    assert len(section["rows"]) == 8 and all(row["median_s"] > 0 for row in section["rows"])
    assert [t["target"] for t in section["targets"]] == [
        "paper_cifar100 bf16 / fp32 samples per second, epoch (median)"]
    assert "paper_fmnist bf16: test accuracy 0." in capsys.readouterr().out


def test_gpu_variants_name_a_precision_and_compilation():
    assert gpu.variant_options("bf16+compile") == {"precision": "bf16", "compile_model": True}
    assert gpu.variant_options("tf32") == {"precision": "tf32", "compile_model": False}
    assert cli.parse_args([]).options.gpu_variants == ("fp32",)
    with pytest.raises(SystemExit):
        cli.parse_args(["--gpu-variants", "fp16"])


def test_plain_loop_and_strategy_epochs_see_the_same_samples():
    # 300 samples, batch 128: two full batches and a partial one.
    experience = training.synthetic_benchmark(300, 20, (1, 28, 28), 10).train_stream[0]
    cpu = torch.device("cpu")
    plain = epoch.run_plain_loop(experience, epochs=1, batch=128, device=cpu)
    strategy_class, options = epoch.STRATEGIES[epoch.FAST]
    fast = epoch.run_strategy(strategy_class, experience, epochs=1, batch=128, device=cpu,
                              **options)
    assert plain.samples == fast.samples == [300]
    assert len(plain.epoch_s) == len(fast.epoch_s) == 1


def test_epoch_section_prices_the_reference_train_error(tiny_results):
    """The fast path with ReferenceTrainError runs beside the one without it, in every row of
    the epoch section, and its cost is a target (timings unchecked here: shared machine)."""
    section = tiny_results["sections"]["epoch"]
    for case in {row["case"] for row in section["rows"] if not row["case"].startswith("gather")}:
        variants = {row["variant"] for row in section["rows"] if row["case"] == case}
        assert {epoch.FAST, epoch.MEASURED} <= variants, case
    cost = [t for t in section["targets"] if "reference train error" in t["target"]]
    assert len(cost) == 1 and cost[0]["kind"] == "<=" and cost[0]["value"] > 0


def test_the_priced_variant_measures_the_reference_train_error(monkeypatch):
    made = []

    def measurement():
        made.append(ReferenceTrainError())
        return made[-1]

    strategy_class, options = epoch.STRATEGIES[epoch.MEASURED]
    assert options["plugins"] == (ReferenceTrainError,)
    monkeypatch.setitem(epoch.STRATEGIES, epoch.MEASURED,
                        (strategy_class, {**options, "plugins": (measurement,)}))
    experience = training.synthetic_benchmark(100, 20, (1, 28, 28), 10).train_stream[0]
    run = epoch.epoch_runner(epoch.MEASURED, experience, settings.PRESETS["tiny"],
                             torch.device("cpu"), 1)()
    assert run.samples == [100]
    assert len(made) == 1 and 0 <= made[0].last_epoch_error <= 1


def test_each_mixture_runs_with_todays_and_the_baseline_step(tiny_results):
    section = tiny_results["sections"]["epoch"]
    variants = {row["variant"] for row in section["rows"]}
    for today, baseline in epoch.STEPS.values():
        assert {today, baseline} <= variants
    steps = [t for t in section["targets"] if t["target"].startswith("baseline step")]
    assert len(steps) == len(epoch.STEPS)
    assert all(t["kind"] == ">=" and t["threshold"] == 1.25 for t in steps)


def test_only_the_baseline_step_trains_a_model_in_the_baseline_layouts(monkeypatch):
    trained = []

    def recorded(strategy, *args):
        trained.append({m.layouts for m in strategy.model.modules() if hasattr(m, "layouts")})
        return real_train(strategy, *args)

    real_train = epoch.timed_train
    monkeypatch.setattr(epoch, "timed_train", recorded)
    experience = training.synthetic_benchmark(100, 20, (1, 28, 28), 10).train_stream[0]
    for variant in (epoch.FAST, epoch.BASELINE):
        run = epoch.epoch_runner(variant, experience, settings.PRESETS["tiny"],
                                 torch.device("cpu"), 1)()
        assert run.samples == [100]
    assert trained == [{LAYOUTS}, {epoch.BASELINE_LAYOUTS}]


def test_router_section_prices_the_update_and_the_routed_evaluation(tiny_results):
    section = tiny_results["sections"]["router"]
    rows = {row["variant"]: row for row in section["rows"]}
    assert len(rows["training epoch"]["samples_s"]) == 2 * 2  # 2 experiences x 2 epochs
    assert len(rows["router update (after each experience)"]["samples_s"]) == 2
    assert 0 < rows["router's part of that evaluation"]["median_s"] <= rows[
        "evaluation of their test data"]["median_s"]
    info = section["info"]
    # counts and means of 10 classes and the shared scatter of 96 x 6 x 6 features, float64
    assert info["router_features"] == 3456
    assert info["statistics_bytes"] == 8 * (10 + 10 * 3456 + 3456**2)
    [update] = section["targets"]
    assert update["kind"] == "<=" and update["value"] > 1


def test_every_registered_section_is_a_module_with_a_section():
    for name in registry.SECTIONS:
        section = registry.load(name)
        assert isinstance(section, registry.Section) and callable(section.run), name
    assert registry.DEFAULT_SECTIONS == ("bank", "layers", "ls", "epoch", "router", "topk",
                                         "memory")


def test_cli_options():
    args = cli.parse_args(["--quick", "--only", "bank", "ls", "--repeats", "2"])
    assert args.preset == "quick" and args.only == ["bank", "ls"] and args.sizes.repeats == 2
    assert args.options.preset == "quick" and not args.options.synthetic
    assert cli.parse_args([]).preset == "full"
    assert cli.parse_args(["--epoch-batch", "128"]).sizes.epoch_batch == 128
    for wrong in (["--quick", "--tiny"], ["--epoch-batch", "0"], ["--only", "nothing"]):
        with pytest.raises(SystemExit):
            cli.parse_args(wrong)


# ------------------------------------------------------------------------------ light start


@pytest.mark.parametrize("argv", [["--help"], ["--repeats", "0"], ["--only", "nothing"]])
def test_help_and_usage_errors_import_neither_avalanche_nor_torch(argv):
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['moe_cl.bench', *{argv!r}]\n"
        "try:\n"
        "    runpy.run_module('moe_cl.bench', run_name='__main__', alter_sys=True)\n"
        "except SystemExit as exit:\n"
        "    print('exit', exit.code)\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'avalanche', 'torch'}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, cwd=Path(__file__).resolve().parents[1])
    *_, status, loaded = proc.stdout.strip().splitlines()
    assert status == ("exit 0" if argv == ["--help"] else "exit 2")
    assert loaded == "[]"


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "option", ["--gpu-epochs=-1", "--gpu-epochs=0", "--repeats=0", "--threads=0",
               "--epoch-batch=-2"]
)
def test_numeric_options_must_be_positive(option, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.parse_args([option])
    assert exc.value.code == 2
    assert option.split("=")[0] + " must be >= 1" in capsys.readouterr().err


def test_json_path_is_checked_before_measuring(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for wrong in (tmp_path, a_file / "results.json", a_file / "sub" / "results.json"):
        with pytest.raises(SystemExit) as exc:
            cli.parse_args(["--json", str(wrong)])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert f"--json {wrong}: " in err and ("is a folder" in err or "not a folder" in err)
    # A folder still to be created is fine, and the check leaves nothing behind.
    args = cli.parse_args(["--json", str(tmp_path / "new" / "deeper" / "results.json")])
    assert args.json.name == "results.json" and not (tmp_path / "new").exists()
    (tmp_path / "locked").mkdir(mode=0o500)
    if not os.access(tmp_path / "locked", os.W_OK):  # root may write anyway
        with pytest.raises(SystemExit):
            cli.parse_args(["--json", str(tmp_path / "locked" / "results.json")])


def test_results_are_written_whole(tmp_path, monkeypatch):
    result = {"machine": {"date": "today", "cpu_model": "cpu", "cpu_count": 1,
                          "torch_threads": 1, "device": "cpu"}, "elapsed_s": 1.0}
    monkeypatch.setattr(runner, "run_bench", lambda args: result)
    path = tmp_path / "new" / "results.json"
    assert cli.main(["--json", str(path)]) == 0
    assert json.loads(path.read_text()) == result
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # no temporary left


def test_missing_cuda_is_a_usage_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = tmp_path / "results.json"
    with pytest.raises(SystemExit) as exc:
        cli.main(["--tiny", "--only", "ls", "--device", "cuda", "--json", str(path)])
    assert exc.value.code == 2
    assert "--device cuda: " in capsys.readouterr().err and not path.exists()
