"""Matplotlib figures a researcher would rather look at than read."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from moe_cl.storage.run_folder import atomic_write  # noqa: E402


def expert_class_heatmap(
    counts: Sequence[Sequence[float]],
    *,
    title: str = "samples routed to each expert",
    class_names: Sequence[str] | None = None,
) -> Figure:
    """Expert x class matrix (rows: classes, columns: experts), each class row normalised."""
    matrix = np.asarray(counts, dtype=float)
    shares = matrix / np.clip(matrix.sum(1, keepdims=True), 1e-12, None)
    k, m = shares.shape
    fig, ax = plt.subplots(figsize=(1.2 + 0.35 * m, 1.0 + 0.3 * k), dpi=100)
    image = ax.imshow(shares, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xlabel("expert")
    ax.set_ylabel("class")
    ax.set_xticks(range(m))
    ax.set_yticks(range(k))
    if class_names is not None:
        ax.set_yticklabels(class_names, fontsize=6)
    ax.tick_params(labelsize=6)
    ax.set_title(title, fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.05, label="share of the class")
    fig.tight_layout()
    return fig


def heatmaps_side_by_side(matrices: dict[str, Sequence[Sequence[float]]]) -> Figure:
    """Expert x class heatmaps of several models next to each other (e.g. the paper's
    original MoE against attentive gate + L_s)."""
    fig, axes = plt.subplots(1, len(matrices), figsize=(3.2 * len(matrices), 3.4), dpi=100,
                             squeeze=False)
    for ax, (title, counts) in zip(axes[0], matrices.items(), strict=True):
        matrix = np.asarray(counts, dtype=float)
        shares = matrix / np.clip(matrix.sum(1, keepdims=True), 1e-12, None)
        ax.imshow(shares, cmap="viridis", vmin=0, vmax=1, aspect="auto")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("expert")
        ax.set_ylabel("class")
        ax.set_xticks(range(shares.shape[1]))
        ax.set_yticks(range(shares.shape[0]))
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return fig


def accuracy_matrix_figure(matrix: Sequence[Sequence[float]]) -> Figure:
    """Row i: accuracy on each test experience after training experience i."""
    data = np.asarray(matrix, dtype=float)
    n_rows, n_cols = data.shape
    fig, ax = plt.subplots(figsize=(1.5 + 0.6 * n_cols, 1.2 + 0.5 * n_rows), dpi=100)
    ax.imshow(data, cmap="magma", vmin=0, vmax=1)
    for i in range(n_rows):
        for j in range(n_cols):
            ax.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if data[i, j] < 0.6 else "black")
    ax.set_xlabel("test experience")
    ax.set_ylabel("after training experience")
    ax.set_xticks(range(n_cols))
    ax.set_yticks(range(n_rows))
    ax.set_title("accuracy matrix", fontsize=9)
    fig.tight_layout()
    return fig


def expert_usage_figure(usages: Sequence[Sequence[float]]) -> Figure:
    """Expert usage (mean gate value on the test stream) after each training experience."""
    rows = len(usages)
    width = max((len(u) for u in usages), default=1)
    data = np.full((rows, width), np.nan)
    for i, usage in enumerate(usages):
        data[i, : len(usage)] = usage
    fig, ax = plt.subplots(figsize=(1.5 + 0.4 * width, 1.2 + 0.45 * rows), dpi=100)
    image = ax.imshow(data, cmap="viridis", vmin=0, aspect="auto")
    ax.set_xlabel("expert")
    ax.set_ylabel("after training experience")
    ax.set_xticks(range(width))
    ax.set_yticks(range(rows))
    ax.set_title("expert usage (blank: not yet added)", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.05)
    fig.tight_layout()
    return fig


def figure_to_image_tensor(fig: Figure) -> torch.Tensor:
    """RGB [3, H, W] uint8 tensor of a figure (for TensorBoard images); closes the figure."""
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    plt.close(fig)
    return torch.from_numpy(rgba[..., :3].copy()).permute(2, 0, 1)


def save_figure(fig: Figure, path: Path) -> None:
    """Write a PNG whole or not at all (run_folder.atomic_write: a killed run never leaves half
    an image, two writers never share a temporary file, a full disk is a NoSpaceError)."""
    try:
        atomic_write(path, lambda handle: fig.savefig(handle, format="png"))
    finally:
        plt.close(fig)
