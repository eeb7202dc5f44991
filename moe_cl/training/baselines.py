"""The baselines a reviewer asks for beside the mixtures, on Avalanche's own strategies.

- :class:`GateClassifier`: the paper's gate network for the data set with a linear head, one
  network with about the mixture's parameters (``model.backbone=gate`` for naive, EWC, LwF,
  replay, SI and joint training).
- :class:`SLDAClassifier` and :class:`BatchedStreamingLDA`: Avalanche's streaming linear
  discriminant analysis (Hayes et al. 2020) on a frozen feature map (the pixels, the router's
  random convolution, or the gate network's trunk trained on the first experience). Avalanche
  fits one sample at a time with a d x d update each; here one batch is one matrix product with
  the same statistics. The statistics are the model's buffers, so the model's state_dict holds
  the whole classifier (checkpoints, resume).
- :class:`SynapticIntelligenceFixed`: Avalanche's SI, whose weight snapshots on the CPU are views
  of the live parameters (so every importance is zero), with the snapshots copied.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from avalanche.training import StreamingLDA
from avalanche.training.plugins import SynapticIntelligencePlugin
from torch import Tensor, nn

from moe_cl.core.mixture import masked_log_softmax
from moe_cl.core.router import trunk_features
from moe_cl.core.zoo import Architecture
from moe_cl.errors import NonFiniteLossError
from moe_cl.training.models import ClassMaskedModel
from moe_cl.training.options import FEATURE_SPACES, ROUTER_FEATURES, RouterOptions, Scenario

# ----------------------------------------------------------------------------- the gate network


def gate_network_classifier(architecture: Architecture) -> nn.Sequential:
    """The softmax gate's network for the architecture followed by Linear(gate_features,
    num_classes): a classifier of the size of the mixture's gate."""
    return nn.Sequential(*architecture.gate_network("softmax"),
                         nn.Linear(architecture.gate_features, architecture.num_classes))


class GateClassifier(ClassMaskedModel):
    """The gate network as the whole classifier, with the single expert's masking and output
    (log-probabilities): Avalanche's single-model strategies at about the mixture's size."""

    def __init__(self, *, architecture: str | Architecture, scenario: Scenario = "class") -> None:
        super().__init__(architecture, scenario, mask_unseen=True)
        self.network = gate_network_classifier(self.architecture)

    def predict(self, x: Tensor, class_mask: Tensor | None,
                task_labels: Tensor | None) -> Tensor:
        return masked_log_softmax(self.network(x), class_mask)


# ----------------------------------------------------------------------------- streaming LDA


