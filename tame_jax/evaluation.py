"""Evaluation: the registries of explanation methods and of metrics, and the loop over an
eval set that puts every method through the same metrics.

Adding a method or a metric is one `register_method` / `register_metric` call: the evaluate
command, the demo and the tables pick it up by name.

- A `Method` turns (model, attention variables, images, classes, key) into maps (B, H, W) in
  [0, 1] at image resolution (higher = more relevant), reading its options from the config.
- A `Metric` turns a `MetricInputs` batch into per-image values {column: (B,)}; its columns
  come from the config, and it says whether they are percentages and how to print them.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from tame_jax import backbones, cams, checkpoints, cli, metrics, report
from tame_jax.image_ops import minmax_normalize
from tame_jax.model import Model
from tame_jax.sharding import check_global_batch, local_rows, make_mesh, replicate, shard_batch

# ----------------------------------------------------------------------------- methods


@dataclasses.dataclass(frozen=True)
class Method:
    """An explanation method: how to compute its maps, and which options it reads."""

    name: str
    # maps(model, attention_vars, images (B, H, W, 3), classes (B,), key, **options)
    #   -> maps (B, H, W) in [0, 1]
    maps: Callable[..., jax.Array]
    # options(config) -> {name: hashable value}: what the method reads from the config
    options: Callable[[Any], dict[str, Any]] = lambda config: {}
    trained: bool = False  # needs attention variables from a training checkpoint (TAME)
    # explain_top_k(model, attention_vars, images, classes (B, k) | None, top_k)
    #   -> (maps (B, k, H, W), classes (B, k), logits (B, K)): maps and classification from
    #   one forward pass, where the method has one (TAME); else `explain` classifies first
    explain_top_k: Callable[..., tuple[jax.Array, jax.Array, jax.Array]] | None = None


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Adds an explanation method to the registry (replacing one of the same name)."""
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """Returns the registered method `name`; ValueError listing the valid names if none."""
    if name not in METHODS:
        raise ValueError(f"--method={name!r}; choose one of {tuple(METHODS)}")
    return METHODS[name]


def _tame_maps(model: Model, attention_vars: Any, images: jax.Array, classes: jax.Array,
               key: jax.Array) -> jax.Array:
    return model.explain(attention_vars, images, classes)[0]


def _cam_options(method: str) -> Callable[[Any], dict[str, Any]]:
    def options(config: Any) -> dict[str, Any]:
        layer = config.eval.cam_layer or backbones.get_spec(config.model.backbone).cam_layer
        out = {"layer": layer}
        if method == "rise":
            out["num_masks"] = int(config.eval.rise_masks)
        return out

    return options


def _cam_maps(method: str) -> Callable[..., jax.Array]:
    def maps(model: Model, attention_vars: Any, images: jax.Array, classes: jax.Array,
             key: jax.Array, **options: Any) -> jax.Array:
        del attention_vars
        return minmax_normalize(cams.cam(method, model, images, classes, key=key, **options))

    return maps


register_method(Method(
    "tame", _tame_maps, trained=True,
    explain_top_k=lambda model, av, images, classes, top_k: model.explain_top_k(
        av, images, classes, top_k)))
for _name in cams.METHODS:
    register_method(Method(_name, _cam_maps(_name), _cam_options(_name)))


# ----------------------------------------------------------------------------- metrics


@dataclasses.dataclass(frozen=True)
class MetricInputs:
    """One eval batch as the metrics see it (arrays sharded on the batch axis)."""

    model: Model
    images: jax.Array  # (B, H, W, 3) in [0, 1]
    maps: jax.Array  # (B, H, W) in [0, 1]
    classes: jax.Array  # (B,) the explained classes
    key: jax.Array
    boxes: jax.Array | None = None  # (B, 4) (ymin, xmin, ymax, xmax), where the data has them

    def classify(self, images: jax.Array) -> jax.Array:
        """Returns the logits (B, K) of images in [0, 1] (the frozen backbone)."""
        return self.model.classify(images)


def _pct(fraction: float) -> str:
    return f"{fraction * 100:g}"


@dataclasses.dataclass(frozen=True)
class Metric:
    """A metric: per-image values from a batch, its columns, and how they are printed."""

    name: str
    # fn(inputs: MetricInputs, **options) -> {column: (B,) float}
    fn: Callable[..., dict[str, jax.Array]]
    columns: Callable[[Any], list[str]]  # columns(config), in table order
    options: Callable[[Any], dict[str, Any]] = lambda config: {}
    percent: bool = False  # shown as 100 x the mean
    decimals: int = 2
    needs_boxes: bool = False  # only where the data has object boxes


METRICS: dict[str, Metric] = {}


def register_metric(metric: Metric) -> Metric:
    """Adds a metric to the registry (replacing one of the same name)."""
    METRICS[metric.name] = metric
    return metric


