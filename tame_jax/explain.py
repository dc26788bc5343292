"""Explain images: heat-map overlays from the command line, and the `Explainer` Python API.

    python -m tame_jax.explain --workdir=DIR --images a.jpg b.png --out=maps/ [--top_k=3]
    python -m tame_jax.explain --attention=tame_resnet50.pt \
        --backbone_weights=resnet50.safetensors --images a.jpg --class=243 --out=maps/

    explainer = Explainer.from_checkpoint("runs/demo")
    maps = explainer(images)             # (B, H, W) in [0, 1], top-1 class of each image
    maps = explainer(images, classes=k)  # or for chosen classes

Images are resized (shorter side to the config's resize size) and centre-cropped like the
eval pipeline. TensorFlow is not imported here, so the command starts quickly.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Sequence
from importlib import resources
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tame_jax import checkpoints, viz
from tame_jax.config import default_config
from tame_jax.model import Model, build_model


@functools.cache
def imagenet_class_names() -> tuple[str, ...]:
    """Returns the 1000 ImageNet class names in torchvision's order."""
    text = resources.files("tame_jax").joinpath("assets/imagenet_classes.txt").read_text()
    return tuple(line for line in text.splitlines() if line)


def class_names_for(config: Any) -> tuple[str, ...]:
    """Returns the class names of a config: its own list, ImageNet's, or 'class k'."""
    names = config.model.get("class_names", None)
    if names:
        return tuple(names)
    if config.model.num_classes == 1000:
        return imagenet_class_names()
    return tuple(f"class {k}" for k in range(config.model.num_classes))


def load_image(path: str, image_size: int, resize_size: int) -> np.ndarray:
    """Returns the image at path as (image_size, image_size, 3) float32 in [0, 1] (eval crop)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            scale = resize_size / min(w, h)
            if (w, h) != (image_size, image_size):
                new = (max(image_size, round(w * scale)), max(image_size, round(h * scale)))
                im = im.resize(new, Image.BILINEAR)
            w, h = im.size
            left, top = (w - image_size) // 2, (h - image_size) // 2
            im = im.crop((left, top, left + image_size, top + image_size))
            return np.asarray(im, np.float32) / 255.0
    except FileNotFoundError as e:
        raise ValueError(f"{path}: no such file") from e
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"{path}: not a readable image ({e})") from e


class Explainer:
    """Explanation maps of a trained TAME attention module in one compiled call."""

    def __init__(self, config: Any, model: Any, attention_vars: Any):
        self.config = config
        self.model = model
        self.attention_vars = attention_vars
        self.class_names = class_names_for(config)
        self._explain = jax.jit(Model.explain)  # the model is an argument: no baked-in weights

    @classmethod
    def from_checkpoint(cls, workdir: str, step: int | None = None) -> Explainer:
        """Returns the explainer of a training workdir (its config.json and checkpoint)."""
        path = os.path.join(workdir, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: is {workdir} a tame_jax.train workdir?")
        with open(path) as f:
            config = ml_collections.ConfigDict(json.load(f))
        model = build_model(config)
        attention_vars, _ = checkpoints.restore_attention(config, workdir, model, step)
        return cls(config, model, attention_vars)

    @classmethod
    def from_reference_release(cls, path: str, *, backbone: str = "resnet50",
                               backbone_weights: str = "", layers: Sequence[str] | None = None,
                               num_classes: int = 1000, image_size: int = 224,
                               backbone_kwargs: dict | None = None) -> Explainer:
        """Returns the explainer of an attention checkpoint of the reference PyTorch release."""
        from tame_jax import backbones, weights

        config = default_config()
        config.model.backbone = backbone
        config.model.backbone_kwargs = dict(backbone_kwargs or {})
        config.model.layers = tuple(layers or backbones.get_spec(backbone).default_layers)
        config.model.num_classes = num_classes
        config.model.backbone_weights = backbone_weights
        config.data.image_size = image_size
        config.data.resize_size = max(image_size, config.data.resize_size * image_size // 224)
        model = build_model(config)
        template = jax.eval_shape(model.init_attention, jax.random.key(0))
        attention_vars = weights.load_tame_checkpoint(path, template)
        return cls(config, model, attention_vars)

    def explain(self, images: np.ndarray, classes: Sequence[int] | int | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Returns (maps (B, H, W) in [0, 1], classes (B,), probabilities (B, K))."""
        images = np.asarray(images, np.float32)
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be (B, H, W, 3) in [0, 1], got {images.shape}")
        if classes is not None:
            classes = np.broadcast_to(np.asarray(classes, np.int32), images.shape[:1])
            k = self.config.model.num_classes
            if classes.min() < 0 or classes.max() >= k:
                raise ValueError(f"classes must be in [0, {k}), got {classes.tolist()}")
            classes = jnp.asarray(classes)
        maps, cls_, logits = self._explain(self.model, self.attention_vars, jnp.asarray(images),
                                           classes)
        return np.asarray(maps), np.asarray(cls_), np.asarray(jax.nn.softmax(logits, -1))

    def __call__(self, images: np.ndarray, classes: Sequence[int] | int | None = None
                 ) -> np.ndarray:
        """Returns maps (B, H, W) in [0, 1] for the given (default: top-1) classes."""
        return self.explain(images, classes)[0]


