"""``python -m moe_cl.run benchmark=NAME strategy=NAME [key=value ...]``: one experiment.

Exit codes: 0 done; 2 usage error (unknown preset or key, wrong type or value, missing or
corrupt data, unusable checkpoint, a run folder in use by another process); 3 training stopped
on a NaN or infinite loss; 4 no space left to write a file (the previous one is kept: free
space, then continue as the error line says); 130 Ctrl-C, 143 SIGTERM (what schedulers send):
one line saying where the run stopped and how to continue it, the folder's lock released.

Under ``torchrun --nproc_per_node=N -m moe_cl.run ...`` the N processes train one run
together (moe_cl.training.ranks): rank 0 claims and writes the run folder and prints; the others
follow it, write nothing and end with its exit code.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from moe_cl.errors import NO_SPACE, ConfigError, Interrupted, interrupted_code
from moe_cl.run.config import (
    CHOICES,
    DEFAULT_BENCHMARK,
    DEFAULT_STRATEGY,
    RunConfig,
    changed_settings,
    compose,
    default_strategy,
    finished_results,
    load_saved,
    merge_overrides,
    preset_description,
    preset_names,
    reject_repeated_keys,
)
from moe_cl.run.lifecycle import RunFailed, claimed, resume_or_start, train
from moe_cl.run.schema import SAFE_TO_CHANGE
from moe_cl.storage.run_folder import (
    CONFIG,
    LOCK,
    end_failed_run,
    folder_is_complete,
    folder_problem,
    has_checkpoint,
    holds_only_run_files,
)
from moe_cl.training.methods import METHODS
from moe_cl.training.precision import cuda_device_problem, precision_problem

# The keys --help shows: with their choices (config.CHOICES), a placeholder, or their default.
MAIN_KEYS = (
    "seed", "device", "out_dir", "resume", "scenario", "data.root", "data.download",
    "data.n_experiences", "train.epochs", "train.batch_size", "train.lr", "train.weight_decay",
    "train.fast_data", "train.precision", "train.compile", "model.architecture",
    "model.num_experts", "model.gate", "model.output", "experts.policy",
    "experts.per_experience", "experts.freeze_old", "experts.threshold", "experts.init",
    "experts.route_by_task", "regularizer.importance", "regularizer.ls.beta_s",
    "regularizer.ls.beta_d", "regularizer.ls.scaling", "replay.mem_size", "distill.epochs",
    "distill.teacher", "eval.top_k", "logging.interactive", "logging.tensorboard", "logging.csv",
)
PLACEHOLDERS = {"out_dir": "PATH", "resume": "true|RUN_FOLDER", "distill.teacher": "RUN_FOLDER",
                "device": "auto|cpu|cuda[:N]"}
HELP_WIDTH = 96
FOLLOWER_LINGER_S = 10  # moe_cl.training.ranks.LINGER_S (not imported: it imports torch)
PEERS_GRACE_S = 3  # how long rank 0 gives the others to find a problem found before they met


def _default_note(benchmark: str) -> str:
    strategy = default_strategy(benchmark)
    return f" [strategy {strategy}]" if strategy != DEFAULT_STRATEGY else ""


def help_text() -> str:
    lines = [
        "usage: python -m moe_cl.run [benchmark=NAME] [strategy=NAME] [key=value ...]",
        "",
        "Runs a continual-learning experiment with Avalanche and writes config.yaml,",
        "results.json, logs and figures to runs/<benchmark>/<strategy>/<seed>-<time>/.",
        "",
        f"benchmarks (default {DEFAULT_BENCHMARK}):",
    ]
    lines += [f"  {n:<22}{preset_description('benchmark', n)}{_default_note(n)}"
              for n in preset_names("benchmark")]
    lines += ["", f"strategies (default {DEFAULT_STRATEGY}, unless the benchmark names one):"]
    lines += [f"  {n:<22}{preset_description('strategy', n)}" for n in preset_names("strategy")]
    lines += ["", "methods (each strategy preset names one; method=NAME overrides it):"]
    lines += [f"  {m.name:<22}{m.description}" for m in METHODS.values()]
    lines += ["", "main keys (any key of config.yaml can be set with dotted.key=value):"]
    defaults = OmegaConf.structured(RunConfig)  # built once: it takes tens of milliseconds
    return "\n".join([*lines, *_columns([_key_hint(key, defaults) for key in MAIN_KEYS])])


def _key_hint(key: str, defaults: DictConfig) -> str:
    if key in PLACEHOLDERS:
        return f"{key}={PLACEHOLDERS[key]}"
    if key in CHOICES:
        return f"{key}={'|'.join(CHOICES[key])}"
    return f"{key}={yaml.safe_dump(OmegaConf.select(defaults, key)).splitlines()[0]}"


def _columns(cells: list[str], width: int = 28) -> list[str]:
    """Cells padded to multiples of ``width``, as many to a line as fit in HELP_WIDTH."""
    lines, line = [], "  "
    for cell in cells:
        if len(line) + len(cell) > HELP_WIDTH:
            lines.append(line.rstrip())
            line = "  "
        line += cell.ljust(-(-(len(cell) + 1) // width) * width)
    return [*lines, line.rstrip()]


def _run_folder(cfg: DictConfig) -> Path:
    if cfg.out_dir:
        return Path(cfg.out_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / cfg.benchmark / cfg.strategy / f"{cfg.seed}-{stamp}"


def _resume_folder(cfg: DictConfig) -> Path:
    """The folder named by resume=PATH or out_dir=, else the newest unfinished default one."""
    if isinstance(cfg.resume, str) and cfg.resume not in ("true", "false"):
        folder = Path(cfg.resume)
    elif cfg.out_dir:
        folder = Path(cfg.out_dir)
    else:
        parent = Path("runs") / cfg.benchmark / cfg.strategy
        candidates = sorted(parent.glob(f"{cfg.seed}-*"), key=lambda p: p.stat().st_mtime)
        unfinished = [p for p in candidates if not folder_is_complete(p)]
        if not unfinished:
            raise ConfigError(f"resume=true: no unfinished run of seed {cfg.seed} under {parent}")
        folder = unfinished[-1]
    return folder


def _check_folder(out: Path, cfg: DictConfig | None, resuming: bool) -> None:
    """A new run needs an empty folder. A run to resume needs its config.yaml, unless the
    command gives the settings with resume=true (not a folder to resume: a typo there is an
    error) and the folder holds nothing but what a run writes before its first checkpoint, or
    nothing at all: that run never got going and starts now."""
    if not resuming:
        if out.exists() and any(p.name != LOCK for p in out.iterdir()):
            a_run = (out / CONFIG).exists() and holds_only_run_files(out)
            raise ConfigError(f"out_dir {out} is not empty; " + (
                f"continue its run with resume={out}, or choose another out_dir" if a_run
                else "choose another out_dir"))
        return
    starts = cfg is not None and cfg.resume is True and not has_checkpoint(out)
    if not (out / CONFIG).exists() and not (starts and holds_only_run_files(out)):
        raise ConfigError(f"resume: {out} is not a run folder (no config.yaml)")


def _resumed_settings(out: Path, cfg: DictConfig | None,
                      argv: list[str]) -> tuple[DictConfig, list[str]]:
    """The run's saved settings (the command may repeat them, change logging, and change
    explicitly what is safe to change: SAFE_TO_CHANGE, checked against the checkpoint when the
    run starts) and the keys so changed; or the command's own for a run that never wrote
    them."""
    if not (out / CONFIG).exists():
        return cfg, []
    saved = load_saved(out / CONFIG)
    overridden = [key for key in SAFE_TO_CHANGE if any(a.startswith(f"{key}=") for a in argv)]
    requested = cfg if cfg is not None else merge_overrides(
        saved, [a for a in argv if a.startswith(SAFE_OVERRIDES)])
    _check_same_config(saved, requested, overridden)
    merged = merge_overrides(saved, [a for a in argv if a.startswith("logging.")])
    for key in overridden:
        OmegaConf.update(merged, key, OmegaConf.select(requested, key))
    return merged, overridden


SAFE_OVERRIDES = tuple(f"{key}=" for key in SAFE_TO_CHANGE)
RESUME_KEYS = ("resume=", "out_dir=", "logging.", *SAFE_OVERRIDES)


def _check_same_config(saved: DictConfig, requested: DictConfig, overridden: list[str]) -> None:
    """With resume, the command may repeat the original settings but not change them
    (logging settings and the ``overridden`` keys excepted)."""
    changed = changed_settings(saved, requested, ("resume", "out_dir", "logging", *overridden))
    if changed:
        raise ConfigError(f"resume: the command's settings differ from the run's config.yaml "
                          f"({'; '.join(changed[:3])}); resume with only resume=FOLDER (or the "
                          "original command)")


@dataclass
class _Where:
    """What the command has found so far: what an interruption's line needs."""

    out: Path | None = None
    cfg: DictConfig | None = None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help", "help") for a in argv):
        print(help_text())
        return 0
    where = _Where()
    single = _torchrun_rank() is None  # under torchrun, moe_cl.training.ranks takes SIGTERM
    previous = signal.signal(signal.SIGTERM, _raise_interrupted) if single else None
    try:
        return _command(argv, where)
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM: the lock is released by now
        return _report((interrupted_code(stop), _interrupted_line(stop, where)))
    finally:
        if single:
            signal.signal(signal.SIGTERM, previous)


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(signum)


