"""A router that cannot forget: class statistics in a feature space fixed once.

The features come from a frozen map (:class:`PixelFeatures`, :class:`RandomConvFeatures`, or a
gate network's trunk, :func:`trunk_features`). :class:`ClassStatistics` keeps, per class, the
count and mean of those features and the pooled within-class scatter, merged exactly from each
experience's data alone, so its final state does not depend on the order of the stream and no
sample is stored. A shrunk linear discriminant on these statistics gives class log-likelihoods, and
:func:`experience_log_posterior` turns them into the probability of each experience, which says
which experts should see a sample.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_cl.core.layouts import LAYOUTS


@contextmanager
def cuda_tf32(enabled: bool) -> Iterator[None]:
    """CUDA matmuls and cuDNN convolutions of float32 tensors in TF32 (or not) inside the
    block, torch's settings as they were after it."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = matmul.allow_tf32, cudnn.allow_tf32
    matmul.allow_tf32 = cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = before


@contextmanager
def exact_float32(device: torch.device) -> Iterator[None]:
    """IEEE float32 on ``device`` inside the block, whatever the caller's autocast (bf16) or
    TF32 setting: the router's class scores reach thousands of nats and differ by a few, and
    its statistics are built in float32, so features and scores must be float32 too."""
    with torch.autocast(device.type, enabled=False), cuda_tf32(False):
        yield


class PixelFeatures(nn.Module):
    """The (already normalised) pixels, flattened: the baseline feature space."""

    def out_features(self, input_shape: Sequence[int]) -> int:
        return math.prod(input_shape)

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1)