class SLDAClassifier(ClassMaskedModel):
    """Streaming LDA on a frozen feature map: Avalanche's statistics (``muK`` class means,
    ``cK`` counts, ``Sigma`` the streaming covariance, ``num_updates``) as buffers, Avalanche's
    scores, and the masking of the other models.

    ``features``: ``pixels``; ``random_conv`` (the router's frozen random convolution with
    :class:`~moe_cl.training.options.RouterOptions`' defaults); ``gate_trunk`` (the gate network's
    layers up to its first Flatten, trained with ``network``, the gate classifier, on the first
    experience by :class:`BatchedStreamingLDA`, then frozen). ``shrinkage``: s in Avalanche's
    ((1 - s) Sigma + s I)^-1.
    """

    def __init__(
        self,
        *,
        architecture: str | Architecture,
        features: str = "random_conv",
        shrinkage: float = 1e-4,
        scenario: Scenario = "class",
    ) -> None:
        super().__init__(architecture, scenario, mask_unseen=True)
        if features not in ROUTER_FEATURES:
            raise ValueError(f"slda.features must be one of {ROUTER_FEATURES}, got {features!r}")
        if not 0 < shrinkage <= 1:
            raise ValueError(f"slda.shrinkage must be in (0, 1], got {shrinkage}")
        self.shrinkage = shrinkage
        self.feature_map = FEATURE_SPACES[features](self.architecture.input_shape,
                                                    RouterOptions())
        # No map of its own (gate_trunk): the trunk of the gate classifier trained first.
        self.network = gate_network_classifier(self.architecture) if self.feature_map is None \
            else None
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self.num_features = self._feature_size()
        k, d = self.num_classes, self.num_features
        self.register_buffer("muK", torch.zeros(k, d))
        self.register_buffer("cK", torch.zeros(k))
        self.register_buffer("Sigma", torch.ones(d, d))  # Avalanche's start; gone at the first fit
        # The discriminant, solved from the statistics when they have changed.
        self.register_buffer("weights", torch.zeros(d, k), persistent=False)
        self.register_buffer("bias", torch.zeros(k), persistent=False)
        self._stale = True

    @torch.no_grad()
    def _feature_size(self) -> int:
        was_training = self.training
        self.eval()  # a probe must not move BatchNorm statistics
        size = self.features(torch.zeros(1, *self.architecture.input_shape)).shape[1]
        self.train(was_training)
        return size

    @property
    def num_updates(self) -> int:
        return int(self.updates)

    @num_updates.setter
    def num_updates(self, value: int) -> None:
        """Every change of the statistics ends here (Avalanche's own ``fit``, ``fit_base`` and
        ``load_model`` too): the discriminant is solved again when next asked for."""
        self.updates.fill_(value)
        self._stale = True

    @property
    def needs_feature_training(self) -> bool:
        """Whether the gate trunk is still to be trained (before the first fit)."""
        return self.network is not None and self.num_updates == 0

    @property
    def statistics_bytes(self) -> int:
        """What the classifier keeps instead of samples: its statistics, in bytes."""
        return sum(t.numel() * t.element_size() for t in (self.muK, self.cK, self.Sigma))

    def train(self, mode: bool = True) -> SLDAClassifier:
        super().train(mode)
        if self.network is not None and not self.needs_feature_training:
            self.network.eval()  # frozen: its BatchNorm statistics stay the first experience's
        return self

    def features(self, x: Tensor) -> Tensor:
        """[B, d]: the frozen feature map of a batch."""
        if self.feature_map is not None:
            return self.feature_map(x)
        return trunk_features(self.network, x)

    @torch.no_grad()
    def fit(self, features: Tensor, labels: Tensor) -> None:
        """Add a batch to the statistics as Avalanche's ``StreamingLDA.fit`` does, one sample
        at a time in the batch's order, in one step.

        Sample i of the batch (n_i = num_updates + i samples before it) adds
        n_i / (n_i + 1) d_i d_i^T to n Sigma, with d_i = x_i - (its class's mean just before
        it): the stored mean and count merged with the class's earlier samples in the batch
        (per-class prefix sums). A class's first sample meets mean 0, as in Avalanche.
        """
        if not len(labels):
            return
        x = features.to(torch.float64)
        labels = labels.to(self.cK.device)
        n, batch = self.num_updates, len(labels)
        earlier_count, earlier_sum = _earlier_same_class(x, labels)
        stored_count = self.cK.double()[labels]
        total = stored_count + earlier_count
        mean_before = (stored_count[:, None] * self.muK.double()[labels] + earlier_sum) / \
            total.clamp(min=1)[:, None]
        centred = x - mean_before
        before = n + torch.arange(batch, dtype=torch.float64, device=x.device)
        scatter = (centred * (before / (before + 1))[:, None]).T @ centred
        self.Sigma.copy_((n * self.Sigma.double() + scatter) / (n + batch))
        batch_count = torch.bincount(labels, minlength=self.num_classes).double()
        sums = torch.zeros_like(self.muK, dtype=torch.float64).index_add_(0, labels, x)
        present = batch_count > 0
        count = self.cK.double() + batch_count
        means = (self.cK.double()[:, None] * self.muK.double() + sums) / count.clamp(min=1)[:, None]
        self.muK[present] = means[present].to(self.muK.dtype)
        self.cK += batch_count.to(self.cK.dtype)
        self.num_updates = n + batch

    @torch.no_grad()
    def _solve(self) -> None:
        eye = torch.eye(self.num_features, dtype=torch.float64, device=self.Sigma.device)
        covariance = (1 - self.shrinkage) * self.Sigma.double() + self.shrinkage * eye
        means = self.muK.double()
        weights = torch.linalg.solve(covariance, means.T)  # [d, K]
        bias = -0.5 * (means * weights.T).sum(1)
        self.weights.copy_(weights)
        self.bias.copy_(bias.masked_fill(self.cK == 0, -math.inf))
        self._stale = False

    def scores(self, features: Tensor) -> Tensor:
        """[B, K] Avalanche's scores x^T W_k - 1/2 mu_k^T W_k, W = ((1 - s) Sigma + s I)^-1 mu,
        solved once per change of the statistics (float64, where Avalanche takes a float32
        pseudo-inverse); -inf for classes never fitted, which Avalanche scores 0, above every
        seen class with a negative score."""
        if self._stale:
            self._solve()
        return torch.addmm(self.bias, features.to(self.weights.dtype), self.weights)

    def predict(self, x: Tensor, class_mask: Tensor | None,
                task_labels: Tensor | None) -> Tensor:
        """Log-posteriors under equal priors (the scores are log-likelihoods up to a term common
        to all classes). A sample none of whose allowed classes was fitted (a task not trained
        yet) gets equal scores over them instead of NaN."""
        scores = self.scores(self.features(x))
        allowed = scores if class_mask is None else scores.masked_fill(~class_mask, -math.inf)
        blind = torch.isneginf(allowed).all(-1, keepdim=True)
        return masked_log_softmax(scores.masked_fill(blind, 0.0), class_mask)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._stale = True


