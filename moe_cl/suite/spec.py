"""What a suite is made of: its variants, the runs they give (one per variant and seed), how a
run ended, and the error that stops a suite. Shared by the scheduler, the tables and the
grids, so it imports none of them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from moe_cl.errors import USAGE_ERROR


class SuiteError(Exception):
    """A run of the suite failed; ``exit_code`` is what the command returns."""

    def __init__(self, message: str, exit_code: int = USAGE_ERROR) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Variant:
    """One configuration: a run name, the category it reports under, and its arguments."""

    name: str
    argv: tuple[str, ...]
    category: str = ""
    hyperparameters: dict = field(default_factory=dict, compare=False, hash=False)
    # A variant whose finished run of the same seed is distilled instead of training anew.
    teacher: str = ""

    @property
    def group(self) -> str:
        return self.category or self.name


@dataclass(frozen=True)
class RunSpec:
    """One run of a suite, all a process needs to bring it to its end
    (:func:`moe_cl.suite.schedule.finish_run`)."""

    benchmark: str
    variant: Variant
    seed: int
    out: Path
    extra: tuple[str, ...] = ()  # the suite-wide overrides
    device: str | None = None  # a GPU given by --jobs (replaces device=)
    threads: int | None = None  # torch threads; None leaves torch's default

    @property
    def folder(self) -> Path:
        return folder_of(self.out, self.variant.name, self.seed)

    @property
    def label(self) -> str:
        return f"run {self.variant.name} seed {self.seed} ({self.folder})"

    @property
    def key(self) -> tuple[str, int]:
        return self.variant.name, self.seed

    @property
    def teacher_key(self) -> tuple[str, int]:
        return self.variant.teacher, self.seed


@dataclass(frozen=True)
class Outcome:
    """How a run ended: its finished results, or an exit code and the error line."""

    results: dict | None = None
    done_before: bool = False
    wall_time_s: float = 0.0  # spent on it by this call
    exit_code: int = 0
    error: str = ""


def folder_of(out: Path, run: str, seed: int) -> Path:
    """The folder of the run named ``run`` with ``seed`` in the suite folder ``out``."""
    return out / run / f"seed-{seed}"


def check_benchmark(results: dict, benchmark: str, folder: Path) -> None:
    """A finished run found in a suite folder must be of the suite's benchmark."""
    if results.get("benchmark", benchmark) != benchmark:
        raise SuiteError(f"{folder} holds a run of benchmark {results['benchmark']}, not "
                         f"{benchmark}; choose another --out")