class RandomConvFeatures(nn.Module):
    """A random convolution, max-pool, ReLU: better separated classes than the pixels.

    The weights are N(0, 1) / kernel from a generator seeded with ``seed`` and the bias is 0. They
    are rebuilt from the constructor's arguments instead of saved: the state_dict holds only those
    arguments, and loading checks that they match.
    """

    layouts = LAYOUTS

    def __init__(
        self, in_channels: int, channels: int = 16, kernel: int = 5, pool: int = 2, seed: int = 0
    ) -> None:
        super().__init__()
        if min(in_channels, channels, kernel, pool) < 1:
            raise ValueError("in_channels, channels, kernel and pool must be >= 1")
        self.in_channels, self.channels, self.kernel = in_channels, channels, kernel
        self.pool, self.seed = pool, seed
        generator = torch.Generator().manual_seed(seed)
        weight = torch.randn(channels, in_channels, kernel, kernel, generator=generator) / kernel
        self.register_buffer("weight", weight, persistent=False)

    def out_features(self, input_shape: Sequence[int]) -> int:
        channels, height, width = input_shape
        if channels != self.in_channels:
            raise ValueError(f"input has {channels} channels, expected {self.in_channels}")
        side = [(size - self.kernel + 1) // self.pool for size in (height, width)]
        return self.channels * side[0] * side[1]

    def forward(self, x: Tensor) -> Tensor:
        # The layouts of the experts' bank: a one-channel input's maps channels-last on the
        # CPU, 2.3x faster here for 96 channels (docs/performance.md); the same features.
        with exact_float32(x.device):
            maps = F.conv2d(self.layouts.conv_input(x.float(), self.channels), self.weight)
            pooled = self.layouts.max_pool(maps, partial(F.max_pool2d, kernel_size=self.pool))
            return F.relu(pooled).flatten(1)

    def get_extra_state(self) -> dict:
        return {"in_channels": self.in_channels, "channels": self.channels,
                "kernel": self.kernel, "pool": self.pool, "seed": self.seed}

    def set_extra_state(self, state: dict) -> None:
        if state != self.get_extra_state():
            raise ValueError(
                f"random conv features saved as {state}, this module is {self.get_extra_state()}"
            )


def trunk_features(network: nn.Sequential, x: Tensor) -> Tensor:
    """A gate network's layers up to its first Flatten, flattened: the ``gate_trunk`` feature
    space, a fixed map once the network is frozen (in float32, :func:`exact_float32`)."""
    with exact_float32(x.device):
        x = x.float()
        for layer in itertools.takewhile(lambda m: not isinstance(m, nn.Flatten), network):
            x = layer(x)
        return x.flatten(1)


class ClassStatistics(nn.Module):
    """Streaming class counts, means and pooled within-class scatter (float64), and the shrunk
    linear discriminant they define.

    Scores are the Gaussian log-likelihoods with a shared covariance, up to a term common to all
    classes: x^T W_k + b_k with W = (S / (N - K_seen) + shrinkage * I)^-1 mu_k and
    b_k = -1/2 mu_k^T W_k. Priors are equal (the class counts are an artefact of the stream), and
    classes never seen score -inf. W and b are solved once per change and cached.
    ``relative_shrinkage``: the shrinkage is scaled by the covariance's mean diagonal (SEED's
    expert spaces, whose scale is learnt, so a fixed ridge would mean something different in
    each; 1 while the statistics have no spread yet).
    """

    def __init__(self, num_classes: int, num_features: int, shrinkage: float = 1e-4, *,
                 relative_shrinkage: bool = False) -> None:
        super().__init__()
        if num_classes < 1 or num_features < 1:
            raise ValueError("num_classes and num_features must be >= 1")
        if not shrinkage > 0:
            raise ValueError(f"shrinkage must be > 0 (keeps the covariance invertible), "
                             f"got {shrinkage}")
        self.num_classes, self.num_features, self.shrinkage = num_classes, num_features, shrinkage
        self.relative_shrinkage = relative_shrinkage
        wide = torch.float64
        self.register_buffer("counts", torch.zeros(num_classes, dtype=wide))
        self.register_buffer("means", torch.zeros(num_classes, num_features, dtype=wide))
        self.register_buffer("scatter", torch.zeros(num_features, num_features, dtype=wide))
        self.register_buffer("weights", torch.zeros(num_features, num_classes), persistent=False)
        self.register_buffer("bias", torch.zeros(num_classes), persistent=False)
        self._stale = True  # weights and bias need solving again

    @property
    def seen_classes(self) -> Tensor:
        """[K] bool: the classes with at least one sample."""
        return self.counts > 0

    @property
    def nbytes(self) -> int:
        """Bytes of the saved statistics (the cached discriminant is not counted)."""
        return sum(t.numel() * t.element_size() for t in (self.counts, self.means, self.scatter))

    def _check_features(self, features: Tensor) -> None:
        if features.dim() != 2 or features.shape[1] != self.num_features:
            raise ValueError(f"features must have shape [batch, {self.num_features}], "
                             f"got {list(features.shape)}")

    @torch.no_grad()
    def update(self, features: Tensor, labels: Tensor) -> None:
        """Merge a batch (any classes, any device) into the statistics.

        Each class's batch is merged as in Chan et al.: scatter += S_batch + n0 n1 / (n0 + n1)
        delta delta^T, with delta the difference of the means. The merge is exact, so any split
        of the data into batches, in any order, gives the same statistics.
        """
        self._check_features(features)
        if labels.shape != features.shape[:1]:
            raise ValueError(f"labels must have shape [{features.shape[0]}], "
                             f"got {list(labels.shape)}")
        if labels.numel() == 0:
            return
        if int(labels.min()) < 0 or int(labels.max()) >= self.num_classes:
            raise ValueError(f"labels must be in [0, {self.num_classes})")
        x = features.to(self.means.device, torch.float64)
        labels = labels.to(self.means.device)
        batch_counts = torch.bincount(labels, minlength=self.num_classes).to(torch.float64)
        batch_means = torch.zeros_like(self.means).index_add_(0, labels, x)
        batch_means /= batch_counts.clamp(min=1)[:, None]
        centred = x - batch_means[labels]
        present = batch_counts > 0
        delta = (batch_means - self.means)[present]
        old, new = self.counts[present], batch_counts[present]
        self.scatter.addmm_(centred.T, centred)  # the batch's own within-class scatter
        self.scatter.addmm_(delta.T * (old * new / (old + new)), delta)
        self.means[present] += delta * (new / (old + new))[:, None]
        self.counts += batch_counts
        self._stale = True

    @torch.no_grad()
    def _solve(self) -> None:
        seen = self.seen_classes
        degrees_of_freedom = (self.counts.sum() - seen.sum()).clamp(min=1)
        covariance = self.scatter / degrees_of_freedom
        scale = float(covariance.diagonal().mean()) if self.relative_shrinkage else 1.0
        covariance.diagonal().add_(self.shrinkage * (scale or 1.0))
        weights = torch.cholesky_solve(self.means.T, torch.linalg.cholesky(covariance))
        bias = -0.5 * (self.means * weights.T).sum(1)
        # Unseen classes have mean 0, so weights 0: the bias alone makes their score -inf.
        self.weights.copy_(weights)
        self.bias.copy_(bias.masked_fill(~seen, -math.inf))
        self._stale = False

    def log_likelihoods(self, features: Tensor) -> Tensor:
        """[B, K] class scores (float32, on the statistics' device, :func:`exact_float32`);
        -inf for unseen classes."""
        self._check_features(features)
        if self._stale:
            self._solve()
        x = features.to(self.weights.device, self.weights.dtype)
        with exact_float32(x.device):
            return torch.addmm(self.bias, x, self.weights)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._stale = True


def experience_log_posterior(
    class_log_posterior: Tensor, class_experience: Tensor, num_experiences: int
) -> Tensor:
    """[B, T] log-probability of each experience: a logsumexp over the experience's classes.

    ``class_experience`` [K] (long) gives each class's experience, -1 for classes not seen yet.
    The result is normalised over the experiences, so class log-likelihoods with equal priors may
    be passed as they are; experiences without classes get -inf.
    """
    num_classes = class_log_posterior.shape[-1]
    if class_log_posterior.dim() != 2 or class_experience.shape != (num_classes,):
        raise ValueError(f"expected class_log_posterior [B, K] and class_experience [K], got "
                         f"{list(class_log_posterior.shape)} and {list(class_experience.shape)}")
    if int(class_experience.min()) < -1 or int(class_experience.max()) >= num_experiences:
        raise ValueError(f"class_experience must be in [-1, {num_experiences})")
    experiences = torch.arange(num_experiences, device=class_experience.device)
    member = class_experience[None, :] == experiences[:, None]  # [T, K]
    scores = class_log_posterior[:, None, :].masked_fill(~member, -math.inf)
    return torch.log_softmax(torch.logsumexp(scores, dim=-1), dim=-1)
