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
import numpy as np
from flax import traverse_util

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


def _leaf_std(path: tuple[str, ...], shape: tuple[int, ...], is_vgg: bool) -> float:
    """Returns the std of a kernel's normal init as in torchvision (0 for non-kernels)."""
    if path[-1] != "kernel":
        return 0.0
    if len(shape) == 4:  # conv HWIO: kaiming_normal_(mode="fan_out", nonlinearity="relu")
        return float(np.sqrt(2.0 / (shape[0] * shape[1] * shape[3])))
    # linear (in, out): VGG normal(0, 0.01); ResNet fc: std of uniform(+-1/sqrt(in))
    return 0.01 if is_vgg else float(1.0 / np.sqrt(3.0 * shape[0]))


def init_backbone(module: nn.Module, rng: jax.Array, image_size: int) -> dict:
    """Returns randomly initialised {'params': ..., 'batch_stats': ...} (no perturbations).

    Kernels get torchvision's init scales, biases 0, BatchNorm scale 1 / mean 0 / var 1. All
    random numbers come from one `jax.random.normal` call, which compiles in seconds where
    `module.init` compiles one generator per parameter (minutes for ResNet-50 on a small CPU).
    """
    x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), x, train=False))
    shapes = {"params": shapes["params"], "batch_stats": shapes.get("batch_stats", {})}
    flat = traverse_util.flatten_dict(shapes)
    is_vgg = isinstance(module, VGG)
    stds = {path: _leaf_std(path, s.shape, is_vgg) for path, s in flat.items()}
    kernels = [path for path in flat if stds[path] > 0]
    total = sum(int(np.prod(flat[p].shape)) for p in kernels)

    @jax.jit
    def fill(key: jax.Array) -> dict:
        noise, offset, out = jax.random.normal(key, (total,), jnp.float32), 0, {}
        for path, spec in flat.items():
            if stds[path] > 0:
                size = int(np.prod(spec.shape))
                out[path] = noise[offset:offset + size].reshape(spec.shape) * stds[path]
                offset += size
            else:  # BatchNorm scale / running var 1, biases / running mean 0
                one = path[-1] in ("scale", "var")
                out[path] = jnp.full(spec.shape, 1.0 if one else 0.0, spec.dtype)
        return out

    variables = traverse_util.unflatten_dict(fill(rng))
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
