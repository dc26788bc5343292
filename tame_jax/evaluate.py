"""Evaluate explanations on the eval set and write tables.

    python -m tame_jax.evaluate --config=configs/resnet50.py --workdir=DIR [--step=N|all|latest]
        [--method=tame|gradcam|gradcampp|scorecam|ablationcam|rise] [--eval_list=FILE] [--out=DIR]

TAME (or L-CAM-Img, the `lcam_img` variant) is restored from the checkpoints in DIR, one table
row per checkpoint; a baseline needs no checkpoint and gives one row. Every method's maps are
min-max normalised per image to [0, 1] and go through the same metrics (DESIGN §1): AD and IC
at 100/50/15%, ROAD MoRF and LeRF, insertion and deletion AUC, top-1 agreement of the masked
image with the explained class, and, where the data has object boxes, the pointing game and
the share of map energy inside the box. Results go to OUT/<method>.{csv,json,md}.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from tame_jax import cams, checkpoints, metrics
from tame_jax.image_ops import minmax_normalize
from tame_jax.parallel import backbone_forward, make_mesh, replicate, shard_batch
from tame_jax.train import parse_flags

METHODS = ("tame", *cams.METHODS)
PERCENT_KEYS = ("ad_", "ic_", "road_", "agreement", "pointing", "energy_in_box")


def _pct(fraction: float) -> str:
    return f"{fraction * 100:g}"


def metric_columns(config: Any, with_boxes: bool) -> list[str]:
    """Returns the result columns in table order."""
    cols = []
    for f in config.eval.ad_ic_fractions:
        cols += [f"ad_{_pct(f)}", f"ic_{_pct(f)}"]
    for order in ("morf", "lerf"):
        cols += [f"road_{order}_{_pct(f)}" for f in config.eval.road_fractions]
    cols += ["insertion", "deletion", "agreement"]
    if with_boxes:
        cols += ["pointing", "energy_in_box"]
    return cols


def make_map_fn(method: str, model: Any, config: Any) -> Callable:
    """Returns fn(attention_vars, images, key) -> (maps (B, H, W) in [0, 1], classes (B,))."""
    if method == "tame":
        return lambda attention_vars, x, key: model.explain(attention_vars, x)[:2]
    if method not in cams.METHODS:
        raise ValueError(f"--method={method!r}; choose one of {METHODS}")
    layer = config.eval.cam_layer or model.layers[-1]
    if layer not in model.layers:
        raise ValueError(f"eval.cam_layer={layer!r} must be one of the model's layers "
                         f"{model.layers} (set model.layers to include it)")
    kwargs = {"num_masks": config.eval.rise_masks} if method == "rise" else {}

    def fn(attention_vars, x, key):
        logits, _ = model.features(x)
        classes = jnp.argmax(logits, axis=-1)
        raw = cams.cam(method, model.backbone, model.backbone_vars, x, classes, layer=layer,
                       key=key, **kwargs)
        return minmax_normalize(raw), classes

    return fn


@functools.lru_cache(maxsize=8)
def batch_metrics_fn(backbone: Any, ad_ic_fractions: tuple[float, ...],
                     road_fractions: tuple[float, ...], insertion_steps: int, with_boxes: bool
                     ) -> Callable:
    """Returns jitted fn(backbone_vars, images, maps, classes, key[, boxes]) -> {column: (B,)}.

    Cached, and separate from the map computation: every method evaluated in one process (the
    demo, compare) reuses one compiled program, the costliest compile of the evaluation.
    """

    def fn(backbone_vars, x, maps, classes, key, boxes=None):
        def classify(images):
            return backbone_forward(backbone, backbone_vars, images)[0]

        out = metrics.ad_ic(classify, x, maps, classes, ad_ic_fractions)
        orders = ("morf", "lerf")
        kept = metrics.road_orders(classify, x, maps, classes, key, road_fractions, orders)
        for j, order in enumerate(orders):
            for i, f in enumerate(road_fractions):
                out[f"road_{order}_{_pct(f)}"] = kept[j, :, i].astype(jnp.float32)
        out.update(metrics.insertion_deletion(classify, x, maps, classes,
                                              num_steps=insertion_steps))
        masked = classify(x * maps[..., None])
        out["agreement"] = (jnp.argmax(masked, -1) == classes).astype(jnp.float32)
        if with_boxes:
            out["pointing"] = metrics.pointing_game(maps, boxes).astype(jnp.float32)
            out["energy_in_box"] = metrics.energy_in_box(maps, boxes)
        return out

    return jax.jit(fn)


class Progress:
    """A one-line progress bar with ETA on stderr."""

    def __init__(self, total: int | None, label: str):
        self.total, self.label, self.start, self.done = total, label, time.perf_counter(), 0

    def update(self, n: int = 1) -> None:
        """Advances the bar by n and redraws it."""
        self.done += n
        elapsed = time.perf_counter() - self.start
        if self.total:
            frac = self.done / self.total
            eta = elapsed / frac - elapsed if frac else 0.0
            bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
            line = (f"\r{self.label} [{bar}] {self.done}/{self.total} "
                    f"{elapsed:.0f}s ETA {eta:.0f}s")
        else:
            line = f"\r{self.label} {self.done} batches {elapsed:.0f}s"
        sys.stderr.write(line)
        sys.stderr.flush()

    def close(self) -> None:
        """Ends the progress line."""
        sys.stderr.write("\n")


def _limited(batches: Iterator[dict], num_examples: int, global_batch: int
             ) -> Iterator[dict]:
    """Yields batches until num_examples (if > 0) are covered; invalidates any surplus."""
    seen = 0
    for batch in batches:
        if num_examples > 0:
            if seen >= num_examples:
                return
            local = len(batch["valid"])
            start = seen + jax.process_index() * local
            keep = np.arange(start, start + local) < num_examples
            batch = dict(batch, valid=batch["valid"] & keep)
            seen += global_batch
        yield batch


def _local_rows(v: jax.Array) -> np.ndarray:
    """Returns this process's rows of a batch-sharded (or replicated) per-image array."""
    if v.is_fully_replicated:
        return np.asarray(v, np.float64).reshape(-1)
    shards = sorted(v.addressable_shards, key=lambda s: s.index[0].start or 0)
    return np.concatenate([np.asarray(s.data, np.float64).reshape(-1) for s in shards])