def explain_files(explainer: Explainer, paths: Sequence[str], out_dir: str, *,
                  class_id: int | None = None, top_k: int = 1, save_npy: bool = False) -> int:
    """Writes an overlay per image into out_dir; returns the number of files that failed."""
    os.makedirs(out_dir, exist_ok=True)
    size = explainer.config.data.image_size
    resize = explainer.config.data.get("resize_size", size)
    names = explainer.class_names
    failures = 0
    for path in paths:
        try:
            image = load_image(path, size, resize)
        except ValueError as e:
            print(f"error: {e}; skipped", file=sys.stderr)
            failures += 1
            continue
        _, top, probs = explainer.explain(image)
        if class_id is not None:
            classes = [class_id]
        else:
            classes = list(np.argsort(-probs[0])[:top_k])
        maps = explainer(np.repeat(image[None], len(classes), 0), classes)
        titles = [f"{names[c]} (p={probs[0, c]:.2f})" for c in classes]
        stem = os.path.splitext(os.path.basename(path))[0]
        viz.write_overlay(os.path.join(out_dir, f"{stem}_tame.png"), image, list(maps),
                          titles)
        if save_npy:
            np.save(os.path.join(out_dir, f"{stem}_maps.npy"), maps)
        print(f"{path}: {', '.join(titles)} -> {out_dir}/{stem}_tame.png")
    return failures


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point for `python -m tame_jax.explain`; returns the exit code."""
    p = argparse.ArgumentParser(prog="python -m tame_jax.explain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="a tame_jax.train workdir")
    src.add_argument("--attention", help="an attention checkpoint of the reference release")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
    p.add_argument("--backbone", default="resnet50", help="with --attention")
    p.add_argument("--backbone_weights", default="", help="with --attention: local state dict")
    p.add_argument("--images", nargs="+", required=True)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--class", dest="class_id", type=int, default=None,
                       help="explain this class (default: the top-1 prediction)")
    which.add_argument("--top_k", type=int, default=1, help="explain the k most probable classes")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--save_npy", action="store_true", help="also write the raw maps as .npy")
    args = p.parse_args(argv)
    if args.workdir:
        explainer = Explainer.from_checkpoint(args.workdir, args.step)
    else:
        explainer = Explainer.from_reference_release(
            args.attention, backbone=args.backbone, backbone_weights=args.backbone_weights)
    failures = explain_files(explainer, args.images, args.out, class_id=args.class_id,
                             top_k=args.top_k, save_npy=args.save_npy)
    if failures:
        print(f"{failures} of {len(args.images)} files could not be read", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
