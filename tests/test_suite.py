"""The suite commands (compare, reproduce) on bad input: clear one-line errors with
python -m moe_cl.run's exit codes, resumption past broken files, and tables never replaced
by less."""

import csv
import json
from pathlib import Path

import pytest
import torch

from moe_cl.suite import compare, grids, reproduce, schedule, tables
from tests.helpers import one_error_line
from tests.suite_helpers import compare_tiny, table_files


def test_missing_device_is_a_usage_error_naming_the_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert compare_tiny(tmp_path, "--only", "naive", overrides=["device=cuda"]) == 2
    line = one_error_line(capsys)
    assert "naive-class seed 0" in line and "no CUDA device" in line
    assert not (tmp_path / "naive-class").exists()  # nothing was written: nothing left behind
    assert not (tmp_path / "table.md").exists()


def test_nan_loss_stops_the_suite_with_exit_3(tmp_path, capsys):
    assert compare_tiny(tmp_path, "--only", "naive", overrides=["train.lr=1e30"]) == 3
    line = one_error_line(capsys)
    assert "naive-class seed 0" in line and "loss is nan" in line
    assert not (tmp_path / "table.md").exists()


def test_corrupt_checkpoint_is_a_usage_error_naming_the_run(suite_out, capsys):
    before = table_files(suite_out)
    run = suite_out / "naive-class" / "seed-0"
    results = run / "results.json"
    results.write_text(results.read_text().replace('"complete"', '"running"'))
    (run / "checkpoint.pt").write_bytes(b"\x80\x04not a checkpoint")
    assert compare_tiny(suite_out, "--only", "naive") == 2
    line = one_error_line(capsys)
    assert "naive-class seed 0" in line and "corrupt or unsafe" in line
    assert table_files(suite_out) == before


@pytest.mark.parametrize("broken", ['{"status": "compl', ""])
def test_unreadable_results_json_means_the_run_is_done_again(suite_out, capsys, broken):
    """A results.json cut short (a kill between writes) is rebuilt from the checkpoint."""
    results = suite_out / "naive-class" / "seed-0" / "results.json"
    finished = json.loads(results.read_text())
    results.write_text(broken)
    assert compare_tiny(suite_out, "--only", "naive") == 0
    again = json.loads(results.read_text())
    assert again["status"] == "complete"
    assert again["average_accuracy"] == finished["average_accuracy"]
    assert set(json.loads((suite_out / "table.json").read_text())) == {"naive-class",
                                                                      "ewc-class"}


@pytest.mark.parametrize("edited", ["[1, 2]", '{"no status": 1}'])
def test_a_whole_but_edited_results_json_stops_the_suite_in_one_line(suite_out, capsys, edited):
    """JSON that is not a run's results is not rebuilt behind the user's back (issue 25): one
    line naming the file, exit 2, the tables as they were."""
    results = suite_out / "naive-class" / "seed-0" / "results.json"
    results.write_text(edited)
    before = table_files(suite_out)
    assert compare_tiny(suite_out, "--only", "naive") == 2
    line = one_error_line(capsys)
    assert str(results) in line and "not a run's results" in line
    assert results.read_text() == edited and table_files(suite_out) == before


def test_unreadable_results_json_is_not_complete_for_report_only(suite_out, capsys):
    (suite_out / "ewc-class" / "seed-0" / "results.json").write_text('{"status": "comp')
    assert compare_tiny(suite_out, "--report-only") == 0
    assert set(json.loads((suite_out / "table.json").read_text())) == {"naive-class"}


@pytest.mark.parametrize("override, instead", [
    ("seed=7", "--seeds"), ("benchmark=split_mnist", "first argument"),
    ("strategy=naive", "--only"), ("out_dir=elsewhere", "--out"),
    ("resume=true", "resumes by itself"), ("scenario=task", "--scenarios"),
])
def test_overrides_the_suite_controls_are_usage_errors(tmp_path, capsys, override, instead):
    nowhere = f"data.root={tmp_path / 'no-data'}"  # accepted, the override would fail fast
    with pytest.raises(SystemExit) as exit_:
        compare_tiny(tmp_path, "--only", "naive", overrides=[override, nowhere])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert override in err and instead in err
    assert [p.name for p in tmp_path.iterdir()] == []


