"""The lazy start: --help and every usage error the configuration detects run without torch
or Avalanche (issue 16: about a second instead of ten). Times are measured by hand
(docs/performance.md); these tests check what makes them short: what gets imported."""

import subprocess
import sys
from pathlib import Path

from moe_cl.data.names import BENCHMARK_NAMES, FILE_DATASETS, GENERATED_DATASETS

ROOT = Path(__file__).resolve().parents[1]
HEAVY = "print(sorted({m.split('.')[0] for m in sys.modules} & {'avalanche', 'torch'}))"
# Usage errors the configuration finds, each one kind of mistake.
BAD_COMMANDS = [
    ["benchmark=nope"],
    ["strategy=nope"],
    ["train.epochz=1"],
    ["model.gate=linear"],
    ["train.precision=fp16"],
    ["train.epochs=-1"],
    ["train.epochs=1", "train.epochs=2"],
    ["notakeyvalue"],
    ["train=3"],
    ["strategy=naive", "regularizer.importance=1"],
    ["strategy=naive", "train.precision=bf16"],
    ["benchmark=paper_fmnist", "data.n_experiences=5"],
    ["benchmark=tiny", "seed=-1"],
]


def _loaded_after(code: str) -> tuple[list[str], list[str]]:
    """(stdout lines before the last, heavy packages imported) of ``code`` in a fresh process."""
    done = subprocess.run([sys.executable, "-c", f"import sys\n{code}\n{HEAVY}"],
                          capture_output=True, text=True, check=True, cwd=ROOT)
    *lines, loaded = done.stdout.strip().splitlines()
    return lines, eval(loaded)


def test_help_imports_neither_torch_nor_avalanche():
    lines, loaded = _loaded_after("from moe_cl.run.cli import main\nmain(['--help'])")
    assert lines[0].startswith("usage: python -m moe_cl.run")
    assert any("train.precision=fp32|tf32|bf16" in line for line in lines)
    assert loaded == []


def test_usage_errors_import_neither_torch_nor_avalanche():
    code = ("from moe_cl.run.cli import main\n"
            f"for argv in {BAD_COMMANDS!r}:\n"
            "    print(main(argv))")
    codes, loaded = _loaded_after(code)
    assert codes == ["2"] * len(BAD_COMMANDS)
    assert loaded == []


def test_the_core_imports_without_avalanche():
    modules = ", ".join(f"moe_cl.core.{name}" for name in (
        "bank", "gates", "mixture", "losses", "metrics", "zoo", "router", "experience_routing"))
    _, loaded = _loaded_after(f"import moe_cl.core, {modules}")
    assert loaded == ["torch"]


def test_benchmark_names_follow_the_data_set_table():
    from moe_cl.data.datasets import DATASETS
    from moe_cl.data.streams import BENCHMARK_NAMES as built

    assert built is BENCHMARK_NAMES
    assert FILE_DATASETS == tuple(n for n, spec in DATASETS.items() if spec.folder is not None)
    assert GENERATED_DATASETS == tuple(n for n, spec in DATASETS.items() if spec.folder is None)


def test_a_precision_the_device_lacks_is_refused_before_avalanche_loads(tmp_path):
    out = tmp_path / "run"
    lines, loaded = _loaded_after(
        "from moe_cl.run.cli import main\n"
        f"print(main(['benchmark=tiny', 'device=cpu', 'train.precision=tf32', 'out_dir={out}']))")
    assert lines == ["2"]
    assert loaded == ["torch"]
    assert not out.exists()
