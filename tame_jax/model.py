"""The frozen backbone and the attention module, built from a config, and the explanation map."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tame_jax import backbones, weights
from tame_jax.attention import TAMEAttention
from tame_jax.image_ops import minmax_normalize, resize_bilinear
from tame_jax.parallel import BATCH_AXIS, backbone_forward

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str) -> Any:
    """Returns the jnp dtype for a config's `model.dtype` name."""
    if name not in DTYPES:
        raise ValueError(f"model.dtype={name!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


@dataclasses.dataclass(frozen=True)
class Model:
    """A frozen backbone with its variables, plus the (untrained) attention module."""

    backbone: nn.Module
    backbone_vars: Any
    attention: TAMEAttention
    layers: tuple[str, ...]
    image_size: int
    backbone_mode: str = "frozen"

    def features(self, images: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        """Returns (logits (B, K), [feature maps of `layers`]) for images in [0, 1]."""
        logits, feats = backbone_forward(self.backbone, self.backbone_vars, images)
        return logits, [feats[name] for name in self.layers]

    def init_attention(self, rng: jax.Array) -> dict[str, Any]:
        """Returns freshly initialised attention variables (params and batch_stats)."""
        shape = (1, self.image_size, self.image_size, 3)
        _, feats = jax.eval_shape(self.features, jax.ShapeDtypeStruct(shape, jnp.float32))
        dummy = [jnp.zeros(f.shape, jnp.float32) for f in feats]
        # BatchNorm's axis_name only matters inside shard_map; init runs outside it.
        module = self.attention.clone(axis_name=None)
        return dict(module.init(rng, dummy, None, train=False))

    def class_maps(self, attention_vars: Any, feats: Sequence[jax.Array],
                   classes: jax.Array) -> jax.Array:
        """Returns the pre-sigmoid maps c[b, :, :, classes[b]]: (B, S, S), one class per image."""
        module = self.attention.clone(axis_name=None)
        return module.apply(attention_vars, list(feats), classes, train=False, per_image=True)

    def explain(self, attention_vars: Any, images: jax.Array,
                classes: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Returns (maps (B, H, W) in [0, 1], classes (B,), logits (B, K)).

        The class is the top-1 prediction unless given; the map is c[..., k] min-max
        normalised per image and bilinearly resized to the image size (DESIGN §1).
        """
        logits, feats = self.features(images)
        if classes is None:
            classes = jnp.argmax(logits, axis=-1)
        c = self.class_maps(attention_vars, feats, classes)
        maps = resize_bilinear(minmax_normalize(c)[..., None], images.shape[1:3])[..., 0]
        return maps, classes, logits


def load_backbone_variables(config: Any, module: nn.Module, rng: jax.Array) -> Any:
    """Returns the backbone's variables from config.model.backbone_weights ("random" = seeded)."""
    template = backbones.init_backbone(module, rng, config.data.image_size)
    path = config.model.backbone_weights
    if path == "random":
        return template
    if not path:
        raise ValueError(
            "config.model.backbone_weights is empty: set it to a local torchvision state dict "
            "(.safetensors, .npz or .pth; see the README section 'Backbone weights'), or to "
            "'random' for a smoke test with untrained weights"
        )
    path = os.path.expanduser(path)
    return weights.load_backbone_weights(config.model.backbone, path, template)


def build_model(config: Any, rng: jax.Array | None = None) -> Model:
    """Returns the Model a config describes, with the backbone weights loaded."""
    rng = jax.random.key(config.seed) if rng is None else rng
    dtype = compute_dtype(config.model.dtype)
    layers = tuple(config.model.layers)
    backbone = backbones.build_backbone(
        config.model.backbone, num_classes=config.model.num_classes, layers=layers, dtype=dtype,
        **dict(config.model.get("backbone_kwargs", {})))
    attention = TAMEAttention(num_classes=config.model.num_classes, variant=config.model.variant,
                              max_size=config.model.max_size, axis_name=BATCH_AXIS, dtype=dtype)
    return Model(backbone=backbone,
                 backbone_vars=load_backbone_variables(config, backbone, rng),
                 attention=attention, layers=layers, image_size=int(config.data.image_size),
                 backbone_mode=config.model.backbone_mode)
