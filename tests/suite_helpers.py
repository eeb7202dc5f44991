"""What the suite tests share: a compare call on the tiny benchmark and the table files (the
finished suite folders they start from are fixtures: conftest.py)."""

from pathlib import Path

from moe_cl.suite import compare

FAST = ("train.epochs=1", "logging.figures=false")


def compare_tiny(out: Path, *options: str, overrides=(), seeds: int = 1) -> int:
    """python -m moe_cl.compare tiny, one epoch, class-incremental runs, into ``out``."""
    return compare.main(["tiny", *FAST, *overrides, "--seeds", str(seeds), "--scenarios",
                         "class", "--out", str(out), *options])


def table_files(out: Path) -> dict:
    return {name: (out / name).read_text() for name in ("table.md", "table.json", "runs.csv")}
