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
from absl import flags, logging

from tame_jax import checkpoints, cli, evaluation, report, viz
from tame_jax.model import Model

DEFAULT_METHODS = ("tame", "gradcam", "gradcampp", "scorecam", "ablationcam", "rise")
GRID_IMAGES = 6


def write_grid(path: str, config: Any, model: Any, attention_vars: Any,
               methods: Sequence[str], num_images: int = GRID_IMAGES) -> None:
    """Writes a grid: a row per test image, the image then one column per method's overlay."""
    from tame_jax import data
    from tame_jax.explain import class_names_for

    batch = next(data.eval_iterator(config, global_batch_size=max(num_images, 8),
                                    process_index=0, process_count=1))
    images = jnp.asarray(batch["image"][:num_images])
    probs = np.asarray(jax.nn.softmax(jax.jit(Model.classify)(model, images), -1))
    names = class_names_for(config)
    maps = {}
    for m in methods:
        maps_of = evaluation.map_fn(m, config)
        maps[m] = np.asarray(maps_of(model, attention_vars, images, jax.random.key(0))[0])
    classes = probs.argmax(-1)
    titles = [f"{names[c]} (p={probs[i, c]:.2f})" for i, c in enumerate(classes)]
    viz.write_grid(path, np.asarray(images), maps, titles,
                   batch["bbox"][:num_images] if "bbox" in batch else None)


def run(config: Any, workdir: str, methods: Sequence[str] = DEFAULT_METHODS) -> dict[str, float]:
    """Returns the seconds each stage took; does the whole demo into workdir."""
    from tame_jax import data, train
    from tame_jax.model import build_model

    unknown = [m for m in methods if m not in evaluation.METHODS]
    if unknown:
        raise ValueError(f"--methods: unknown {unknown}; choose from {tuple(evaluation.METHODS)}")
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
        evaluation.run(config, workdir, method=m, steps="latest", out_dir=eval_dir)
        times[f"eval {m}"] = time.perf_counter() - t

    t = time.perf_counter()
    names = [evaluation.row_name(config, m) for m in methods]
    table = report.compare([os.path.join(eval_dir, f"{n}.json") for n in names], eval_dir)
    model = build_model(config)
    attention_vars, _ = checkpoints.restore_attention(config, workdir, model)
    write_grid(os.path.join(workdir, "demo_grid.png"), config, model, attention_vars, methods)
    times["figures"] = time.perf_counter() - t
    print(table)
    print(f"wrote {eval_dir}/comparison.md, comparison.png and {workdir}/demo_grid.png")
    return times


def main(config: Any, workdir: str) -> None:
    """Entry point for `python -m tame_jax.demo`."""
    start = time.perf_counter()
    methods = [m for m in flags.FLAGS.methods.split(",") if m]
    times = run(config, workdir, methods)
    total = time.perf_counter() - start
    print("time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items())
          + f"; total {total:.0f}")
    logging.info("demo finished in %.0f s", total)


def _default_config_path() -> str:
    """Returns configs/demo.py of this checkout."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "configs", "demo.py")


if __name__ == "__main__":
    cli.define_flags(config=_default_config_path(), workdir="runs/demo",
                     workdir_help="where everything goes")
    flags.DEFINE_string("methods", ",".join(DEFAULT_METHODS), "methods to evaluate")
    cli.run(main)