def _earlier_same_class(x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per sample of a batch: how many samples of its class come before it in the batch [B],
    and their sum [B, d] (a stable sort by class, then prefix sums within each class)."""
    order = torch.argsort(labels, stable=True)
    sorted_labels, sorted_x = labels[order], x[order]
    before_all = sorted_x.cumsum(0) - sorted_x  # sum of every earlier row, any class
    first = torch.searchsorted(sorted_labels, sorted_labels)  # the class's first row
    count, total = torch.empty_like(x[:, 0]), torch.empty_like(x)
    count[order] = (torch.arange(len(labels), device=x.device) - first).to(x.dtype)
    total[order] = before_all - before_all[first]
    return count, total


def _model_statistic(name: str) -> property:
    """Avalanche's strategy attribute ``name``, kept in the model's buffer of that name."""

    def get(strategy: BatchedStreamingLDA) -> Tensor:
        return getattr(strategy.model, name)

    def set_(strategy: BatchedStreamingLDA, value: Tensor) -> None:
        getattr(strategy.model, name).copy_(value)

    return property(get, set_)


class BatchedStreamingLDA(StreamingLDA):
    """Avalanche's ``StreamingLDA`` on an :class:`SLDAClassifier`, one batch at a time.

    Its statistics (``muK``, ``cK``, ``Sigma``, ``num_updates``) are the model's, ``fit`` takes a
    whole batch (:meth:`SLDAClassifier.fit`, the same statistics as Avalanche's sample loop)
    and the scores are the model's (unseen classes -inf). An experience is one pass, whatever
    ``train_epochs`` says: a sample fitted twice would count twice. Before the first fit, a
    gate trunk trains with its gate classifier: cross-entropy over the experience's classes,
    ``feature_optimizer`` for ``feature_epochs`` epochs on the strategy's batches. The training
    metrics see each batch scored after the experience's fit (scoring each batch before its
    update, as Avalanche does, solves the d x d system once per batch).
    """

    muK = _model_statistic("muK")
    cK = _model_statistic("cK")
    Sigma = _model_statistic("Sigma")

    def __init__(
        self,
        *,
        slda_model: SLDAClassifier,
        feature_optimizer: torch.optim.Optimizer | None = None,
        feature_epochs: int = 0,
        **kwargs,
    ) -> None:
        if slda_model.network is not None and feature_optimizer is None:
            raise ValueError("a gate trunk needs a feature_optimizer to train it")
        fitted = copy.deepcopy(slda_model.state_dict())  # Avalanche's constructor zeroes them
        super().__init__(slda_model=slda_model, input_size=slda_model.num_features,
                         num_classes=slda_model.num_classes,
                         shrinkage_param=slda_model.shrinkage, **kwargs)
        slda_model.load_state_dict(fitted)
        self.feature_optimizer, self.feature_epochs = feature_optimizer, feature_epochs
        self.Lambda = None  # the model solves and caches the discriminant itself

    @property
    def num_updates(self) -> int:
        return self.model.num_updates

    @num_updates.setter
    def num_updates(self, value: int) -> None:
        self.model.num_updates = value

    @property
    def train_epochs(self) -> int:
        """One pass per experience (``train.epochs`` is the gate trunk's)."""
        return 1

    @train_epochs.setter
    def train_epochs(self, epochs: int) -> None:
        """Ignored: a second pass would count every sample twice (see the getter)."""

    def fit(self, x: Tensor, y: Tensor) -> None:
        self.model.fit(x, y)

    def predict(self, X: Tensor) -> Tensor:  # noqa: N803 - Avalanche's signature
        return self.model.scores(X)

    def forward(self) -> Tensor:
        return self.model(self.mb_x, self.mb_task_id)

    def training_epoch(self, **kwargs) -> None:
        if self.model.needs_feature_training:
            self._train_gate_trunk()
        with torch.no_grad():
            for _ in self._batches():
                self.fit(self.model.features(self.mb_x), self.mb_y)
            for _ in self._batches():
                self._before_training_iteration(**kwargs)
                self._before_forward(**kwargs)
                self.mb_output = self.forward()
                self._after_forward(**kwargs)
                self.loss = self.criterion()
                self._after_training_iteration(**kwargs)

    def _batches(self) -> Iterator[None]:
        """Walk the experience's mini-batches, each unpacked into ``mbatch`` (Avalanche's
        convention: ``mb_x``, ``mb_y`` and ``mb_task_id`` read it)."""
        for batch in self.dataloader:
            self.mbatch = batch
            self._unpack_minibatch()
            yield

    def _train_gate_trunk(self) -> None:
        network = self.model.network
        network.train()
        for _ in range(self.feature_epochs):
            for _ in self._batches():
                mask = self.model.class_mask(self.mb_task_id)
                loss = F.nll_loss(masked_log_softmax(network(self.mb_x), mask), self.mb_y)
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(f"loss is {float(loss)} while training the gate "
                                             "trunk of slda on the first experience")
                self.feature_optimizer.zero_grad()
                loss.backward()
                self.feature_optimizer.step()
        network.eval()


# ----------------------------------------------------------------------------- SI


class SynapticIntelligenceFixed(SynapticIntelligencePlugin):
    """Avalanche's Synaptic Intelligence with its weight snapshots copied.

    Avalanche stores ``param.detach().cpu().flatten()``: on the GPU a copy, on the CPU a view of
    the live parameter, so the experience's starting weights and each step's old weights move
    with it, every path integral is zero and SI is naive fine-tuning. Avalanche calls its
    snapshot helpers through the class name (an override of them would never run), so this
    plugin copies the snapshots after the hooks that take them: the starting weights after
    ``before_training_exp``, the old weights after ``before_training_iteration`` (the new ones
    are used at once, while they are still current).

    ``in_experience`` is True between the start and the end of a training experience; a plugin
    restored from a checkpoint taken inside one (``train.checkpoint_every_epochs``) keeps the
    restored starting weights and path integrals instead of starting the experience again.
    """

    def __init__(self, *, si_lambda: float, eps: float = 1e-7) -> None:
        super().__init__(si_lambda=si_lambda, eps=eps)
        self.in_experience = False

    def before_training_exp(self, strategy, **kwargs) -> None:
        if self.in_experience:
            return  # resumed inside the experience: its snapshots were restored
        super().before_training_exp(strategy, **kwargs)
        _own_copies(self.ewc_data[0])
        self.in_experience = True

    def before_training_iteration(self, strategy, **kwargs) -> None:
        super().before_training_iteration(strategy, **kwargs)
        _own_copies(self.syn_data["old_theta"])

    def after_training_exp(self, strategy, **kwargs) -> None:
        super().after_training_exp(strategy, **kwargs)
        self.in_experience = False


def _own_copies(snapshots: dict) -> None:
    for snapshot in snapshots.values():
        snapshot.data = snapshot.data.clone()