def _ad_ic(inputs: MetricInputs, fractions: tuple[float, ...]) -> dict[str, jax.Array]:
    return metrics.ad_ic(inputs.classify, inputs.images, inputs.maps, inputs.classes, fractions)


def _road(inputs: MetricInputs, fractions: tuple[float, ...]) -> dict[str, jax.Array]:
    orders = ("morf", "lerf")
    kept = metrics.road_orders(inputs.classify, inputs.images, inputs.maps, inputs.classes,
                               inputs.key, fractions, orders)
    return {f"road_{order}_{_pct(f)}": kept[j, :, i].astype(jnp.float32)
            for j, order in enumerate(orders) for i, f in enumerate(fractions)}


def _insertion_deletion(inputs: MetricInputs, num_steps: int) -> dict[str, jax.Array]:
    return metrics.insertion_deletion(inputs.classify, inputs.images, inputs.maps,
                                      inputs.classes, num_steps=num_steps)


def _agreement(inputs: MetricInputs) -> dict[str, jax.Array]:
    masked = inputs.classify(inputs.images * inputs.maps[..., None])
    return {"agreement": (jnp.argmax(masked, -1) == inputs.classes).astype(jnp.float32)}


register_metric(Metric(
    "ad_ic", _ad_ic,
    columns=lambda c: [f"{m}_{_pct(f)}" for f in c.eval.ad_ic_fractions for m in ("ad", "ic")],
    options=lambda c: {"fractions": tuple(c.eval.ad_ic_fractions)}, percent=True))
register_metric(Metric(
    "road", _road,
    columns=lambda c: [f"road_{o}_{_pct(f)}" for o in ("morf", "lerf")
                       for f in c.eval.road_fractions],
    options=lambda c: {"fractions": tuple(c.eval.road_fractions)}, percent=True))
register_metric(Metric(
    "insertion_deletion", _insertion_deletion, columns=lambda c: ["insertion", "deletion"],
    options=lambda c: {"num_steps": int(c.eval.insertion_steps)}, decimals=3))
register_metric(Metric("agreement", _agreement, columns=lambda c: ["agreement"], percent=True))
register_metric(Metric(
    "pointing", lambda i: {"pointing": metrics.pointing_game(i.maps, i.boxes).astype(jnp.float32)},
    columns=lambda c: ["pointing"], percent=True, needs_boxes=True))
register_metric(Metric(
    "energy_in_box", lambda i: {"energy_in_box": metrics.energy_in_box(i.maps, i.boxes)},
    columns=lambda c: ["energy_in_box"], percent=True, needs_boxes=True))


def selected_metrics(config: Any, with_boxes: bool) -> list[Metric]:
    """Returns the metrics to compute: config.eval.metrics (default all registered) that the
    data supports (box metrics only where the data has boxes)."""
    names = tuple(config.eval.get("metrics", ()) or METRICS)
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"config.eval.metrics: unknown {unknown}; registered metrics are "
                         f"{tuple(METRICS)}")
    return [METRICS[n] for n in names if with_boxes or not METRICS[n].needs_boxes]


def metric_columns(config: Any, with_boxes: bool) -> list[str]:
    """Returns the result columns in table order."""
    return [col for m in selected_metrics(config, with_boxes) for col in m.columns(config)]


def column_formats(config: Any, with_boxes: bool) -> dict[str, dict[str, Any]]:
    """Returns {column: {'percent': bool, 'decimals': int}} for the report."""
    return {col: {"percent": m.percent, "decimals": m.decimals}
            for m in selected_metrics(config, with_boxes) for col in m.columns(config)}


def _frozen(options: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(options.items()))


def _batch_metrics(model: Model, images: jax.Array, maps: jax.Array, classes: jax.Array,
                   key: jax.Array, boxes: jax.Array | None, plan: tuple) -> dict[str, jax.Array]:
    inputs = MetricInputs(model, images, maps, classes, key, boxes)
    out = {}
    for name, options in plan:
        out.update(METRICS[name].fn(inputs, **dict(options)))
    return out


@functools.cache
def _jitted_metrics(plan: tuple) -> Callable[..., dict[str, jax.Array]]:
    return jax.jit(functools.partial(_batch_metrics, plan=plan))


def batch_metrics(config: Any, with_boxes: bool) -> Callable[..., dict[str, jax.Array]]:
    """Returns jitted fn(model, images, maps, classes, key, boxes) -> {column: (B,)}: one program
    per architecture and settings, shared by every method evaluated in the process."""
    plan = tuple((m.name, _frozen(m.options(config)))
                 for m in selected_metrics(config, with_boxes))
    return _jitted_metrics(plan)


def _method_maps(model: Model, attention_vars: Any, images: jax.Array, key: jax.Array,
                 method: str, options: tuple) -> tuple[jax.Array, jax.Array]:
    classes = jnp.argmax(model.classify(images), axis=-1)
    return METHODS[method].maps(model, attention_vars, images, classes, key,
                                **dict(options)), classes


