"""The bench's report: the JSON's header and footer, and the printed table of each section.

A section prints its ``info`` its own way (``Section.info_lines``); everything else (rows,
targets, notes, wall time and other processes' load) is printed alike for every section.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from moe_cl.bench.registry import Section
from moe_cl.bench.settings import Sizes
from moe_cl.storage.environment import machine_info

BUSY_MACHINE = 0.1  # share of the CPUs used by other processes above which timings are suspect


def start(device: torch.device, *, command: str, preset: str, sizes: Sizes) -> dict[str, Any]:
    """The results of a run before its sections: machine, command and sizes."""
    accelerator = None
    if device.type == "cuda":
        accelerator = {
            "cuda_device": torch.cuda.get_device_name(device),
            "cuda_version": torch.version.cuda,
        }
    machine = machine_info(
        device=str(device),
        torch_version=torch.__version__,
        torch_threads=torch.get_num_threads(),
        accelerator=accelerator,
    )
    return {
        "machine": machine,
        "command": command,
        "preset": preset,
        "sizes": asdict(sizes),
        "sections": {},
    }


def finish(result: dict[str, Any], elapsed_s: float) -> None:
    result["elapsed_s"] = elapsed_s
    result["machine"]["load_average_end"] = list(os.getloadavg())


def summary_line(result: dict[str, Any], json_path: Path) -> str:
    m = result["machine"]
    return (
        f"{m['date']}  {m['cpu_model']}  cpus={m['cpu_count']}  torch threads="
        f"{m['torch_threads']}  device={m['device']}  total {result['elapsed_s']:.0f} s"
        f"  -> {json_path}"
    )


def key_value_lines(info: dict[str, Any]) -> list[str]:
    """``info`` as one ``key: value`` line per entry (the usual ``Section.info_lines``)."""
    return [f"  {key}: {value}" for key, value in info.items()]


def format_section(name: str, results: dict[str, Any], section: Section) -> str:
    """The printed report of one section's results."""
    lines = [
        f"[{name}] {results['title']}",
        *_rows_table(results["rows"]),
        *section.info_lines(results["info"]),
        *(_target_line(t) for t in results["targets"]),
        *(f"  note: {note}" for note in results["notes"]),
    ]
    others = results.get("cpu_share_of_other_processes")
    tail = f"  ({results.get('wall_s', 0):.1f} s"
    if others is not None:
        tail += f"; other processes used {others:.0%} of the CPUs meanwhile"
        if others > BUSY_MACHINE and section.timings:
            tail += ": WARNING, shared machine, timings unreliable"
    return "\n".join([*lines, tail + ")", ""])


def _fmt_ms(seconds: float) -> str:
    ms = seconds * 1000
    return f"{ms:,.1f}" if ms < 10_000 else f"{ms:,.0f}"


def _rows_table(rows: list[dict[str, Any]]) -> list[str]:
    """Rows under a header; a case is named once, on its first row."""
    if not rows:
        return []
    width_case = max(len(r["case"]) for r in rows)
    width_var = max(len(r["variant"]) for r in rows)
    head = (
        f"  {'case':<{width_case}}  {'variant':<{width_var}}  {'median ms':>10}  "
        f"{'min ms':>10}  {'vs base':>8}  note"
    )
    lines = [head, "  " + "-" * (len(head) - 2)]
    last_case = None
    for r in rows:
        case = r["case"] if r["case"] != last_case else ""
        last_case = r["case"]
        ratio = "" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        lines.append(
            f"  {case:<{width_case}}  {r['variant']:<{width_var}}  "
            f"{_fmt_ms(r['median_s']):>10}  {_fmt_ms(r['min_s']):>10}  {ratio:>8}  "
            f"{r['note']}".rstrip()
        )
    return lines


def _target_line(t: dict[str, Any]) -> str:
    verdict = "MET" if t["met"] else "NOT MET"
    return (
        f"  target {t['target']}: {t['value']:.2f} (want {t['kind']} {t['threshold']}) {verdict}"
    )
