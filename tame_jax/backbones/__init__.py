"""Backbone registry: torchvision ResNets, VGGs and ViTs and EfficientNet-Lite0/1/2 as pure Flax
modules (NHWC), and the `register_backbone` entry point for others (see `BackboneSpec`).

Layer names are those of the PyTorch state dicts (`layer4`, `features.30`, `_blocks.15`, ...).
Every returned feature map passes through a perturbation named `perturb_name(layer)` in the
'perturbations' collection, so gradients w.r.t. feature maps are `jax.grad` w.r.t. those (zero)
variables.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tame_jax.backbones import efficientnet, resnet, vgg, vit  # noqa: F401  (each registers)
from tame_jax.backbones.common import (
    BACKBONES,
    BackboneSpec,
    check_layers,
    get_spec,
    perturb_name,
    register_backbone,
    tap,
)
from tame_jax.backbones.vgg import adaptive_avg_pool

__all__ = [
    "BACKBONES",
    "BackboneSpec",
    "adaptive_avg_pool",
    "build_backbone",
    "get_spec",
    "init_backbone",
    "perturb_name",
    "register_backbone",
    "tap",
]


def build_backbone(
    name: str,
    *,
    num_classes: int = 1000,
    layers: Sequence[str] | None = None,
    dtype: Any = jnp.float32,
    **kwargs: Any,
) -> nn.Module:
    """Returns the Flax module of backbone `name` returning logits and the given layers.

    layers=None means the spec's default (TAME) layers. kwargs go to the module: `width`
    (ResNet base width, torchvision 64), `bn_axis_name` (sync BatchNorm in train mode),
    `dropout_rate` (VGG, 0.5), `patch_size`/`num_layers`/`num_heads`/`hidden_dim`/`mlp_dim` (ViT).
    """
    spec = get_spec(name)
    layers = spec.default_layers if layers is None else check_layers(name, layers,
                                                                      spec.layer_names)
    return spec.build(num_classes=num_classes, layers=tuple(layers), dtype=dtype, **kwargs)


def init_backbone(module: nn.Module, rng: jax.Array, image_size: int) -> dict:
    """Returns randomly initialised {'params', 'batch_stats'} of a registered backbone module,
    with its family's initialisation scales (no perturbations)."""
    return get_spec(module.arch).init(module, rng, image_size)