@pytest.mark.parametrize("override, instead", [("strategy=moe", "--variants"),
                                               ("seed=3", "--seeds")])
def test_reproduce_rejects_overrides_the_suite_controls(tmp_path, capsys, override, instead):
    with pytest.raises(SystemExit) as exit_:
        reproduce.main(["paper_mnist", "--out", str(tmp_path), override,
                        f"data.root={tmp_path / 'no-data'}"])
    assert exit_.value.code == 2
    assert instead in capsys.readouterr().err


def test_unknown_only_is_a_usage_error_listing_the_names(suite_out, capsys):
    before = table_files(suite_out)
    for only in (["bogus"], ["naive", "bogus"]):
        with pytest.raises(SystemExit) as exit_:
            compare_tiny(suite_out, "--only", *only)
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert "--only bogus" in err and "naive, ewc, lwf, replay, joint" in err
    with pytest.raises(SystemExit):  # --only swallows what follows it
        compare_tiny(suite_out, "--only", "naive", "train.epochs=1")
    assert "key=value overrides go before --only" in capsys.readouterr().err
    assert table_files(suite_out) == before


@pytest.mark.parametrize("seeds", ["0", "-1"])
def test_seeds_must_be_positive(suite_out, capsys, seeds):
    before = table_files(suite_out)
    for main, benchmark in ((compare.main, "tiny"), (reproduce.main, "paper_fmnist")):
        with pytest.raises(SystemExit) as exit_:
            main([benchmark, "--seeds", seeds, "--out", str(suite_out)])
        assert exit_.value.code == 2
        assert "--seeds: must be >= 1" in capsys.readouterr().err
    assert table_files(suite_out) == before


def test_report_only_without_finished_runs_is_an_error_and_writes_nothing(tmp_path, capsys):
    (tmp_path / "table.md").write_text("keep me\n")
    for main, benchmark in ((compare.main, "tiny"), (reproduce.main, "paper_fmnist")):
        assert main([benchmark, "--report-only", "--out", str(tmp_path)]) == 2
        assert "no finished runs in" in one_error_line(capsys)
    assert [p.name for p in tmp_path.iterdir()] == ["table.md"]
    assert (tmp_path / "table.md").read_text() == "keep me\n"
    assert compare.main(["tiny", "--report-only", "--out", str(tmp_path / "none")]) == 2
    assert not (tmp_path / "none").exists()


def test_finished_runs_of_another_benchmark_are_refused(suite_out, capsys):
    before = table_files(suite_out)
    assert compare.main(["split_mnist", "--report-only", "--out", str(suite_out)]) == 2
    assert "holds a run of benchmark tiny, not split_mnist" in one_error_line(capsys)
    assert table_files(suite_out) == before


def test_a_subset_run_adds_to_the_table(suite_out, capsys):
    assert compare_tiny(suite_out, "--only", "naive", seeds=2) == 0
    table = json.loads((suite_out / "table.json").read_text())
    assert set(table) == {"naive-class", "ewc-class"}
    assert table["naive-class"]["seeds"] == 2 and table["ewc-class"]["seeds"] == 1
    with open(suite_out / "runs.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted((r["run"], r["seed"]) for r in rows) == [
        ("ewc-class", "0"), ("naive-class", "0"), ("naive-class", "1")]
    text = (suite_out / "table.md").read_text()
    assert "| naive-class | 2 |" in text and "| ewc-class | 1 |" in text
    # Re-tabulating covers every finished run too, whatever --only and --seeds say.
    assert compare_tiny(suite_out, "--report-only", "--only", "joint") == 0
    assert (suite_out / "table.md").read_text() == text


def test_method_specific_overrides_reach_only_the_runs_that_read_them(tmp_path):
    overrides = ["baseline.ewc_lambda=5"]
    assert compare_tiny(tmp_path, "--only", "ewc", "moe-fixed-", overrides=overrides) == 0
    assert "ewc_lambda: 5" in (tmp_path / "ewc-class" / "seed-0" / "config.yaml").read_text()
    assert set(json.loads((tmp_path / "table.json").read_text())) == {"ewc-class",
                                                                     "moe-fixed-class"}


