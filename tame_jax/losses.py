"""The TAME training objective (DESIGN.md §1, "Training objective").

Axes: B is the global batch, b the local (per-device) batch, S the attention-map size, K the
number of classes. The attention maps of the batch's label list are kept as (b, S, S, B):
entry [i, :, :, j] is the map of local image i for the class L[j] (L = global label list).
DESIGN's M (B, B, S, S) is this array gathered over devices and transposed; every sum below is
the same sum over all of M.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from tame_jax.image_ops import resize_bilinear


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The objective's coefficients (config.loss); the defaults are the paper's.

    loss = ce * L_CE + area * L_area + variation * L_var, with L_area = mean((M + area_eps) **
    area_power) and L_var = (TV + border * border lines) / (2B) over the B x B maps M.
    variation_reference_batch = N > 0 multiplies L_var by N / B: L_var sums B^2 maps over 2B,
    so it grows linearly with the global batch B; scaled, it weighs per image at any batch what
    it weighs at batch N (the paper's runs: 32). 0 keeps the paper's formula as it is.
    """

    ce: float = 1.5
    area: float = 2.0
    variation: float = 0.01
    area_power: float = 0.3
    area_eps: float = 0.0005
    border: float = 0.3
    variation_reference_batch: int = 0

    @classmethod
    def from_config(cls, loss: Mapping[str, Any] | None) -> LossConfig:
        """Returns the coefficients of a config's `loss` section (defaults where absent)."""
        if loss is None:
            return cls()
        # Other fields of config.loss (options of the step, not coefficients) are not read here.
        names = [f.name for f in dataclasses.fields(cls)]
        out = cls(**{k: type(getattr(cls(), k))(loss[k]) for k in names if k in loss})
        if out.variation_reference_batch < 0:
            raise ValueError(f"config.loss.variation_reference_batch="
                             f"{out.variation_reference_batch}: use 0 (off) or a batch size "
                             "such as 32 (the paper's)")
        return out


PAPER = LossConfig()


MASK_SPACES = ("pixels", "normalized")


def mask_images(x: jax.Array, own_maps: jax.Array,
                fill: Sequence[float] | None = None) -> jax.Array:
    """Returns x (B, H, W, 3) in [0, 1] multiplied by own_maps (B, S, S) upsampled to (H, W).

    The upsampling is bilinear with half-pixel centres (PyTorch align_corners=False). With
    `fill` (a colour), masking pulls pixels towards it instead of 0: fill + (x - fill) * map.
    fill = the model's mean is T-TAME's masking of the normalised input, since
    norm(mean + (x - mean) m) = norm(x) m.
    """
    _, h, w, _ = x.shape
    up = resize_bilinear(own_maps[..., None].astype(x.dtype), (h, w))  # (B, H, W, 1)
    if fill is None:
        return x * up
    fill = jnp.asarray(fill, x.dtype)
    return fill + (x - fill) * up


def area_sum(maps: jax.Array, eps: float = PAPER.area_eps, power: float = PAPER.area_power
             ) -> jax.Array:
    """Returns the float32 sum of (M + eps)^power (paper: 0.0005, 0.3) over all elements."""
    maps = maps.astype(jnp.float32)
    return jnp.sum((maps + eps) ** power)


def variation_sum(maps: jax.Array, border_coef: float = PAPER.border) -> jax.Array:
    """Returns the float32 total-variation-plus-border sum of maps (..., S, S), unnormalised.

    Σ (M[.., i+1, j] - M[.., i, j])² + Σ (M[.., i, j+1] - M[.., i, j])²
    + border_coef · (Σ M[.., 0, :]² + Σ M[.., -1, :]² + Σ M[.., :, 0]² + Σ M[.., :, -1]²):
    the four border lines are summed separately, so each corner counts twice (paper: 0.3).
    """
    m = maps.astype(jnp.float32)
    tv = jnp.sum(jnp.square(m[..., 1:, :] - m[..., :-1, :]))
    tv = tv + jnp.sum(jnp.square(m[..., :, 1:] - m[..., :, :-1]))
    sq = jnp.square(m)
    border = (
        jnp.sum(sq[..., 0, :])
        + jnp.sum(sq[..., -1, :])
        + jnp.sum(sq[..., :, 0])
        + jnp.sum(sq[..., :, -1])
    )
    return tv + border_coef * border