@functools.cache
def _jitted_maps(method: str, options: tuple) -> Callable[..., tuple[jax.Array, jax.Array]]:
    return jax.jit(functools.partial(_method_maps, method=method, options=options))


def map_fn(method: str, config: Any) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """Returns jitted fn(model, attention_vars, images, key) -> (maps (B, H, W), classes (B,))."""
    m = get_method(method)
    return _jitted_maps(m.name, _frozen(m.options(config)))


# ----------------------------------------------------------------------------- the loop


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


def evaluate_maps(config: Any, model: Model, method: str, attention_vars: Any = None,
                  label: str = "eval") -> dict[str, float]:
    """Returns {column: mean} over the eval set (percent columns x 100) and num_images."""
    from tame_jax import data

    mesh = make_mesh()
    check_global_batch(config.eval.batch_size, mesh, "eval.batch_size")
    info = data.get_dataset_info(config)
    num = config.eval.num_examples if config.eval.num_examples > 0 else info.num_eval_examples
    num_batches = -(-num // config.eval.batch_size)
    batches = _limited(data.eval_iterator(config, global_batch_size=config.eval.batch_size),
                       config.eval.num_examples, config.eval.batch_size)
    model = replicate(model, mesh)
    attention_vars = replicate(attention_vars, mesh) if attention_vars is not None else None
    maps_of = map_fn(method, config)
    sums: dict[str, float] = {}
    count = 0
    key = jax.random.key(config.seed)
    progress = cli.progress_bar(num_batches, label, unit="batch")
    percent: dict[str, bool] = {}
    for i, batch in enumerate(batches):
        with_boxes = "bbox" in batch
        metrics_of = batch_metrics(config, with_boxes)
        percent = {c: f["percent"] for c, f in column_formats(config, with_boxes).items()}
        arrays = shard_batch({k: batch[k] for k in ("image", "bbox") if k in batch}, mesh)
        k_map, k_metrics = jax.random.split(jax.random.fold_in(key, i))
        maps, classes = maps_of(model, attention_vars, arrays["image"], k_map)
        out = metrics_of(model, arrays["image"], maps, classes, k_metrics, arrays.get("bbox"))
        valid = np.asarray(batch["valid"], np.float64)
        for k, v in out.items():
            local = local_rows(v)[: len(valid)]
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
    result: dict[str, float] = {}
    for k, v in sums.items():
        result[k] = (100.0 if percent.get(k) else 1.0) * v / count
    result["num_images"] = count
    return result


def row_name(config: Any, method: str) -> str:
    """Returns the table name of a method: TAME rows carry the attention variant's name."""
    if get_method(method).trained and config.model.variant != "tame":
        return config.model.variant
    return method


def run(config: Any, workdir: str, *, method: str = "tame", steps: str = "latest",
        out_dir: str | None = None) -> list[dict[str, Any]]:
    """Returns the table rows of one method (one per checkpoint for TAME) and writes them."""
    from tame_jax.model import build_model

    m = get_method(method)
    model = build_model(config)
    out_dir = out_dir or os.path.join(workdir, "eval")
    name = row_name(config, method)
    rows = []
    if m.trained:
        ckpt = checkpoints.Checkpointer(workdir, identity=checkpoints.describe(config),
                                        read_only=True)
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
            result = evaluate_maps(config, model, method, attention_vars,
                                   label=f"{name} step {step}")
            rows.append({"method": name, "step": step, **result})
    else:
        result = evaluate_maps(config, model, method, None, label=method)
        rows.append({"method": name, "step": "-", **result})
    with_boxes = any(c in rows[0] for c in metric_columns(config, True)
                     if c not in metric_columns(config, False))
    columns = [c for c in metric_columns(config, with_boxes) if c in rows[0]]
    if jax.process_index() == 0:
        paths = report.write_tables(rows, columns, out_dir, name,
                                    formats=column_formats(config, with_boxes))
        logging.info("wrote %s", ", ".join(paths.values()))
        print(report.markdown_table(rows, ["method", "step", *columns],
                                    column_formats(config, with_boxes)))
        write_tensorboard(rows, columns, workdir)
    return rows


def write_tensorboard(rows: list[dict[str, Any]], columns: list[str], workdir: str) -> None:
    """Writes each row's metrics as TensorBoard scalars `eval/<method>/<column>` into the
    training workdir, beside the training curves (a baseline's row at step 0)."""
    from clu import metric_writers

    writer = metric_writers.create_default_writer(workdir, just_logging=False)
    try:
        for row in rows:
            step = row["step"] if isinstance(row["step"], int) else 0
            writer.write_scalars(step, {f"eval/{row['method']}/{c}": float(row[c])
                                        for c in columns if c in row})
    finally:
        writer.close()
