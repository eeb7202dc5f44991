"""What ``python -m moe_cl.bench`` does once its arguments are valid: run the chosen sections,
printing each one's report as it completes, and write the results whole to ``--json``.

The command line imports this module (and with it torch) only after parsing, so that ``--help``
and usage errors stay light.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from typing import Any

import torch

from moe_cl.bench import memory, registry, report
from moe_cl.bench.harness import timed_section
from moe_cl.bench.settings import PROG
from moe_cl.errors import USAGE_ERROR
from moe_cl.run.builders import resolve_device as resolve
from moe_cl.storage.run_folder import write_json


def resolve_device(name: str) -> torch.device:
    """The run command's device rule, as a usage error (exit status 2) of this command."""
    try:
        return resolve(name)
    except ValueError as err:
        print(f"{PROG}: error: --device {name}: {err}", file=sys.stderr, flush=True)
        raise SystemExit(USAGE_ERROR) from None


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Run the chosen sections, printing each table as it completes; return the results.
    ``args`` are those ``moe_cl.bench.__main__.parse_args`` returns."""
    device = resolve_device(args.device)
    sizes, options = args.sizes, args.options
    result = report.start(device, command=" ".join([PROG, *args.argv]), preset=args.preset,
                          sizes=sizes)
    start = time.perf_counter()
    for name in dict.fromkeys(args.only or registry.DEFAULT_SECTIONS):
        section = registry.load(name)
        results = timed_section(functools.partial(section.run, sizes, device, options))
        result["sections"][name] = results
        print(report.format_section(name, results, section), flush=True)
    report.finish(result, time.perf_counter() - start)
    return result


def main(args: argparse.Namespace) -> int:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.child:  # one memory case, in this fresh process
        res = memory.measure_here(args.child, args.sizes, resolve_device(args.device),
                                  args.options)
        print(json.dumps(res), flush=True)
        return 0
    result = run_bench(args)
    write_json(args.json, result)  # whole or not at all
    print(report.summary_line(result, args.json))
    return 0
