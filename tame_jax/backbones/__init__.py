"""Backbone registry: torchvision ResNets and VGGs as pure Flax modules (NHWC).

Each module's `apply(variables, x_normalised, train=False)` returns
`(logits (B, K) float32, {layer name: feature map (B, h, w, C)})`, with layer names as in
torchvision (`layer4`, `features.30`, ...). Every returned map passes through a perturbation
named `perturb_name(layer)` in the 'perturbations' collection, so gradients w.r.t. feature maps
are `jax.grad` w.r.t. those (zero) variables.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tame_jax.backbones.resnet import (
    RESNET_CONFIGS,
    ResNet,
    check_layers,
    perturb_name,
    resnet_layer_names,
)
from tame_jax.backbones.vgg import (
    VGG,
    VGG_CFGS,
    adaptive_avg_pool,
    vgg_layer_names,
    vgg_pool_layers,
)

__all__ = [
    "BACKBONES",
    "BackboneSpec",
    "ResNet",
    "VGG",
    "adaptive_avg_pool",
    "build_backbone",
    "get_spec",
    "init_backbone",
    "perturb_name",
]


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """A registered backbone: its constructor, default TAME layers and valid layer names."""

    name: str  # e.g. "resnet50"
    default_layers: tuple[str, ...]  # TAME's layers (DESIGN section 1)
    layer_names: tuple[str, ...]  # every name that can be requested, in forward order
    family: str  # "resnet" or "vgg"
    module_cls: Callable[..., nn.Module]

    def build(self, **kwargs: Any) -> nn.Module:
        """Returns the Flax module (kwargs: num_classes, layers, dtype, width, ...)."""
        return self.module_cls(arch=self.name, **kwargs)

    def convert(self, state_dict: Mapping[str, Any], template: dict) -> dict:
        """Returns Flax variables like `template` filled from a torchvision/timm state dict."""
        from tame_jax.weights import torchvision_to_flax

        return torchvision_to_flax(self.name, state_dict, template)


def _registry() -> dict[str, BackboneSpec]:
    specs = {}
    for name, (_, stages) in RESNET_CONFIGS.items():
        specs[name] = BackboneSpec(name, ("layer2", "layer3", "layer4"),
                                   resnet_layer_names(stages), "resnet", ResNet)
    for base in VGG_CFGS:
        for name in (base, base + "_bn"):
            specs[name] = BackboneSpec(name, vgg_pool_layers(name), vgg_layer_names(name),
                                       "vgg", VGG)
    return specs


BACKBONES: dict[str, BackboneSpec] = _registry()


def get_spec(name: str) -> BackboneSpec:
    """Returns the registered spec of backbone `name`; ValueError listing valid names if none."""
    if name not in BACKBONES:
        raise ValueError(
            f"Unknown backbone {name!r}. Valid backbones: {', '.join(BACKBONES)}"
        )
    return BACKBONES[name]


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
    `dropout_rate` (VGG, 0.5).
    """
    spec = get_spec(name)
    layers = spec.default_layers if layers is None else check_layers(name, layers,
                                                                      spec.layer_names)
    return spec.build(num_classes=num_classes, layers=tuple(layers), dtype=dtype, **kwargs)


def init_backbone(module: nn.Module, rng: jax.Array, image_size: int) -> dict:
    """Returns randomly initialised {'params': ..., 'batch_stats': ...} (no perturbations)."""
    x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    variables = jax.jit(lambda r: module.init(r, x, train=False))(rng)
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
