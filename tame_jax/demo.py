"""The whole job on the embedded default: `python -m tame_jax.demo --workdir=runs/demo`.

1. builds the synthetic_shapes data set (once; no download);
2. trains TAME on the shipped demo backbone (`configs/demo.py`; resumes if interrupted);
3. evaluates TAME and the baselines on the test split: AD/IC, ROAD, insertion/deletion,
   pointing game and energy in the box;
4. writes WORKDIR/eval/comparison.{md,csv,png} and WORKDIR/demo_grid.png (test images with
   each method's map, one column per method), and prints the table and the times.

Options after `--` style flags: `--config=FILE` (default configs/demo.py from the package
checkout, else the built-in demo config), `--methods=tame,gradcam,...`, and any
`--config.KEY=VALUE` override accepted by tame_jax.train.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from tame_jax import cams, checkpoints, evaluate
from tame_jax.image_ops import minmax_normalize
from tame_jax.train import parse_flags

DEFAULT_METHODS = ("tame", "gradcam", "gradcampp", "scorecam", "ablationcam", "rise")
GRID_IMAGES = 6


def method_maps(method: str, model: Any, config: Any, attention_vars: Any, images: jax.Array,
                classes: jax.Array) -> np.ndarray:
    """Returns (B, H, W) maps in [0, 1] of one method for the given classes."""
    if method == "tame":
        return np.asarray(model.explain(attention_vars, images, classes)[0])
    layer = config.eval.cam_layer or model.layers[-1]
    kwargs = {"num_masks": config.eval.rise_masks} if method == "rise" else {}
    raw = cams.cam(method, model.backbone, model.backbone_vars, images, classes, layer=layer,
                   key=jax.random.key(0), **kwargs)
    return np.asarray(minmax_normalize(raw))


def write_grid(path: str, config: Any, model: Any, attention_vars: Any,
               methods: Sequence[str], num_images: int = GRID_IMAGES) -> None:
    """Writes a grid: a row per test image, the image then one column per method's overlay."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches as patches
    import matplotlib.pyplot as plt

    from tame_jax import data
    from tame_jax.explain import class_names_for, draw_overlay

    batch = next(data.eval_iterator(config, global_batch_size=max(num_images, 8),
                                    process_index=0, process_count=1))
    images = jnp.asarray(batch["image"][:num_images])
    logits, _ = model.features(images)
    probs = np.asarray(jax.nn.softmax(logits, -1))
    classes = jnp.argmax(logits, -1)
    names = class_names_for(config)
    maps = {m: method_maps(m, model, config, attention_vars, images, classes) for m in methods}
    fig, axes = plt.subplots(num_images, len(methods) + 1,
                             figsize=(2.2 * (len(methods) + 1), 2.3 * num_images), squeeze=False)
    for i in range(num_images):
        ax = axes[i, 0]
        ax.imshow(np.asarray(images[i]))
        c = int(classes[i])
        ax.set_title(f"{names[c]} (p={probs[i, c]:.2f})", fontsize=8)
        ax.axis("off")
        if "bbox" in batch:
            y0, x0, y1, x1 = batch["bbox"][i]
            ax.add_patch(patches.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False,
                                           edgecolor="lime", linewidth=1.5))
        for j, m in enumerate(methods):
            draw_overlay(axes[i, j + 1], np.asarray(images[i]), maps[m][i],
                         m if i == 0 else "", colorbar=False)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run(config: Any, workdir: str, methods: Sequence[str] = DEFAULT_METHODS) -> dict[str, float]:
    """Returns the seconds each stage took; does the whole demo into workdir."""
    from tame_jax import compare, data, train
    from tame_jax.model import build_model

    unknown = [m for m in methods if m not in evaluate.METHODS]
    if unknown:
        raise ValueError(f"--methods: unknown {unknown}; choose from {evaluate.METHODS}")
    times: dict[str, float] = {}
    t = time.perf_counter()
    if config.data.source == "synthetic_shapes":
        data.prepare_synthetic_shapes(config.data.data_dir,
                                      config_name=config.data.synthetic_config)
    times["data"] = time.perf_counter() - t

    t = time.perf_counter()
    train.train_and_evaluate(config, workdir)
    times["train"] = time.perf_counter() - t

    eval_dir = os.path.join(workdir, "eval")
    for m in methods:
        t = time.perf_counter()
        evaluate.run(config, workdir, method=m, steps="latest", out_dir=eval_dir)
        times[f"eval {m}"] = time.perf_counter() - t

    t = time.perf_counter()
    names = [config.model.variant if m == "tame" and config.model.variant != "tame" else m
             for m in methods]
    table = compare.compare([os.path.join(eval_dir, f"{n}.json") for n in names], eval_dir)
    model = build_model(config)
    attention_vars, _ = checkpoints.restore_attention(config, workdir, model)
    write_grid(os.path.join(workdir, "demo_grid.png"), config, model, attention_vars, methods)
    times["figures"] = time.perf_counter() - t
    print(table)
    print(f"wrote {eval_dir}/comparison.md, comparison.png and {workdir}/demo_grid.png")
    return times


def main(argv: list[str]) -> None:
    """Entry point for `python -m tame_jax.demo`."""
    checkpoints.quiet_orbax_logs()
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    start = time.perf_counter()
    methods = [m for m in flags.FLAGS.methods.split(",") if m]
    times = run(flags.FLAGS.config, flags.FLAGS.workdir, methods)
    total = time.perf_counter() - start
    print("time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items())
          + f"; total {total:.0f}")
    logging.info("demo finished in %.0f s", total)


def _default_config_path() -> str:
    """Returns configs/demo.py of this checkout."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "configs", "demo.py")


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", _default_config_path(), "config file",
                                    lock_config=True)
    flags.DEFINE_string("workdir", "runs/demo", "where everything goes")
    flags.DEFINE_string("methods", ",".join(DEFAULT_METHODS), "methods to evaluate")
    app.run(main, flags_parser=parse_flags)