def tame_objective(
    x: jax.Array,
    attention_maps: jax.Array,
    labels: jax.Array,
    offset: int | jax.Array,
    classify: Callable[[jax.Array], jax.Array],
    axis_name: str | None = None,
    mask_fill: Sequence[float] | None = None,
    coefs: LossConfig = PAPER,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns (total loss, {'loss', 'ce', 'area', 'variation', 'agreement'}) of the global batch.

    x: (b, H, W, 3) local images in [0, 1].
    attention_maps: (b, S, S, B) sigmoid attention maps; [i, :, :, j] is local image i's map
      for class labels[j].
    labels: (B,) int, the global model-truth label list L in batch order (duplicates kept).
    offset: global index of the first local image (Python int or traced scalar); the own map
      of local image i is attention_maps[i, :, :, offset + i] and its label labels[offset + i].
    classify: maps masked images (b, H, W, 3) in [0, 1] to logits (b, K); it normalises itself.
    axis_name: inside shard_map, the batch mesh axis; the sums are psum'ed over it so that all
      returned values are global-batch values, identical on every device.
    mask_fill: the colour a masked pixel takes (`mask_images`); None = black (TAME).

    coefs: the coefficients (`LossConfig`, config.loss; default the paper's).

    ce = Σ_b CE / B, area = Σ (M + 0.0005)^0.3 / (B·B·S·S), variation = variation_sum(M) / (2B)
    (times R / B with coefs.variation_reference_batch = R > 0), loss = 1.5 ce + 2 area + 0.01
    variation, agreement = fraction of images whose masked-image argmax equals its label.
    """
    b, s1, s2, n_maps = attention_maps.shape
    big_b = labels.shape[0]
    if n_maps != big_b:
        raise ValueError(
            f"attention_maps has {n_maps} class maps per image but labels has {big_b} entries; "
            "pass the maps of the global label list, (b, S, S, B)."
        )
    if x.shape[0] != b:
        raise ValueError(f"x has {x.shape[0]} images but attention_maps has {b}.")
    if axis_name is None and b != big_b:
        raise ValueError(
            f"Local batch {b} != global batch {big_b} without axis_name; pass the mesh axis "
            "name when calling inside shard_map."
        )
    maps = attention_maps.astype(jnp.float32)
    idx = offset + jnp.arange(b)  # (b,) global indices of the local images
    own = maps[jnp.arange(b), :, :, idx]  # (b, S, S)
    own_labels = jnp.take(labels, idx, axis=0)  # (b,)

    logits = classify(mask_images(x, own, mask_fill)).astype(jnp.float32)  # (b, K)
    logp = jax.nn.log_softmax(logits, axis=-1)
    ce_sum = -jnp.sum(jnp.take_along_axis(logp, own_labels[:, None], axis=-1))
    agree = jnp.sum((jnp.argmax(logits, axis=-1) == own_labels).astype(jnp.float32))
    area = area_sum(maps, coefs.area_eps, coefs.area_power)
    var = variation_sum(jnp.moveaxis(maps, -1, 1), coefs.border)  # (b, B, S, S)

    sums = (ce_sum, area, var, agree)
    if axis_name is not None:
        sums = jax.lax.psum(sums, axis_name)
    ce_sum, area, var, agree = sums
    ce = ce_sum / big_b
    area = area / (big_b * big_b * s1 * s2)
    var = var / (2 * big_b)
    if coefs.variation_reference_batch:  # B^2 maps over 2B: per image, as at batch R
        var = var * (coefs.variation_reference_batch / big_b)
    loss = coefs.ce * ce + coefs.area * area + coefs.variation * var
    return loss, {
        "loss": loss,
        "ce": ce,
        "area": area,
        "variation": var,
        "agreement": agree / big_b,
    }
