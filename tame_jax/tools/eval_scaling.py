"""Evaluation throughput on 1 device and on n devices: does evaluation scale with devices?

`python -m tame_jax.tools.eval_scaling [--methods=scorecam,rise] [--devices=1,2]
[--backbone=resnet18] [--width=16] [--image_size=64] [--batch=8] [--rise_masks=64]
[--steps=3]`

For each method it times the evaluation's map program (`evaluation.map_fn` on a mesh of the
first n devices: each device computes the maps of its slice of the batch) on the same global
batch, and prints images per second and the speed-up over 1 device. The maps of n devices are
checked against those of 1 device. On one machine's CPU, fake devices come from
XLA_FLAGS=--xla_force_host_platform_device_count=N (set before JAX starts); they share the
machine's cores, so the speed-up is bounded by the cores JAX's CPU client gets per device.
"""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from tame_jax import backbones, evaluation
from tame_jax.config import default_config
from tame_jax.model import build_model
from tame_jax.sharding import check_global_batch, make_mesh, replicate, shard_batch
from tame_jax.timing import time_calls


def run(methods: Sequence[str] = ("scorecam", "rise"), devices: Sequence[int] = (1, 2),
        backbone: str = "resnet18", width: int | None = 16, image_size: int = 64,
        batch: int = 8, rise_masks: int = 64, steps: int = 3) -> list[dict[str, Any]]:
    """Returns one row per (method, device count): seconds per batch, images/s, speed-up."""
    if max(devices) > jax.device_count():
        raise ValueError(f"--devices={list(devices)} but JAX sees {jax.device_count()}: on a "
                         "CPU set XLA_FLAGS=--xla_force_host_platform_device_count="
                         f"{max(devices)}")
    config = default_config()
    config.model.backbone = backbone
    config.model.layers = backbones.get_spec(backbone).default_layers
    config.model.backbone_weights = "random"
    config.model.num_classes = 100
    config.model.backbone_kwargs = {"width": width} if width and backbone.startswith(
        "resnet") else {}
    config.data.image_size = image_size
    config.eval.rise_masks = rise_masks
    model = build_model(config)
    images = np.random.default_rng(0).uniform(size=(batch, image_size, image_size, 3))
    rows = []
    for method in methods:
        reference = None
        for n in devices:
            mesh = make_mesh(jax.devices()[:n])
            check_global_batch(batch, mesh, "batch")
            x = shard_batch({"image": images.astype(np.float32)}, mesh)["image"]
            m, key = replicate(model, mesh), replicate(jax.random.key(0), mesh)
            classes = evaluation.predict_fn(mesh)(m, x)
            maps_of = evaluation.map_fn(method, config, mesh)
            maps = np.asarray(maps_of(m, None, x, classes, key))
            reference = maps if reference is None else reference
            call = functools.partial(maps_of, m, None, x, classes, key)
            seconds = time_calls(call, steps)
            rows.append({"method": method, "devices": n, "batch": batch,
                         "seconds": seconds, "images_per_s": batch / seconds,
                         "max_abs_diff_vs_first": float(np.abs(maps - reference).max())})
        base = rows[-len(devices)]["images_per_s"]
        for r in rows[-len(devices):]:
            r["speedup"] = r["images_per_s"] / base
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """Returns the rows as a Markdown table."""
    lines = ["| method | devices | batch | s/batch | img/s | speed-up | max diff |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['devices']} | {r['batch']} | {r['seconds']:.3f} "
                     f"| {r['images_per_s']:.2f} | {r['speedup']:.2f}x "
                     f"| {r['max_abs_diff_vs_first']:.1e} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Runs the measurement from command-line flags and prints the table (and JSON)."""
    parser = argparse.ArgumentParser(prog="python -m tame_jax.tools.eval_scaling",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="scorecam,rise")
    parser.add_argument("--devices", default="1,2")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--width", type=int, default=16, help="a ResNet's base width")
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rise_masks", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="timed calls (median)")
    parser.add_argument("--out", default="", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    rows = run([m for m in args.methods.split(",") if m],
               [int(n) for n in args.devices.split(",") if n], args.backbone, args.width,
               args.image_size, args.batch, args.rise_masks, args.steps)
    print(format_table(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
