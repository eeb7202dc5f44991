"""Section ``router``: what the routed mixture's router costs, beside the training it serves.

The default ``split_fmnist`` run (``strategy=routed``: random-convolution features, attentive
gate + L_s, two experts per experience, batch 128) trains its first two experiences; the
router's work in training is the class-statistics update after each experience (its features
of the experience's data, then the merge). Evaluation of the trained experiences prices the
router's part of each routed forward pass (features and class scores)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from omegaconf import OmegaConf

from moe_cl.bench.harness import row, sync, target
from moe_cl.bench.registry import Section
from moe_cl.bench.report import key_value_lines
from moe_cl.bench.settings import Options, Sizes
from moe_cl.bench.training import synthetic_benchmark, timed_strategy, timed_train
from moe_cl.core.zoo import get_architecture
from moe_cl.data.streams import DataError
from moe_cl.run.builders import build_benchmark
from moe_cl.run.config import compose
from moe_cl.training.methods import METHODS
from moe_cl.training.strategies import MoEStrategy

EXPERIENCES = 2  # the first grows experts and trains the gate; the second only adds experts


class Stopwatch:
    """Wraps a callable and adds the wall time of each call to ``seconds``."""

    def __init__(self, fn: Callable[..., Any], device: torch.device) -> None:
        self.fn, self.device, self.seconds = fn, device, 0.0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        sync(self.device)
        start = time.perf_counter()
        out = self.fn(*args, **kwargs)
        sync(self.device)
        self.seconds += time.perf_counter() - start
        return out


def _stream(options: Options, samples: int | None) -> tuple[Any, Any, str]:
    """(config, benchmark, source) of the default split_fmnist run: real data when present,
    else random tensors of its shapes (5 experiences of 2 classes)."""
    limits = [] if samples is None else [f"data.max_train_samples={samples}",
                                         f"data.max_test_samples={max(samples // 6, 100)}"]
    cfg = compose(["benchmark=split_fmnist", f"data.root={options.data_root}", *limits])
    if not options.synthetic:
        try:
            bm = build_benchmark(cfg).benchmark
            n = sum(len(e.dataset) for e in bm.train_stream[:EXPERIENCES])
            return cfg, bm, f"real split_fmnist ({n} training samples in {EXPERIENCES} experiences)"
        except DataError as error:
            print(f"[bench] split_fmnist: real data not found ({str(error).splitlines()[0]}); "
                  "using synthetic tensors")
    n_train = 60_000 if samples is None else samples
    bm = synthetic_benchmark(n_train, max(n_train // 6, 100), (1, 28, 28), 10, n_experiences=5)
    return cfg, bm, f"synthetic split_fmnist-shaped tensors ({n_train} training samples)"


def run(sizes: Sizes, device: torch.device, options: Options) -> dict[str, Any]:
    cfg, bm, source = _stream(options, sizes.router_samples)
    torch.manual_seed(0)
    model = METHODS["routed"].make_model(cfg, get_architecture(cfg.model.architecture))
    strategy, clock = timed_strategy(MoEStrategy, model, epochs=cfg.train.epochs,
                                     batch=cfg.train.batch_size, device=device, fast_data=True)
    update = model.update_router = Stopwatch(model.update_router, device)
    runs, updates = [], []
    for experience in bm.train_stream[:EXPERIENCES]:
        before = update.seconds
        runs.append(timed_train(strategy, experience, clock, device))
        updates.append(update.seconds - before)
        clock.next_run()

    features = model.router_features = Stopwatch(model.router_features, device)
    scores = model.statistics.log_likelihoods = Stopwatch(model.statistics.log_likelihoods, device)
    sync(device)
    start = time.perf_counter()
    strategy.eval(bm.test_stream[:EXPERIENCES])
    sync(device)
    evaluation = time.perf_counter() - start
    router_eval = features.seconds + scores.seconds

    epochs = [s for r in runs for s in r.epoch_s]
    training = [r.total_s for r in runs]
    trained = sum(len(e.dataset) for e in bm.train_stream[:EXPERIENCES])
    tested = sum(len(e.dataset) for e in bm.test_stream[:EXPERIENCES])
    epoch_median = statistics.median(epochs)
    case = f"split_fmnist routed, experiences 1-{EXPERIENCES}"
    rows = [
        row(case, "training epoch", epochs, None, f"{len(epochs)} epochs"),
        row(case, "router update (after each experience)", updates, epoch_median),
        row(case, "train() call per experience (update included)", training, None),
        row(case, "evaluation of their test data", [evaluation], None, f"{tested} samples"),
        row(case, "router's part of that evaluation", [router_eval], evaluation),
    ]
    with_router = sum(training)
    return {
        "title": f"the routed mixture's router beside its training ({source})",
        "rows": rows,
        "targets": [
            target("train() with / without the router update, per experience",
                   with_router / (with_router - sum(updates)), 1.10, at_most=True),
        ],
        "info": {
            "data": source,
            "device": str(device),
            "experiences": EXPERIENCES,
            "training_samples": trained,
            "epochs_per_experience": cfg.train.epochs,
            "batch": cfg.train.batch_size,
            "router": OmegaConf.to_container(cfg.router),
            "router_features": model.statistics.num_features,
            "statistics_bytes": model.statistics_bytes,
            "router_update_per_epoch": sum(updates) / len(epochs) / epoch_median,
            "router_share_of_evaluation": router_eval / evaluation,
        },
        "notes": [
            "speedup column of the update row: one epoch / the update (how many updates fit in "
            "an epoch); of the router's evaluation row: evaluation / its router part.",
            "The update runs once per experience (features of the experience's data in chunks "
            "of 4096, then the float64 merge of class means and the shared scatter); the target "
            "compares the whole train() call with the same call less the update.",
        ],
    }


SECTION = Section(run=run, info_lines=key_value_lines)
