"""Pictures: heat-map overlays of explanation maps, and grids of images x methods.

`overlay` is the fast path (a colour lookup table and a blend in NumPy, no matplotlib figure):
what `explain` writes for every image. The matplotlib functions draw the demo's grids.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# matplotlib's "jet" (its segment data: (x, value) per channel), so that jet needs no matplotlib
_JET = (
    ((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),
    ((0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)),
    ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)),
)


@functools.cache
def colormap_lut(name: str = "jet") -> np.ndarray:
    """Returns the colour map as a (256, 3) uint8 lookup table (any matplotlib name; jet is
    built in)."""
    x = np.linspace(0.0, 1.0, 256)
    if name == "jet":
        rgb = np.stack([np.interp(x, *zip(*seg, strict=True)) for seg in _JET], axis=-1)
    else:
        import matplotlib

        if name not in matplotlib.colormaps:
            raise ValueError(f"unknown colormap {name!r}; e.g. jet, viridis, inferno, turbo")
        rgb = matplotlib.colormaps[name](x)[:, :3]
    return np.round(rgb * 255.0).astype(np.uint8)


def overlay(image: Any, heat: np.ndarray, colormap: str = "jet", alpha: float = 0.5
            ) -> np.ndarray:
    """Returns the heat map drawn over the image: (H, W, 3) uint8.

    image (H, W, 3) uint8, or float in [0, 1], or a PIL image; heat (H, W) in [0, 1] (NaN:
    pixel left as it is, e.g. outside the region the model saw); alpha: the heat map's weight.
    Colours come from a 256-entry lookup table, as matplotlib maps a value v to entry
    floor(256 v).
    """
    img = np.asarray(image.convert("RGB")) if hasattr(image, "convert") else np.asarray(image)
    heat = np.asarray(heat, np.float32)
    if img.ndim != 3 or img.shape[-1] != 3 or heat.shape != img.shape[:2]:
        raise ValueError(f"overlay needs image (H, W, 3) and heat (H, W) of the same size; got "
                         f"{img.shape} and {heat.shape} (explain's maps on the full image come "
                         "from tame_jax.inputs.map_to_original)")
    if img.dtype != np.uint8:
        img = np.round(np.clip(img.astype(np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)
    nan = np.isnan(heat)
    idx = np.clip(np.nan_to_num(heat) * 256.0, 0, 255).astype(np.intp)
    colour = colormap_lut(colormap)[idx]  # (H, W, 3)
    out = img.astype(np.float32) * (1.0 - alpha) + colour.astype(np.float32) * alpha
    out = np.round(out).astype(np.uint8)
    if nan.any():
        out[nan] = img[nan]
    return out


def captioned(panel: np.ndarray, text: str) -> np.ndarray:
    """Returns panel (H, W, 3) uint8 with a white caption line above it."""
    from PIL import Image, ImageDraw

    height = 14
    canvas = Image.new("RGB", (panel.shape[1], panel.shape[0] + height), "white")
    canvas.paste(Image.fromarray(panel), (0, height))
    ImageDraw.Draw(canvas).text((2, 1), text, fill="black")
    return np.asarray(canvas)


def write_panels(path: str, panels: Sequence[np.ndarray], captions: Sequence[str] = ()
                 ) -> None:
    """Writes panels (each (H, W, 3) uint8, same H) side by side as one image file."""
    from PIL import Image

    if captions:
        panels = [captioned(p, c) for p, c in zip(panels, captions, strict=True)]
    gap = np.full((panels[0].shape[0], 4, 3), 255, np.uint8)
    row = np.concatenate([x for p in panels for x in (p, gap)][:-1], axis=1)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    Image.fromarray(row).save(path, compress_level=1)  # fast; ~2x larger than level 6


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