def _interrupted_line(stop: KeyboardInterrupt, where: _Where) -> str:
    """Where the run stopped and the command that continues it."""
    signal_name = f" by {stop}" if isinstance(stop, Interrupted) else ""
    position = getattr(stop, "position", None)
    at = f" at experience {position[0]}, epoch {position[1]}" if position else ""
    if where.out is None:
        return f"interrupted{signal_name}{at} before a run folder was chosen"
    return (f"interrupted{signal_name}{at}; continue with {_continue_with(where.out, where.cfg)}")


def _continue_with(out: Path, cfg: DictConfig | None) -> str:
    """The command that continues a run stopped in ``out``: resume=FOLDER once config.yaml is
    written; else the original command with resume=true (it starts the run in out_dir, or in
    the default folder left behind), or the original command if that folder is gone too."""
    if (out / CONFIG).exists():
        return f"resume={out}"
    if out.exists() or (cfg is not None and cfg.out_dir):
        return "the original command with resume=true"
    return "the original command"


def _command(argv: list[str], where: _Where) -> int:
    """The command's work; an interruption (KeyboardInterrupt) is :func:`main`'s to report."""
    out = Path(".")
    ranks = None
    try:
        reject_repeated_keys(argv)
        resume_only = _asks_to_resume(argv) and all(a.startswith(RESUME_KEYS) for a in argv)
        cfg = None if resume_only else compose(argv)
        if _torchrun_rank() is not None:
            from moe_cl.run import torchrun

            ranks = torchrun.join(cfg)
            if not ranks.is_main:
                return torchrun.follow(ranks)
        resuming = resume_only or cfg.resume not in (False, "false")
        out = (_resume_folder(cfg if cfg is not None else _resume_probe(argv)) if resuming
               else _run_folder(cfg))
        where.out, where.cfg = out, cfg
        problem = folder_problem(out, writable=True)
        if problem and resuming and folder_is_complete(out):
            return _read_back(out, cfg, argv)  # a finished run on a read-only mount
        if problem:
            raise ConfigError(f"{'resume' if resuming else 'out_dir'}: {problem}")
    except Exception as err:
        if ranks is not None:
            ranks.announce(err)  # first: the other ranks stop
        elif _torchrun_rank() == 0:
            # Before the ranks met, each finds the same problem on its own: rank 0 waits a
            # moment so that torchrun's SIGTERM, sent once it ends, finds the others ready to
            # end with the same code (_after_rank_0) rather than still starting.
            time.sleep(PEERS_GRACE_S)
        return _report(end_failed_run(err, out, None))  # a bug is raised
    try:
        with claimed(out, ranks=ranks):  # first: a folder in use is named as such
            checked = cfg is not None
            _check_folder(out, cfg, resuming)
            overridden: list[str] = []
            if resuming:
                cfg, overridden = _resumed_settings(out, cfg, argv)
            where.cfg = cfg
            resume = resume_or_start(out)
            problem = _device_problem(cfg)
            if problem:
                raise ConfigError(problem)
            _prepare_data(cfg)
            if ranks is not None:
                from moe_cl.run import torchrun

                results = torchrun.lead(ranks, cfg, out, resume, checked=checked)
            else:
                results = train(cfg, out, resume=resume, overridden=overridden)
    except RunFailed as failed:
        code, message = failed.exit_code, failed.message
        if code == NO_SPACE:
            message += f"; free space, then continue with {_continue_with(out, where.cfg)}"
        return _report((code, message))
    from moe_cl.run.experiment import print_summary

    print_summary(results)
    return 0


