"""VGG-11/13/16/19 with and without BatchNorm in Flax Linen, torchvision layout."""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from tame_jax import weights
from tame_jax.backbones.common import (
    CONV_INIT,
    PAD1,
    BackboneSpec,
    FeatureTaps,
    batch_norm,
    check_layers,
    kaiming_fan_out_std,
    max_pool,
    random_init,
    register_backbone,
)

VGG_CFGS: dict[str, tuple[int | str, ...]] = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg13": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"),
    "vgg19": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"),
}


def _feature_kinds(arch: str) -> list[str]:
    """Returns the kind ('conv', 'bn', 'relu', 'pool') of each torchvision `features.N`."""
    cfg, batch_norm = VGG_CFGS[arch.removesuffix("_bn")], arch.endswith("_bn")
    kinds: list[str] = []
    for v in cfg:
        kinds += ["pool"] if v == "M" else ["conv"] + ["bn"] * batch_norm + ["relu"]
    return kinds


def vgg_layer_names(arch: str) -> tuple[str, ...]:
    """Returns every requestable layer name of a VGG: features.0 ... features.N, avgpool."""
    return tuple(f"features.{i}" for i in range(len(_feature_kinds(arch)))) + ("avgpool",)


def vgg_pool_layers(arch: str) -> tuple[str, ...]:
    """Returns the names of the outputs of pool3, pool4 and pool5 (TAME's default layers)."""
    pools = [i for i, kind in enumerate(_feature_kinds(arch)) if kind == "pool"]
    return tuple(f"features.{i}" for i in pools[2:])


def adaptive_pool_matrix(size: int, out: int) -> np.ndarray:
    """Returns the (out, size) averaging matrix of torch's adaptive_avg_pool along one axis.

    Bin i averages input rows floor(i * size / out) .. ceil((i + 1) * size / out) - 1.
    """
    mat = np.zeros((out, size), np.float32)
    for i in range(out):
        start, end = (i * size) // out, -((-(i + 1) * size) // out)
        mat[i, start:end] = 1.0 / (end - start)
    return mat


def adaptive_avg_pool(x: jnp.ndarray, out_hw: tuple[int, int]) -> jnp.ndarray:
    """Returns torch AdaptiveAvgPool2d(out_hw) of x (B, H, W, C) -> (B, oh, ow, C)."""
    h, w = x.shape[1:3]
    if (h, w) == tuple(out_hw):
        return x
    ph = jnp.asarray(adaptive_pool_matrix(h, out_hw[0]), x.dtype)  # (oh, H)
    pw = jnp.asarray(adaptive_pool_matrix(w, out_hw[1]), x.dtype)  # (ow, W)
    return jnp.einsum("ih,bhwc,jw->bijc", ph, x, pw)


class VGG(nn.Module):
    """torchvision VGG; `__call__` returns (logits (B, K) float32, {layer: (B, h, w, C)})."""

    arch: str = "vgg16"
    num_classes: int = 1000
    layers: tuple[str, ...] = ("features.16", "features.23", "features.30")
    dtype: Any = jnp.float32
    bn_axis_name: str | None = None
    dropout_rate: float = 0.5

    @nn.compact
    def __call__(
        self, x: jnp.ndarray, train: bool = False
    ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
        """Returns logits (B, K) float32 and the requested feature maps for x (B, H, W, 3).

        train=True uses batch statistics and dropout (needs rngs={'dropout': key}).
        """
        layers = check_layers(self.arch, self.layers, vgg_layer_names(self.arch))
        feats = FeatureTaps(self, layers)
        bn = batch_norm(train, self.dtype, self.bn_axis_name)
        x = jnp.asarray(x, self.dtype)
        channels = iter(v for v in VGG_CFGS[self.arch.removesuffix("_bn")] if v != "M")
        for i, kind in enumerate(_feature_kinds(self.arch)):
            name = f"features_{i}"
            if kind == "conv":
                x = nn.Conv(next(channels), (3, 3), padding=PAD1, dtype=self.dtype,
                            param_dtype=jnp.float32, kernel_init=CONV_INIT, name=name)(x)
            elif kind == "bn":
                x = bn(name=name)(x)
            elif kind == "relu":
                x = nn.relu(x)
            else:
                x = max_pool(x, 2, 2)  # floor, like ceil_mode=False
            x = feats(f"features.{i}", x)
        x = feats("avgpool", adaptive_avg_pool(x, (7, 7)))  # (B, 7, 7, 512)
        # Flatten in torchvision's (C, H, W) order so classifier.0 imports unchanged.
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)  # (B, 512 * 49)
        dense = lambda n, name: nn.Dense(n, dtype=self.dtype, param_dtype=jnp.float32,
                                         kernel_init=nn.initializers.normal(0.01), name=name)
        for name in ("classifier_0", "classifier_3"):
            x = nn.relu(dense(4096, name)(x))
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        logits = dense(self.num_classes, "classifier_6")(x)
        return logits.astype(jnp.float32), {name: feats.maps[name] for name in layers}


def _init_std(path: tuple[str, ...], shape: tuple[int, ...]) -> float:
    """Returns torchvision's VGG init std: kaiming fan-out convs, linear layers N(0, 0.01)."""
    if path[-1] == "kernel" and len(shape) == 2:
        return 0.01
    return kaiming_fan_out_std(path, shape)


# timm's VGG names the classifier pre_logits.fc1/fc2 (as convolutions) and head.fc.
_TIMM_RENAMES = {"pre_logits.fc1.": "classifier.0.", "pre_logits.fc2.": "classifier.3.",
                 "head.fc.": "classifier.6."}


def from_timm(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Returns a timm VGG state dict (pre_logits.fc1/fc2 convs, head.fc) in torchvision naming."""
    out = {}
    for key, value in state_dict.items():
        for old, new in _TIMM_RENAMES.items():
            if key.startswith(old):
                key = new + key[len(old):]
                if key.endswith(".weight") and np.ndim(value) == 4:  # conv -> linear weight
                    value = np.reshape(value, (value.shape[0], -1))
        out[key] = value
    return out


def convert(arch: str, state_dict: Mapping[str, Any], template: Mapping[str, Any]) -> dict:
    """Returns VGG variables from a torchvision or timm (detected by its key names) state dict."""
    if any(k.startswith(tuple(_TIMM_RENAMES)) for k in state_dict):
        state_dict = from_timm(state_dict)
    return weights.torchvision_to_flax(arch, state_dict, template)


for _base in VGG_CFGS:
    for _name in (_base, _base + "_bn"):
        register_backbone(BackboneSpec(
            name=_name,
            build=partial(VGG, arch=_name),
            default_layers=vgg_pool_layers(_name),
            layer_names=vgg_layer_names(_name),
            cam_layer=vgg_pool_layers(_name)[-1],
            init=partial(random_init, init_std=_init_std),
            convert=partial(convert, _name),
        ))