def evaluate_maps(config: Any, model: Any, method: str, attention_vars: Any = None,
                  label: str = "eval") -> dict[str, float]:
    """Returns {column: value} over the eval set: AD/IC/ROAD/agreement/pointing in %, AUCs."""
    from tame_jax import data

    mesh = make_mesh()
    info = data.get_dataset_info(config)
    num = config.eval.num_examples if config.eval.num_examples > 0 else info.num_eval_examples
    num_batches = -(-num // config.eval.batch_size)
    batches = _limited(data.eval_iterator(config, global_batch_size=config.eval.batch_size),
                       config.eval.num_examples, config.eval.batch_size)
    attention_vars = replicate(attention_vars, mesh) if attention_vars is not None else None
    backbone_vars = replicate(model.backbone_vars, mesh)
    map_fn = jax.jit(make_map_fn(method, model, config))
    e = config.eval
    sums: dict[str, float] = {}
    count = 0
    key = jax.random.key(config.seed)
    progress = Progress(num_batches, label)
    for i, batch in enumerate(batches):
        metrics_fn = batch_metrics_fn(model.backbone, tuple(e.ad_ic_fractions),
                                      tuple(e.road_fractions), e.insertion_steps, "bbox" in batch)
        arrays = shard_batch({k: batch[k] for k in ("image", "bbox") if k in batch}, mesh)
        k_map, k_metrics = jax.random.split(jax.random.fold_in(key, i))
        maps, classes = map_fn(attention_vars, arrays["image"], k_map)
        out = metrics_fn(backbone_vars, arrays["image"], maps, classes, k_metrics,
                         arrays.get("bbox"))
        valid = np.asarray(batch["valid"], np.float64)
        for k, v in out.items():
            local = _local_rows(v)[: len(valid)]
            sums[k] = sums.get(k, 0.0) + float((local * valid).sum())
        count += int(valid.sum())
        progress.update()
    progress.close()
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        keys = sorted(sums)
        totals = multihost_utils.process_allgather(np.asarray([sums[k] for k in keys] + [count]))
        totals = np.asarray(totals).reshape(jax.process_count(), -1).sum(0)
        sums, count = dict(zip(keys, totals[:-1], strict=True)), int(totals[-1])
    if count == 0:
        raise ValueError("the eval set is empty: check config.data and --eval_list")
    result = {}
    for k, v in sums.items():
        scale = 100.0 if k.startswith(PERCENT_KEYS) else 1.0
        result[k] = scale * v / count
    result["num_images"] = count
    return result


def write_tables(rows: list[dict[str, Any]], columns: list[str], out_dir: str, name: str
                 ) -> dict[str, str]:
    """Writes rows as OUT/name.csv, .json and .md; returns the three paths."""
    os.makedirs(out_dir, exist_ok=True)
    head = ["method", "step", *columns, "num_images"]
    paths = {ext: os.path.join(out_dir, f"{name}.{ext}") for ext in ("csv", "json", "md")}
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=head, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    with open(paths["json"], "w") as f:
        json.dump({"columns": head, "rows": rows}, f, indent=1)
    with open(paths["md"], "w") as f:
        f.write(markdown_table(rows, head))
    return paths


def markdown_table(rows: list[dict[str, Any]], head: list[str]) -> str:
    """Returns rows as a Markdown table with numbers to 2 decimals (AUCs to 3)."""

    def fmt(k, v):
        if isinstance(v, float):
            return f"{v:.3f}" if k in ("insertion", "deletion") else f"{v:.2f}"
        return str(v)

    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(fmt(k, r.get(k, "")) for k in head) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def run(config: Any, workdir: str, *, method: str = "tame", steps: str = "latest",
        out_dir: str | None = None) -> list[dict[str, Any]]:
    """Returns the table rows of one method (one per checkpoint for TAME) and writes them."""
    from tame_jax.model import build_model

    if method not in METHODS:
        raise ValueError(f"--method={method!r}; choose one of {METHODS}")
    model = build_model(config)
    out_dir = out_dir or os.path.join(workdir, "eval")
    name = config.model.variant if method == "tame" and config.model.variant != "tame" else method
    rows = []
    if method == "tame":
        ckpt = checkpoints.Checkpointer(workdir, identity=checkpoints.describe(config))
        available = ckpt.all_steps()
        ckpt.close()
        if not available:
            raise FileNotFoundError(
                f"no complete checkpoint in {workdir}/checkpoints: train first with "
                f"python -m tame_jax.train --config=... --workdir={workdir}")
        if steps == "all":
            wanted = available
        elif steps == "latest":
            wanted = available[-1:]
        else:
            wanted = [int(s) for s in steps.split(",")]
            missing = [s for s in wanted if s not in available]
            if missing:
                raise ValueError(f"--step={steps}: no checkpoint for {missing}; "
                                 f"available steps are {available}")
        for step in wanted:
            attention_vars, _ = checkpoints.restore_attention(config, workdir, model, step)
            result = evaluate_maps(config, model, "tame", attention_vars,
                                   label=f"{name} step {step}")
            rows.append({"method": name, "step": step, **result})
    else:
        result = evaluate_maps(config, model, method, None, label=method)
        rows.append({"method": method, "step": "-", **result})
    columns = [c for c in metric_columns(config, "pointing" in rows[0]) if c in rows[0]]
    if jax.process_index() == 0:
        paths = write_tables(rows, columns, out_dir, name)
        logging.info("wrote %s", ", ".join(paths.values()))
        print(markdown_table(rows, ["method", "step", *columns]))
    return rows


def main(argv: list[str]) -> None:
    """Entry point for `python -m tame_jax.evaluate`."""
    checkpoints.quiet_orbax_logs()
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    config = f.config
    if f.eval_list:
        if not os.path.isfile(f.eval_list):
            raise FileNotFoundError(f"--eval_list={f.eval_list} does not exist")
        with config.unlocked():
            config.data.source = "list"
            config.data.list_file = f.eval_list
    run(config, f.workdir, method=f.method, steps=f.step, out_dir=f.out)


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "path to a config file", lock_config=True)
    flags.DEFINE_string("workdir", None, "the training workdir (checkpoints)")
    flags.DEFINE_string("method", "tame", f"one of {METHODS}")
    flags.DEFINE_string("step", "latest", "checkpoint step(s): N, N1,N2, latest or all")
    flags.DEFINE_string("eval_list", None, "a `relative/path label` list file of eval images")
    flags.DEFINE_string("out", None, "where the tables go (default WORKDIR/eval)")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=parse_flags)
