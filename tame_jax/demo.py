"""The whole job on the embedded default: `python -m tame_jax.demo --workdir=runs/demo`.

1. builds the synthetic_shapes data set (once; no download);
2. trains TAME on the shipped demo backbone (`configs/demo.py`; resumes if interrupted);
3. evaluates TAME and the baselines on the test split (TAME, Grad-CAM and Grad-CAM++ on the
   first `eval.num_examples` images, the slow Score-CAM, Ablation-CAM and RISE on the first
   `eval.num_examples_slow`): AD/IC, ROAD, insertion/deletion, pointing game, energy in the box,
   with per-image values;
4. writes WORKDIR/eval/comparison.{md,csv,png} (means with 95% bootstrap intervals, and TAME
   against each baseline by a paired bootstrap) and WORKDIR/demo_grid.png (test images with
   each method's map, one column per method), and prints the table and the time of each stage
   (wall clock, and the process's CPU time, which load on a shared machine inflates less).

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
import numpy as np
from absl import flags, logging

from tame_jax import cli, evaluation, report, viz
from tame_jax.model import Model

DEFAULT_METHODS = ("tame", "gradcam", "gradcampp", "scorecam", "ablationcam", "rise")
GRID_IMAGES = 6


def write_grid(path: str, config: Any, model: Model, batch: dict[str, np.ndarray],
               maps: dict[str, np.ndarray], num_images: int = GRID_IMAGES) -> None:
    """Writes a grid: a row per test image, the image then one column per method's overlay.

    batch: the first eval batch; maps {method: (B, H, W)} of its images, as evaluated.
    """
    from tame_jax.explain import class_names_for

    images = batch["image"][:num_images]
    probs = np.asarray(jax.nn.softmax(jax.jit(Model.classify)(model, images), -1))
    names = class_names_for(config)
    classes = probs.argmax(-1)
    titles = [f"{names[c]} (p={probs[i, c]:.2f})" for i, c in enumerate(classes)]
    viz.write_grid(path, np.asarray(images), {m: v[:num_images] for m, v in maps.items()},
                   titles, batch["bbox"][:num_images] if "bbox" in batch else None)


class Stages:
    """Times the demo's stages: wall clock and the process's CPU time (all threads)."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def run(self, name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Returns fn(*args, **kwargs), timed as stage `name`."""
        w, c = time.perf_counter(), time.process_time()
        out = fn(*args, **kwargs)
        self.wall[name] = time.perf_counter() - w
        self.cpu[name] = time.process_time() - c
        return out


def run(config: Any, workdir: str, methods: Sequence[str] = DEFAULT_METHODS,
        stages: Stages | None = None) -> dict[str, float]:
    """Returns the wall seconds each stage took; does the whole demo into workdir."""
    from tame_jax import data, train
    from tame_jax.model import build_model

    unknown = [m for m in methods if m not in evaluation.METHODS]
    if unknown:
        raise ValueError(f"--methods: unknown {unknown}; choose from {tuple(evaluation.METHODS)}")
    evaluation.selected_metrics(config, True)  # bad metric options fail before any work
    stages = stages or Stages()
    if config.data.source == "synthetic_shapes":
        stages.run("data", data.prepare_synthetic_shapes, config.data.data_dir,
                   config_name=config.data.synthetic_config)
    else:
        stages.wall["data"] = stages.cpu["data"] = 0.0
    stages.run("train", train.train_and_evaluate, config, workdir)

    eval_dir = os.path.join(workdir, "eval")
    first: dict[str, Any] = {"maps": {}}

    def keep_first(method: str):
        def keep(batch: dict[str, np.ndarray], maps: np.ndarray, classes: np.ndarray) -> None:
            first["batch"] = batch
            first["maps"][method] = maps
        return keep

    for m in methods:
        stages.run(f"eval {m}", evaluation.run, config, workdir, method=m, steps="latest",
                   out_dir=eval_dir, on_first_batch=keep_first(m))

    def figures() -> str:
        names = [evaluation.row_name(config, m) for m in methods]
        table = report.compare([os.path.join(eval_dir, f"{n}.json") for n in names], eval_dir)
        write_grid(os.path.join(workdir, "demo_grid.png"), config, build_model(config),
                   first["batch"], first["maps"])
        return table

    table = stages.run("figures", figures)
    print(table)
    print(f"wrote {eval_dir}/comparison.md, comparison.png and {workdir}/demo_grid.png")
    return dict(stages.wall)


def main(config: Any, workdir: str) -> None:
    """Entry point for `python -m tame_jax.demo`."""
    start, cpu0 = time.perf_counter(), time.process_time()
    methods = [m for m in flags.FLAGS.methods.split(",") if m]
    stages = Stages()
    run(config, workdir, methods, stages)
    total, cpu = time.perf_counter() - start, time.process_time() - cpu0
    print("time (s, wall clock): " + ", ".join(f"{k} {v:.0f}" for k, v in stages.wall.items())
          + f"; total {total:.0f}")
    print("CPU time (s, all threads): " + ", ".join(f"{k} {v:.0f}"
                                                   for k, v in stages.cpu.items())
          + f"; total {cpu:.0f}")
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
