"""``MoEStrategy``: Avalanche's ``SupervisedTemplate`` for mixtures of experts.

It adds to the template only what a mixture needs: the mixture's loss (expectation or
stochastic), optional top-k inference, per-batch augmentation on the device, the fast tensor
data path, the arithmetic (``precision``, :mod:`.precision`) and ``torch.compile`` of the
mixture. Regularisers, growth and routing metrics stay plugins and modules, so they compose
with Avalanche's own (ReplayPlugin, EWCPlugin, LwFPlugin, ...). Under torchrun (``ranks``) each
rank trains on its shard of every batch (:mod:`moe_cl.training.ranks`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

import torch
from avalanche.core import BasePlugin
from avalanche.training.plugins import EWCPlugin
from avalanche.training.plugins.evaluation import EvaluationPlugin, default_evaluator
from avalanche.training.templates import SupervisedTemplate
from avalanche.training.templates.strategy_mixin_protocol import CriterionType
from torch import Tensor, nn
from torch.optim import Optimizer

from moe_cl.core.gates import AttentiveGate
from moe_cl.core.losses import stochastic_nll
from moe_cl.core.router import cuda_tf32
from moe_cl.data.tensors import Batch, TensorBatches, dataset_tensors, has_transforms
from moe_cl.training.models import MixtureOfExperts, routing_output
from moe_cl.training.plugins import DataParallel, NonFiniteLossGuard
from moe_cl.training.precision import Precision, precision_problem
from moe_cl.training.routed import RoutedMixture, RouterUpdate

if TYPE_CHECKING:
    from moe_cl.training.ranks import Ranks


class MoEStrategy(SupervisedTemplate):
    """Train a :class:`~moe_cl.training.models.MixtureOfExperts` on a stream of experiences.

    It takes every keyword of Avalanche's ``SupervisedTemplate`` (``eval_every``, ``peval_mode``
    and whatever else it forwards to its bases), so periodic evaluation and the template's
    other options work as with ``Naive``. Streams without task labels (Avalanche 0.6's
    ``class_incremental_benchmark``) are read as task 0.

    :param criterion: the loss of the mixture's output, log-probabilities: ``NLLLoss`` by
        default (``CrossEntropyLoss`` gives the same values). The ``stochastic`` output mode
        trains with its own loss and ignores it.
    :param batch_augment: applied to each training mini-batch on the device (e.g. CIFAR flips
        and crops), identically on the fast and the standard data path.
    :param fast_data: hold each experience as tensors on the device and batch by index
        (falls back to Avalanche's loaders when a plugin replaces the loader, e.g. replay, and
        for training data with transforms, whose random draws must change every epoch; use
        ``batch_augment`` for augmentation on the fast path).
    :param eval_top_k: at evaluation, mix only the k experts with the largest gate values and
        compute only those (needs a softmax or distilled gate).
    :param precision: ``fp32``, ``tf32`` (CUDA: matmuls and convolutions in TensorFloat-32) or
        ``bf16`` (forward passes under ``torch.autocast`` in bfloat16; the gate's softmax, the
        mixture, the losses and the metrics stay float32), in training and evaluation alike.
        A precision the device lacks is a ``ValueError`` (``precision.precision_problem``).
    :param compile_model: ``torch.compile`` the mixture's forward pass (the bank and the gate) in
        place; growth changes the modules, so the next forward compiles again. Parameter names
        and checkpoints are unchanged.
    :param ranks: this process's place in a data-parallel run (torchrun,
        :func:`moe_cl.training.ranks.join`): each training batch of ``train_mb_size`` is the whole
        (global) batch, of which this rank trains its contiguous shard, its loss weighted by its
        share; :class:`~moe_cl.training.plugins.DataParallel` (added first) sums the gradients over
        the ranks and checks every rank's loss in place of ``NonFiniteLossGuard``. The fast
        data path is required. Evaluation is not split: every rank evaluates everything.
    """

    def __init__(
        self,
        *,
        model: MixtureOfExperts,
        optimizer: Optimizer,
        criterion: CriterionType | None = None,
        train_mb_size: int = 256,
        train_epochs: int = 1,
        eval_mb_size: int = 1024,
        device: str | torch.device = "cpu",
        plugins: Sequence[BasePlugin] | None = None,
        evaluator: EvaluationPlugin | Callable[[], EvaluationPlugin] = default_evaluator,
        eval_every: int = -1,
        peval_mode: str = "epoch",
        batch_augment: Callable[[Tensor], Tensor] | None = None,
        fast_data: bool = True,
        eval_top_k: int | None = None,
        precision: Precision = "fp32",
        compile_model: bool = False,
        ranks: Ranks | None = None,
        **base_kwargs: Any,
    ) -> None:
        if not isinstance(model, MixtureOfExperts):
            raise TypeError(f"model must be a moe_cl MixtureOfExperts, got {type(model).__name__}")
        _check_online_ewc(model, plugins or [])
        problem = precision_problem(precision, torch.device(device).type)
        if problem:
            raise ValueError(problem)
        plugins = _with_router_update(model, plugins or [])
        if ranks is not None:
            plugins = _with_data_parallel(ranks, plugins)
        super().__init__(
            model=model,
            optimizer=optimizer,
            criterion=nn.NLLLoss() if criterion is None else criterion,
            train_mb_size=train_mb_size,
            train_epochs=train_epochs,
            eval_mb_size=eval_mb_size,
            device=device,
            plugins=plugins,
            evaluator=evaluator,
            eval_every=eval_every,
            peval_mode=peval_mode,
            **base_kwargs,
        )
        self.batch_augment = batch_augment
        self.fast_data = fast_data
        self.eval_top_k = eval_top_k
        self.precision = precision
        self.ranks = ranks
        # the training batch of every rank (torchrun): its inputs and each rank's rows of it
        self.whole_batch_inputs: Tensor | None = None
        self._shard_bounds: list[int] = []
        self._eval_cache: dict[int, tuple[object, Batch]] = {}
        if compile_model:
            model.core.compile()

    # -- precision

    def train(self, experiences, eval_streams=None, **kwargs):
        with self._float32_mode():
            return super().train(experiences, eval_streams, **kwargs)

    def eval(self, exp_list, **kwargs):
        with self._float32_mode():
            return super().eval(exp_list, **kwargs)

    def _float32_mode(self) -> AbstractContextManager:
        """CUDA's float32 matmuls and convolutions in TF32 for ``tf32``, in IEEE float32 else
        (torch's default runs convolutions in TF32); nothing to set on other devices."""
        if self.device.type != "cuda":
            return nullcontext()
        return cuda_tf32(self.precision == "tf32")

    def _autocast(self) -> AbstractContextManager:
        if self.precision != "bf16":
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    # -- model

    @property
    def mb_task_id(self) -> Tensor:
        """The mini-batch's task labels: task 0 for every sample of a stream without task
        labels, whose mini-batches are (x, y) only (Avalanche's template would fail)."""
        if len(self.mbatch) >= 3:
            return self.mbatch[-1]
        return torch.zeros(len(self.mbatch[0]), dtype=torch.long, device=self.mbatch[0].device)

    def forward(self) -> Tensor:
        with self._autocast():
            if self.eval_top_k is not None and not self.is_training:
                return self.model.forward_top_k(self.mb_x, self.eval_top_k, self.mb_task_id)
            return self.model(self.mb_x, self.mb_task_id)

    def criterion(self) -> Tensor:
        out = routing_output(self.model)
        if self.model.core.output == "stochastic" and out.expert_log_probs is not None:
            return stochastic_nll(out.gate, out.expert_log_probs, self.mb_y)
        return self._criterion(self.mb_output, self.mb_y)

    def backward(self) -> None:
        """Under torchrun, the loss weighted by this rank's share of the batch: summed over the
        ranks, the gradients are those of the whole batch's loss (shards may differ by one)."""
        if self.ranks is None:
            return super().backward()
        bounds, rank = self._shard_bounds, self.ranks.rank
        share = (bounds[rank + 1] - bounds[rank]) / bounds[-1]
        (self.loss * share).backward(retain_graph=self.retain_graph)

    def _unpack_minibatch(self) -> None:
        super()._unpack_minibatch()
        if self.is_training and self.batch_augment is not None:
            self.mbatch[0] = self.batch_augment(self.mbatch[0])  # the whole batch: same draws
        if self.is_training and self.ranks is not None:
            self.whole_batch_inputs = self.mbatch[0]
            self._shard_bounds = self.ranks.shard_bounds(len(self.mbatch[0]))
            start, stop = self._shard_bounds[self.ranks.rank:self.ranks.rank + 2]
            self.mbatch = [t[start:stop] for t in self.mbatch]

    def whole_batch(self, rows: Tensor) -> Tensor:
        """Per-sample values of the training batch (the gate): this rank's rows, under torchrun
        every rank's, in batch order and differentiable (the regularisers' statistics)."""
        if self.ranks is None:
            return rows
        return self.ranks.gather_rows(rows, self._shard_bounds)

    # -- data

    def make_train_dataloader(self, num_workers=0, shuffle=True, pin_memory=None,
                              persistent_workers=False, drop_last=False, **kwargs) -> None:
        if not self.fast_data or has_transforms(self.adapted_dataset, except_class_lookups=True):
            return super().make_train_dataloader(num_workers, shuffle, pin_memory,
                                                 persistent_workers, drop_last, **kwargs)
        tensors = self._tensors("train")
        if self.ranks is not None:  # a last batch too small to give every rank a sample
            last = len(tensors[1]) % self.train_mb_size
            drop_last = drop_last or 0 < last < self.ranks.world_size
        self.dataloader = TensorBatches(tensors, self.train_mb_size, shuffle=shuffle,
                                        drop_last=drop_last)

    def make_eval_dataloader(self, num_workers=0, shuffle=False, pin_memory=None,
                             persistent_workers=False, **kwargs) -> None:
        if not self.fast_data:
            return super().make_eval_dataloader(num_workers, shuffle, pin_memory,
                                                persistent_workers, **kwargs)
        self.dataloader = TensorBatches(self._tensors("eval"), self.eval_mb_size, shuffle=False)

    def _tensors(self, phase: str) -> Batch:
        """The adapted dataset as tensors on the device.

        Training data are gathered once per experience (plugins may change them); evaluation
        data once per test experience, since every experience is evaluated again and again.
        """
        if phase == "train":
            tensors = dataset_tensors(self.adapted_dataset)
            return tuple(t.to(self.device) for t in tensors)
        source = self.experience.dataset
        entry = self._eval_cache.get(id(source))
        if entry is None or entry[0] is not source:
            tensors = dataset_tensors(self.adapted_dataset)
            entry = (source, tuple(t.to(self.device) for t in tensors))
            self._eval_cache[id(source)] = entry
        return entry[1]


def _with_router_update(model: MixtureOfExperts, plugins: Sequence[BasePlugin]) -> list:
    """The plugins, with the one that feeds a routed mixture's router added if missing."""
    plugins = list(plugins)
    if isinstance(model, RoutedMixture) and not any(isinstance(p, RouterUpdate) for p in plugins):
        plugins.append(RouterUpdate())
    return plugins


def _with_data_parallel(ranks: Ranks, plugins: Sequence[BasePlugin]) -> list:
    """DataParallel first (its sums of the epoch's counts precede the plugins that report
    them), in place of the NaN-loss guard: DataParallel checks every rank's loss together."""
    return [DataParallel(ranks), *(p for p in plugins if not isinstance(p, NonFiniteLossGuard))]


def _check_online_ewc(model: MixtureOfExperts, plugins: Sequence[BasePlugin]) -> None:
    """Avalanche's online EWC pairs old and new importances by position, so parameters added
    by growth must come last: true of the attentive gate, not of a softmax gate's new rows."""
    online = any(isinstance(p, EWCPlugin) and p.mode == "online" for p in plugins)
    if online and model.policy.policy != "fixed" and not isinstance(model.core.gate, AttentiveGate):
        raise ValueError(
            "EWCPlugin(mode='online') cannot follow a growing mixture with a softmax gate (its "
            "new output rows sit between old parameters); use mode='separate', the attentive "
            "gate or policy kind 'fixed'"
        )