def _read_back(out: Path, cfg: DictConfig | None, argv: list[str]) -> int:
    """Print a finished run's results without claiming its folder (which may be read-only),
    once its config.yaml, the command and its results.json agree."""
    from moe_cl.run.experiment import print_summary

    saved, _ = _resumed_settings(out, cfg, argv)
    print_summary(finished_results(out, saved))
    return 0


def _report(failure: tuple[int, str]) -> int:
    """A failed command's one line (rank 0's alone under torchrun) and its exit code."""
    code, message = failure
    if _torchrun_rank() not in (None, 0):  # every rank found it: rank 0 says it
        return _after_rank_0(code)
    print(f"error: {message}", file=sys.stderr)
    return code


def _torchrun_rank() -> int | None:
    """This process's rank when torchrun (or a launcher setting its variables) started it."""
    if not all(key in os.environ for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return None
    return int(os.environ["RANK"])


def _after_rank_0(code: int) -> int:
    """A torchrun rank but 0 that found what rank 0 reports (before the ranks met): its exit
    code once rank 0 has ended, which makes torchrun stop this process (SIGTERM: the same exit
    code); on other machines, where no SIGTERM comes, after a moment."""
    signal.signal(signal.SIGTERM, lambda *_: os._exit(code))
    time.sleep(FOLLOWER_LINGER_S)
    return code


def _prepare_data(cfg: DictConfig) -> None:
    """The stream's files in data.root (unpacked or downloaded if missing and allowed) before
    Avalanche is imported: missing data on an offline machine is named in seconds."""
    from moe_cl.data.datasets import DataOptions, prepare_files

    prepare_files(cfg.data.stream, cfg.data.root, DataOptions(download=cfg.data.download))


def _device_problem(cfg: DictConfig) -> str | None:
    """What the run's device cannot do of its settings (a GPU it lacks, train.precision),
    found before data or Avalanche load; torch is imported only to ask about a GPU or a
    precision other than fp32."""
    # under torchrun every rank checks its own GPU when the ranks take their devices together
    problem = cuda_device_problem(cfg.device) if _torchrun_rank() is None else None
    if problem or cfg.train.precision == "fp32":
        return problem
    import torch

    cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    return precision_problem(cfg.train.precision, "cuda" if cuda else "cpu")


def _resume_value(argv: list[str]) -> bool | str:
    """resume= as the schema reads it (true/false in any case, else a folder); False if absent."""
    values = [a.split("=", 1)[1] for a in argv if a.startswith("resume=")]
    if not values:
        return False
    try:
        value = OmegaConf.from_dotlist([f"resume={values[-1]}"]).resume
    except OmegaConfBaseException:
        return values[-1]
    return value if isinstance(value, bool) else str(value)


def _asks_to_resume(argv: list[str]) -> bool:
    return _resume_value(argv) is not False


def _resume_probe(argv: list[str]) -> DictConfig:
    """A minimal config holding only resume and out_dir, to find the run folder."""
    values = dict(a.split("=", 1) for a in argv if a.startswith("out_dir="))
    return DictConfig({"resume": _resume_value(argv), "out_dir": values.get("out_dir"),
                       "benchmark": DEFAULT_BENCHMARK,
                       "strategy": default_strategy(DEFAULT_BENCHMARK), "seed": 0})


if __name__ == "__main__":
    sys.exit(main())