def test_runs_made_with_other_settings_are_refused_not_mixed(suite_out, capsys):
    before = table_files(suite_out)
    assert compare_tiny(suite_out, "--only", "naive", overrides=["train.lr=0.01"]) == 2
    line = one_error_line(capsys)
    assert "naive-class seed 0" in line and "train.lr: 0.001 -> 0.01" in line
    assert table_files(suite_out) == before
    # Where the data lie, how runs log, checkpoint cadence: not settings.
    assert compare_tiny(suite_out, "--only", "naive",
                    overrides=["train.checkpoint_every_epochs=3", "logging.csv=false"]) == 0


def test_committed_paper_runs_made_before_the_reference_train_error_still_count():
    """The paper_* presets now measure the reference's train error, a measurement rather than a
    setting: the committed paper_fmnist runs, made without it, are still runs of the settings
    asked for (read back, not trained again) and simply lack the field."""
    out = Path(__file__).resolve().parents[1] / "results" / "reproduce" / "paper_fmnist"
    config = (out / "moe" / "seed-0" / "config.yaml").read_text()
    assert "reference_train_error" not in config
    said = []
    categories = reproduce.categories()
    schedule.train_runs("paper_fmnist", reproduce.variants("paper_fmnist", categories, grid=False),
                        range(5), out, extra=["data.root=data"], echo=said.append)
    assert len(said) == 45 and all("(done before)" in line for line in said)
    rows = tables.finished_runs("paper_fmnist", reproduce.variants(
        "paper_fmnist", categories, grid=True), out)
    assert len(rows) == 45 and all(r["train_error_reference"] is None for r in rows)


def test_the_compare_table_shows_the_routers_own_error_where_there_is_one():
    entry = {column: (0.5, None) for column in compare.COLUMNS}
    routed = entry | {"seeds": 1, "router_error": (0.1039, 0.002), "collapsed": 0}
    naive = entry | {"seeds": 1, "router_error": None, "H_u": None, "collapsed": None}
    lines = compare.markdown({"routed+pixels-class": routed, "naive-class": naive},
                             "split_fmnist").splitlines()
    head = next(line for line in lines if line.startswith("| strategy"))
    column = head.split(" | ").index("router error")
    assert lines[lines.index(head) + 1].count("---") == len(head.split(" | "))
    assert next(line for line in lines if line.startswith("| routed+pixels-class")).split(
        " | ")[column] == tables.format_mean_std((0.1039, 0.002))
    assert next(line for line in lines if line.startswith("| naive-class")).split(
        " | ")[column] == "-"


@pytest.mark.parametrize("variants, problem", [
    ("not a list", "variants: expected a list, got str"),
    ([{"name": "x-{nope}"}], "variants[0].name: {nope} in 'x-{nope}' is neither an axis"),
    ([{"name": "a", "axes": {"k": {"methods": {"colour": 1}}}}], "unknown keys colour"),
    ([{"name": "same"}, {"name": "same"}], "the run name same comes twice"),
])
def test_a_bad_grid_file_is_one_line_naming_it(monkeypatch, capsys, tmp_path, variants, problem):
    bad = grids.Grid("compare_generic", {"benchmarks": ["tiny"], "variants": variants})
    monkeypatch.setattr(compare, "grid_of", lambda benchmark: bad)
    assert compare.main(["tiny", "--out", str(tmp_path)]) == 2
    line = one_error_line(capsys)
    assert "moe_cl/suite/grids/compare_generic.yaml: " in line and problem in line


def test_a_bad_target_is_named_before_any_run(monkeypatch, capsys, tmp_path):
    data = dict(grids.load("compare_generic").data, targets=[{"check": "best_moe_reaches"}])
    monkeypatch.setattr(compare, "grid_of", lambda benchmark: grids.Grid("compare_tiny", data))
    assert compare.main(["tiny", "--out", str(tmp_path)]) == 2
    line = one_error_line(capsys)
    assert "compare_tiny.yaml: targets[0] (best_moe_reaches): missing a required" in line
    assert not any(tmp_path.iterdir())


def test_a_compare_grid_file_of_a_benchmark_adds_it(monkeypatch):
    monkeypatch.setattr(grids, "names", lambda: ["compare_generic", "compare_split_cifar10"])
    assert compare.benchmarks()[-1] == "split_cifar10"
