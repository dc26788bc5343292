"""Pictures: heat-map overlays of explanation maps, and grids of images x methods."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_overlay(ax: Any, image: np.ndarray, heat: np.ndarray, title: str = "",
                 colorbar: bool = True) -> None:
    """Draws heat (H, W) in [0, 1] over image (H, W, 3) on a matplotlib axis."""
    ax.imshow(image)
    im = ax.imshow(heat, cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    if colorbar:
        ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)


def write_overlay(path: str, image: np.ndarray, maps: Sequence[np.ndarray],
                  titles: Sequence[str]) -> None:
    """Writes one PNG with a panel (overlay + colour bar) per map."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(maps), figsize=(4.2 * len(maps), 4), squeeze=False)
    for ax, heat, title in zip(axes[0], maps, titles, strict=True):
        draw_overlay(ax, image, heat, title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_grid(path: str, images: np.ndarray, maps: Mapping[str, np.ndarray],
               titles: Sequence[str], boxes: np.ndarray | None = None) -> None:
    """Writes a grid: a row per image (titled, its box in green), then a column per method.

    images (N, H, W, 3) in [0, 1]; maps {method: (N, H, W)}; boxes (N, 4) as
    (ymin, xmin, ymax, xmax) pixels, or None.
    """
    import matplotlib.patches as patches

    plt = _pyplot()
    n, methods = len(images), list(maps)
    fig, axes = plt.subplots(n, len(methods) + 1, figsize=(2.2 * (len(methods) + 1), 2.3 * n),
                             squeeze=False)
    for i in range(n):
        ax = axes[i, 0]
        ax.imshow(images[i])
        ax.set_title(titles[i], fontsize=8)
        ax.axis("off")
        if boxes is not None:
            y0, x0, y1, x1 = boxes[i]
            ax.add_patch(patches.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False,
                                           edgecolor="lime", linewidth=1.5))
        for j, m in enumerate(methods):
            draw_overlay(axes[i, j + 1], images[i], maps[m][i], m if i == 0 else "",
                         colorbar=False)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
