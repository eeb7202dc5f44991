"""The command line: ``python -m moe_cl.bench [--quick | --tiny] [--repeats N] [--json PATH]
[--only NAME ...]``.

Arguments are parsed and checked before anything heavy is imported: ``--help`` and errors in
the arguments load neither torch nor Avalanche (only ``--device cuda`` on a machine without one
needs torch to be found out), and a section's module is imported only when it runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from moe_cl.bench.registry import DEFAULT_SECTIONS, SECTIONS
from moe_cl.bench.settings import GPU_VARIANTS, PRESETS, PROG, Options, sizes_for
from moe_cl.storage.run_folder import folder_problem

DESCRIPTION = "Side-by-side speed and memory measurements of moe-cl's hot paths."
PRESET_OPTIONS = {  # the presets with an option of their own ("full" is the default)
    "quick": "smaller sizes and fewer repeats (under a minute on 2 cores)",
    "tiny": "minimal sizes, one repeat (for tests)",
}


def json_path_problem(path: Path) -> str | None:
    """Why the results could not be written to ``path`` (None: they can)."""
    if path.is_dir():
        return "is a folder; give the path of a JSON file"
    return folder_problem(path.absolute().parent, writable=True)


def _sections_help() -> str:
    width = max(map(len, SECTIONS))
    lines = [f"  {name:<{width}}  {entry.description}" for name, entry in SECTIONS.items()]
    return "sections:\n" + "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The checked arguments, with ``sizes`` (the preset's, overridden by the options) and
    ``options`` (what sections read) added."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=_sections_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    size = p.add_mutually_exclusive_group()
    for preset, what in PRESET_OPTIONS.items():
        size.add_argument(f"--{preset}", action="store_const", dest="preset", const=preset,
                          help=what)
    size.add_argument("--preset", choices=sorted(PRESETS), help=argparse.SUPPRESS)
    p.add_argument("--repeats", type=int, help="timed repeats per measurement (median reported)")
    p.add_argument("--json", type=Path, default=Path("bench_results.json"),
                   help="where to write the results (default: bench_results.json)")
    skipped = ", ".join(name for name in SECTIONS if name not in DEFAULT_SECTIONS)
    p.add_argument("--only", nargs="+", choices=tuple(SECTIONS), metavar="NAME",
                   help=f"sections to run, among {', '.join(SECTIONS)} (default: all but "
                   f"{skipped})")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--data-root", type=Path, default=Path("data"),
                   help="where data sets are (or are prepared); default: data")
    p.add_argument("--synthetic", action="store_true",
                   help="use synthetic tensors even where real data are present")
    p.add_argument("--gpu-epochs", type=int, help="epochs of paper_fmnist in the gpu section")
    p.add_argument("--gpu-cifar-epochs", type=int,
                   help="epochs of paper_cifar100 in the gpu section (default 1)")
    p.add_argument("--gpu-variants", nargs="+", choices=GPU_VARIANTS, default=["fp32"],
                   metavar="VARIANT", help=f"what the gpu section trains with, each in turn, "
                   f"among {', '.join(GPU_VARIANTS)} (train.precision, +compile: "
                   "train.compile; default fp32)")
    p.add_argument("--epoch-batch", type=int,
                   help="mini-batch of the epoch section (default 512, the paper's); smaller "
                   "batches weigh per-iteration overheads more")
    p.add_argument("--threads", type=int,
                   help="torch intra-op threads (default: torch's own default, left alone)")
    p.add_argument("--child", help=argparse.SUPPRESS)  # one memory case, in a fresh process
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.preset = args.preset or "full"
    for option in ("repeats", "threads", "epoch_batch", "gpu_epochs", "gpu_cifar_epochs"):
        value = getattr(args, option)
        if value is not None and value < 1:
            p.error(f"--{option.replace('_', '-')} must be >= 1, got {value}")
    if not args.child:
        problem = json_path_problem(args.json)
        if problem:
            p.error(f"--json {args.json}: {problem}")
    args.sizes = sizes_for(args.preset, repeats=args.repeats, gpu_epochs=args.gpu_epochs,
                           gpu_cifar_epochs=args.gpu_cifar_epochs, epoch_batch=args.epoch_batch)
    args.options = Options(preset=args.preset, data_root=args.data_root, synthetic=args.synthetic,
                           gpu_variants=tuple(dict.fromkeys(args.gpu_variants)))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from moe_cl.bench import runner  # lazy: torch, Avalanche and sections once args are valid

    return runner.main(args)


if __name__ == "__main__":
    raise SystemExit(main())
