"""Evaluation: the registries of explanation methods and of metrics, and the loop over an
eval set that puts every method through the same metrics.

Adding a method or a metric is one `register_method` / `register_metric` call: the evaluate
command, the demo and the tables pick it up by name.

- A `Method` turns (model, attention variables, images, classes, key) into maps (B, H, W) in
  [0, 1] at image resolution (higher = more relevant), reading its options from the config.
- A `Metric` turns a `MetricInputs` batch into per-image values {column: (B,)}; its columns
  come from the config, and it says whether they are percentages and how to print them.

Given a mesh, the predictions, the maps and the metrics run per device (`jax.shard_map` over
the `batch` axis): each device computes its own images only, and nothing gathers the image
batch, so more devices means proportionally more images per second. Per-image randomness
(ROAD's noise) is drawn from the image's index in the eval split, and randomness shared by all
images (RISE's masks) from one replicated key, so the results depend neither on the number of
devices or hosts nor on how the images are batched.
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
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from tame_jax import backbones, cams, checkpoints, cli, metrics, report
from tame_jax.image_ops import minmax_normalize
from tame_jax.model import Model
from tame_jax.sharding import (
    BATCH_AXIS,
    check_global_batch,
    local_rows,
    make_mesh,
    replicate,
    shard_batch,
)

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
    slow: bool = False  # a forward pass per channel or mask: eval.num_examples_slow applies


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
    register_method(Method(_name, _cam_maps(_name), _cam_options(_name),
                           slow=_name in ("scorecam", "ablationcam", "rise")))


# ----------------------------------------------------------------------------- metrics


@dataclasses.dataclass(frozen=True)
class MetricInputs:
    """One eval batch as the metrics see it (arrays sharded on the batch axis)."""

    model: Model
    images: jax.Array  # (B, H, W, 3) in [0, 1]
    maps: jax.Array  # (B, H, W) in [0, 1], of the explained (top-1) classes
    classes: jax.Array  # (B,) the explained classes
    key: jax.Array
    boxes: jax.Array | None = None  # (B, 4) (ymin, xmin, ymax, xmax), where the data has them
    labels: jax.Array | None = None  # (B,) the data's labels (ground truth), -1 where unknown
    label_maps: jax.Array | None = None  # (B, H, W) maps of `labels`, for needs_label_maps
    index: jax.Array | None = None  # (B,) each image's index in the eval split

    def classify(self, images: jax.Array) -> jax.Array:
        """Returns the logits (B, K) of images in [0, 1] (the frozen backbone)."""
        return self.model.classify(images)

    def normalized(self) -> jax.Array:
        """Returns the images as the backbone reads them, (images - mean) / std."""
        return self.model.normalize(self.images)

    def classify_normalized(self, xn: jax.Array) -> jax.Array:
        """Returns the logits (B, K) of normalised input xn (the frozen backbone)."""
        return self.model.apply_backbone(xn)[0]


def _pct(fraction: float) -> str:
    return f"{fraction * 100:g}"


@dataclasses.dataclass(frozen=True)
class Metric:
    """A metric: per-image values from a batch, its columns, and how they are printed."""

    name: str
    # fn(inputs: MetricInputs, **options) -> {column: (B,) float}
    fn: Callable[..., dict[str, jax.Array]]
    columns: Callable[[Any], list[str]]  # columns(config), in table order
    # options(config) -> {name: hashable value}; raises ValueError naming the fix on bad values
    options: Callable[[Any], dict[str, Any]] = lambda config: {}
    percent: bool = False  # shown as 100 x the mean
    decimals: int = 2
    needs_boxes: bool = False  # only where the data has object boxes
    better: Callable[[str], str] = lambda column: "higher"  # "higher" or "lower", per column
    needs_label_maps: Callable[[Any], bool] = lambda config: False  # maps of the data's labels


METRICS: dict[str, Metric] = {}


def register_metric(metric: Metric) -> Metric:
    """Adds a metric to the registry (replacing one of the same name)."""
    METRICS[metric.name] = metric
    return metric


def _choice(config: Any, field: str, valid: tuple[str, ...]) -> str:
    """Returns config.eval.<field>; ValueError naming the valid values if it is not one."""
    value = config.eval[field]
    if value not in valid:
        raise ValueError(f"config.eval.{field}={value!r} is not a known option; choose one of "
                         f"{valid} (--config.eval.{field}={valid[0]})")
    return value


# Named protocol variants: (input space, rule) of each metric; the first is the default.
ROAD_VARIANTS = {"gradcam": ("normalized", "percentile"), "pixels": ("pixels", "ceil")}
INSERTION_VARIANTS = {"rise": ("normalized", "rise"), "pixels": ("pixels", "gaussian")}
POINTING_CLASSES = ("label", "predicted")


def _space(inputs: MetricInputs, space: str) -> tuple[jax.Array, Callable[..., jax.Array]]:
    """Returns (x, classify of x): the normalised input and the backbone, or [0, 1] pixels."""
    if space == "normalized":
        return inputs.normalized(), inputs.classify_normalized
    return inputs.images, inputs.classify


def _ad_ic(inputs: MetricInputs, fractions: tuple[float, ...]) -> dict[str, jax.Array]:
    return metrics.ad_ic(inputs.classify, inputs.images, inputs.maps, inputs.classes, fractions)


def _road_levels(config: Any) -> tuple[tuple[str, float], ...]:
    """Returns the (order, fraction) levels: MoRF at eval.road_fractions, LeRF at
    eval.road_lerf_fractions (empty: the same fractions)."""
    lerf = tuple(config.eval.get("road_lerf_fractions", ())) or tuple(config.eval.road_fractions)
    for f in (*config.eval.road_fractions, *lerf):
        if not 0 < f < 1:
            raise ValueError(f"ROAD fraction {f!r} in config.eval.road_fractions / "
                             "road_lerf_fractions: use fractions of the pixels in (0, 1), "
                             "e.g. 0.1 for 10%")
    return (*(("morf", float(f)) for f in config.eval.road_fractions),
            *(("lerf", float(f)) for f in lerf))


def _road(inputs: MetricInputs, levels: tuple[tuple[str, float], ...], variant: str
          ) -> dict[str, jax.Array]:
    space, selection = ROAD_VARIANTS[variant]
    x, classify = _space(inputs, space)
    kept = metrics.road_levels(classify, x, inputs.maps, inputs.classes, inputs.key, levels,
                               selection=selection, index=inputs.index)  # (B, L)
    return {f"road_{order}_{_pct(f)}": kept[:, i].astype(jnp.float32)
            for i, (order, f) in enumerate(levels)}


def _insertion_deletion(inputs: MetricInputs, step: int, variant: str) -> dict[str, jax.Array]:
    space, substrate = INSERTION_VARIANTS[variant]
    x, classify = _space(inputs, space)
    return metrics.insertion_deletion(classify, x, inputs.maps, inputs.classes, step=step,
                                      substrate=substrate)


def _insertion_options(config: Any) -> dict[str, Any]:
    step = int(config.eval.insertion_step)
    if step < 0:
        raise ValueError(f"config.eval.insertion_step={step}: use a number of pixels per step, "
                         "or 0 for one image row (RISE: 224 at 224 x 224)")
    return {"step": step or int(config.data.image_size),
            "variant": _choice(config, "insertion_variant", tuple(INSERTION_VARIANTS))}


def _agreement(inputs: MetricInputs) -> dict[str, jax.Array]:
    masked = inputs.classify(inputs.images * inputs.maps[..., None])
    return {"agreement": (jnp.argmax(masked, -1) == inputs.classes).astype(jnp.float32)}


def _pointing_classes(config: Any) -> tuple[str, ...]:
    chosen = tuple(config.eval.pointing_classes)
    bad = [c for c in chosen if c not in POINTING_CLASSES]
    if bad or not chosen:
        raise ValueError(f"config.eval.pointing_classes={chosen!r}: use one or both of "
                         f"{POINTING_CLASSES} ('label': the ground-truth class's map, as Zhang "
                         "et al.; 'predicted': the explained class's, reported as pointing_pred)")
    return chosen


def _pointing(inputs: MetricInputs, classes: tuple[str, ...]) -> dict[str, jax.Array]:
    out = {}
    if "label" in classes:
        out["pointing"] = metrics.pointing_game(inputs.label_maps, inputs.boxes)
    if "predicted" in classes:
        out["pointing_pred"] = metrics.pointing_game(inputs.maps, inputs.boxes)
    return {k: v.astype(jnp.float32) for k, v in out.items()}


register_metric(Metric(
    "ad_ic", _ad_ic,
    columns=lambda c: [f"{m}_{_pct(f)}" for f in c.eval.ad_ic_fractions for m in ("ad", "ic")],
    options=lambda c: {"fractions": tuple(c.eval.ad_ic_fractions)}, percent=True,
    better=lambda col: "lower" if col.startswith("ad_") else "higher"))
register_metric(Metric(
    "road", _road,
    columns=lambda c: [f"road_{o}_{_pct(f)}" for o, f in _road_levels(c)],
    options=lambda c: {"levels": _road_levels(c),
                       "variant": _choice(c, "road_variant", tuple(ROAD_VARIANTS))},
    percent=True, better=lambda col: "lower" if col.startswith("road_morf") else "higher"))
register_metric(Metric(
    "insertion_deletion", _insertion_deletion, columns=lambda c: ["insertion", "deletion"],
    options=_insertion_options, decimals=3,
    better=lambda col: "lower" if col == "deletion" else "higher"))
register_metric(Metric("agreement", _agreement, columns=lambda c: ["agreement"], percent=True))
register_metric(Metric(
    "pointing", _pointing,
    columns=lambda c: [{"label": "pointing", "predicted": "pointing_pred"}[k]
                       for k in _pointing_classes(c)],
    options=lambda c: {"classes": _pointing_classes(c)}, percent=True, needs_boxes=True,
    needs_label_maps=lambda c: "label" in _pointing_classes(c)))
register_metric(Metric(
    "energy_in_box", lambda i: {"energy_in_box": metrics.energy_in_box(i.maps, i.boxes)},
    columns=lambda c: ["energy_in_box"], percent=True, needs_boxes=True))


def selected_metrics(config: Any, with_boxes: bool) -> list[Metric]:
    """Returns the metrics to compute: config.eval.metrics (default all registered) that the
    data supports (box metrics only where the data has boxes). Their options are checked."""
    names = tuple(config.eval.get("metrics", ()) or METRICS)
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"config.eval.metrics: unknown {unknown}; registered metrics are "
                         f"{tuple(METRICS)}")
    chosen = [METRICS[n] for n in names if with_boxes or not METRICS[n].needs_boxes]
    for m in chosen:
        m.options(config)  # raises on an unknown option value
    return chosen


def check_data(config: Any, with_boxes: bool, labels: np.ndarray | None = None) -> None:
    """Raises ValueError naming the fix if the eval data lacks what the chosen metrics need:
    object boxes for metrics asked for by name, or labels for maps of the ground-truth class."""
    asked = tuple(config.eval.get("metrics", ()))
    boxed = [n for n in asked if n in METRICS and METRICS[n].needs_boxes]
    if boxed and not with_boxes:
        raise ValueError(
            f"config.eval.metrics asks for {boxed}, which need object boxes, but the eval data "
            f"(config.data.source={config.data.source!r}, split "
            f"{config.data.get('eval_split')!r}) has none: remove them from config.eval.metrics "
            "(an empty config.eval.metrics computes every metric the data supports), or "
            "evaluate on data with boxes (synthetic_shapes)")
    if labels is not None and (labels < 0).any() and any(
            m.needs_label_maps(config) for m in selected_metrics(config, with_boxes)):
        raise ValueError(
            "the pointing game on the ground-truth class needs labels, but the eval data has "
            "images without one (a list file of paths only): give the list file `path label` "
            "lines, or set --config.eval.pointing_classes=predicted")


def metric_columns(config: Any, with_boxes: bool) -> list[str]:
    """Returns the result columns in table order."""
    return [col for m in selected_metrics(config, with_boxes) for col in m.columns(config)]


def column_formats(config: Any, with_boxes: bool) -> dict[str, dict[str, Any]]:
    """Returns {column: {'percent': bool, 'decimals': int, 'better': 'higher'|'lower'}}."""
    return {col: {"percent": m.percent, "decimals": m.decimals, "better": m.better(col)}
            for m in selected_metrics(config, with_boxes) for col in m.columns(config)}


def _frozen(options: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(options.items()))


REPLICATED, SPLIT = P(), P(BATCH_AXIS)


def _per_device(fn: Callable[..., Any], mesh: Mesh | None, in_specs: tuple) -> Callable:
    """Returns fn jitted; with a mesh, run per device on its slice of the batch (in_specs:
    REPLICATED or SPLIT per positional argument; the outputs are SPLIT).

    The bodies hold no collectives: each device is an independent program on its images.
    check_vma=False keeps autodiff inside them per device (Grad-CAM's gradient w.r.t. a zero
    perturbation built in the body would otherwise be summed over the devices, as the
    transpose of a replicated value)."""
    if mesh is None:
        return jax.jit(fn)
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=SPLIT,
                                 check_vma=False))


def _batch_metrics(model: Model, images: jax.Array, maps: jax.Array, classes: jax.Array,
                   key: jax.Array, boxes: jax.Array | None, labels: jax.Array | None,
                   label_maps: jax.Array | None, index: jax.Array, *, plan: tuple
                   ) -> dict[str, jax.Array]:
    inputs = MetricInputs(model, images, maps, classes, key, boxes, labels, label_maps, index)
    out = {}
    for name, options in plan:
        out.update(METRICS[name].fn(inputs, **dict(options)))
    return out


@functools.cache
def _jitted_metrics(plan: tuple, mesh: Mesh | None) -> Callable[..., dict[str, jax.Array]]:
    run = _per_device(functools.partial(_batch_metrics, plan=plan), mesh,
                      (REPLICATED, SPLIT, SPLIT, SPLIT, REPLICATED, SPLIT, SPLIT, SPLIT, SPLIT))

    def args(model, images, maps, classes, key, boxes=None, labels=None, label_maps=None,
             index=None):
        if index is None:  # the position in the batch
            index = np.arange(images.shape[0], dtype=np.int32)
        return model, images, maps, classes, key, boxes, labels, label_maps, index

    def fn(*a: Any, **kw: Any) -> dict[str, jax.Array]:
        return run(*args(*a, **kw))

    fn.lower = lambda *a, **kw: run.lower(*args(*a, **kw))
    return fn


def batch_metrics(config: Any, with_boxes: bool, mesh: Mesh | None = None
                  ) -> Callable[..., dict[str, jax.Array]]:
    """Returns jitted fn(model, images, maps, classes, key, boxes, labels=None, label_maps=None,
    index=None) -> {column: (B,)}: one program per architecture and settings, shared by every
    method evaluated in the process. With a mesh, each device computes the metrics of its
    images. index (B,): each image's index in the eval split (default: its position in the
    batch); per-image randomness (ROAD's noise) is drawn from it."""
    plan = tuple((m.name, _frozen(m.options(config)))
                 for m in selected_metrics(config, with_boxes))
    return _jitted_metrics(plan, mesh)


def needs_label_maps(config: Any, with_boxes: bool) -> bool:
    """Returns whether a selected metric reads the maps of the data's labels."""
    return any(m.needs_label_maps(config) for m in selected_metrics(config, with_boxes))


def _method_maps(model: Model, attention_vars: Any, images: jax.Array, classes: jax.Array,
                 key: jax.Array, *, method: str, options: tuple) -> jax.Array:
    return METHODS[method].maps(model, attention_vars, images, classes, key, **dict(options))


@functools.cache
def _jitted_maps(method: str, options: tuple, mesh: Mesh | None) -> Callable[..., jax.Array]:
    return _per_device(functools.partial(_method_maps, method=method, options=options), mesh,
                       (REPLICATED, REPLICATED, SPLIT, SPLIT, REPLICATED))


def map_fn(method: str, config: Any, mesh: Mesh | None = None) -> Callable[..., jax.Array]:
    """Returns jitted fn(model, attention_vars, images, classes, key) -> maps (B, H, W) of
    `classes` (B,), one program per method and settings. With a mesh, each device computes the
    maps of its images (the batch must divide by the number of devices)."""
    m = get_method(method)
    return _jitted_maps(m.name, _frozen(m.options(config)), mesh)


def _predict(model: Model, images: jax.Array) -> jax.Array:
    return jnp.argmax(model.classify(images), axis=-1)


@functools.cache
def predict_fn(mesh: Mesh | None = None) -> Callable[..., jax.Array]:
    """Returns jitted fn(model, images) -> the top-1 classes (B,) of images in [0, 1] (the
    classes evaluate explains); with a mesh, per device."""
    return _per_device(_predict, mesh, (REPLICATED, SPLIT))


SUB_BATCH = 8  # slow methods recompute the maps of misclassified images this many at a time


def _label_targets_fn(labels: jax.Array, valid: jax.Array, classes: jax.Array
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Returns (the labels where known and valid, else the classes; the indices of the images
    where they differ, padded with -1; how many differ)."""
    target = jnp.where((labels >= 0) & valid, labels, classes).astype(classes.dtype)
    differ = target != classes
    idx = jnp.nonzero(differ, size=differ.shape[0], fill_value=-1)[0]
    return target, idx, differ.sum()


@functools.cache
def _label_targets(sharding: jax.sharding.Sharding) -> Callable[..., tuple]:
    """Returns `_label_targets_fn` jitted with replicated outputs: every host can read them."""
    return jax.jit(_label_targets_fn, out_shardings=sharding)


@jax.jit
def _take_rows(images: jax.Array, target: jax.Array, idx: jax.Array
               ) -> tuple[jax.Array, jax.Array]:
    return images[jnp.maximum(idx, 0)], target[jnp.maximum(idx, 0)]


@jax.jit
def _put_rows(maps: jax.Array, idx: jax.Array, rows: jax.Array) -> jax.Array:
    return maps.at[jnp.where(idx >= 0, idx, maps.shape[0])].set(rows, mode="drop")


def label_maps_of(maps_of: Callable[..., jax.Array], model: Model, attention_vars: Any,
                  images: jax.Array, key: jax.Array, classes: jax.Array, maps: jax.Array,
                  labels: jax.Array, valid: jax.Array, slow: bool = False) -> jax.Array:
    """Returns the maps of the data's labels (B, H, W): the explained maps where the label is
    the explained class (a good classifier's usual case), the method's maps for the label where
    not: for the whole batch again (fast methods; nothing for a batch without a mismatch), or,
    for slow methods, for the misclassified images only, SUB_BATCH at a time. Every process
    takes the same branches (the decisions are replicated values)."""
    mesh = labels.sharding.mesh
    replicated = jax.sharding.NamedSharding(mesh, P())
    target, idx, count = jax.device_get(_label_targets(replicated)(labels, valid, classes))
    count = int(count)
    if count == 0:
        return maps
    if not slow:
        return maps_of(model, attention_vars, images, jnp.asarray(target), key)
    sub = -(-SUB_BATCH // mesh.size) * mesh.size  # divides over the devices
    for start in range(0, count, sub):
        chunk = np.full(sub, -1, np.int32)
        part = idx[start:min(start + sub, count)]
        chunk[:len(part)] = part
        sub_images, sub_target = _take_rows(images, jnp.asarray(target), jnp.asarray(chunk))
        sub_maps = maps_of(model, attention_vars, sub_images, sub_target, key)
        maps = _put_rows(maps, jnp.asarray(chunk), sub_maps)
    return maps


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


def num_examples(config: Any, method: str) -> int:
    """Returns how many eval examples a method runs on (<= 0: all): eval.num_examples, or for
    the slow methods (a pass per channel or mask) eval.num_examples_slow where that is > 0."""
    n = int(config.eval.num_examples)
    slow = int(config.eval.get("num_examples_slow", -1))
    if get_method(method).slow and slow > 0:
        return min(n, slow) if n > 0 else slow
    return n


def _gather_rows(local: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Returns the per-image arrays of all processes, concatenated in process order (one
    process: as given), bit for bit: the values travel as the uint32 words of their float64
    form (JAX arrays without x64 would round them to float32)."""
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    out = {}
    for k, v in local.items():
        words = np.ascontiguousarray(np.asarray(v, np.float64)).view(np.uint32)
        gathered = np.asarray(multihost_utils.process_allgather(words), np.uint32)
        out[k] = np.ascontiguousarray(gathered.reshape(-1)).view(np.float64).astype(v.dtype)
    return out


FirstBatch = Callable[[dict[str, np.ndarray], np.ndarray, np.ndarray], None]


def evaluate_per_image(config: Any, model: Model, method: str, attention_vars: Any = None,
                       label: str = "eval", on_first_batch: FirstBatch | None = None
                       ) -> dict[str, np.ndarray]:
    """Returns per-image values over the eval set: {column: (N,)} on the table's scale
    (percent columns x 100), plus 'image' (the index in the eval split, whatever the number of
    hosts and devices), 'label' (the data's, -1 unknown) and 'class' (the explained class),
    sorted by image.

    on_first_batch(batch, maps, classes): called with this host's first batch and its maps
    (B, H, W) and classes (B,) as numpy (the demo draws its grid from them).
    """
    from tame_jax import data

    mesh = make_mesh()
    check_global_batch(config.eval.batch_size, mesh, "eval.batch_size")
    selected_metrics(config, True)  # unknown metrics and options fail before any work
    info = data.get_dataset_info(config)
    limit = num_examples(config, method)
    num = min(limit, info.num_eval_examples) if limit > 0 else info.num_eval_examples
    global_batch = config.eval.batch_size
    num_batches = -(-num // global_batch)
    batches = _limited(data.eval_iterator(config, global_batch_size=global_batch), limit,
                       global_batch)
    model = replicate(model, mesh)
    attention_vars = replicate(attention_vars, mesh) if attention_vars is not None else None
    maps_of = map_fn(method, config, mesh)
    predict = predict_fn(mesh)
    # One key for every batch: RISE's masks are the same for every image (as its authors
    # use one set), ROAD's noise follows each image's index in the split, so an image's values
    # do not depend on its batch, its device or the number of hosts.
    k_map, k_metrics = jax.random.split(jax.random.key(config.seed))
    progress = cli.progress_bar(num_batches, label, unit="batch")
    rows: dict[str, list[np.ndarray]] = {}
    for i, batch in enumerate(batches):
        with_boxes = "bbox" in batch
        if i == 0:
            check_data(config, with_boxes, batch["label"][batch["valid"]])
        metrics_of = batch_metrics(config, with_boxes, mesh)
        formats = column_formats(config, with_boxes)
        want_label_maps = needs_label_maps(config, with_boxes)
        names = ("image", "bbox", "index", "label", "valid") if want_label_maps else (
            "image", "bbox", "index")
        arrays = shard_batch({k: batch[k].astype(np.int32) if k == "index" else batch[k]
                              for k in names if k in batch}, mesh)
        classes = predict(model, arrays["image"])
        maps = maps_of(model, attention_vars, arrays["image"], classes, k_map)
        label_maps = None
        if want_label_maps:
            label_maps = label_maps_of(maps_of, model, attention_vars, arrays["image"], k_map,
                                       classes, maps, arrays["label"], arrays["valid"],
                                       slow=get_method(method).slow)
        out = metrics_of(model, arrays["image"], maps, classes, k_metrics, arrays.get("bbox"),
                         arrays.get("label"), label_maps, arrays["index"])
        local = len(batch["valid"])
        if i == 0 and on_first_batch is not None:
            on_first_batch(batch, local_rows(maps).reshape(local, *maps.shape[1:]),
                           local_rows(classes)[:local].astype(np.int64))
        record = {"image": np.asarray(batch["index"]), "valid": batch["valid"],
                  "label": np.asarray(batch["label"]), "class": local_rows(classes)[:local]}
        for k, v in out.items():
            record[k] = (100.0 if formats[k]["percent"] else 1.0) * local_rows(v)[:local]
        for k, v in record.items():
            rows.setdefault(k, []).append(np.asarray(v))
        progress.update()
    progress.close()
    if not rows:
        raise ValueError("the eval set is empty: check config.data and --eval_list")
    table = _gather_rows({k: np.concatenate(v) for k, v in rows.items()})
    keep = table.pop("valid").astype(bool)
    order = np.argsort(table["image"][keep], kind="stable")
    out = {k: v[keep][order] for k, v in table.items()}
    if len(out["image"]) == 0:
        raise ValueError("the eval set is empty: check config.data and --eval_list")
    for k in ("image", "label", "class"):
        out[k] = out[k].astype(np.int64)
    return out


def summarise(per_image: dict[str, np.ndarray]) -> dict[str, float]:
    """Returns {column: mean} of per-image values (already on the table's scale), num_images."""
    result = {k: float(np.mean(v)) for k, v in per_image.items()
              if k not in ("image", "label", "class")}
    result["num_images"] = len(per_image["image"])
    return result


def evaluate_maps(config: Any, model: Model, method: str, attention_vars: Any = None,
                  label: str = "eval") -> dict[str, float]:
    """Returns {column: mean} over the eval set (percent columns x 100) and num_images."""
    return summarise(evaluate_per_image(config, model, method, attention_vars, label))


def row_name(config: Any, method: str) -> str:
    """Returns the table name of a method: TAME rows carry the attention variant's name."""
    if get_method(method).trained and config.model.variant != "tame":
        return config.model.variant
    return method


def run(config: Any, workdir: str, *, method: str = "tame", steps: str = "latest",
        out_dir: str | None = None, on_first_batch: FirstBatch | None = None
        ) -> list[dict[str, Any]]:
    """Returns the table rows of one method (one per checkpoint for TAME) and writes them:
    OUT/<name>.{csv,json,md} and the per-image values OUT/<name>.per_image.csv.

    on_first_batch: see `evaluate_per_image` (called for the first evaluated checkpoint).
    """
    from tame_jax.model import build_model

    m = get_method(method)
    selected_metrics(config, True)  # unknown metrics and options fail before any work
    model = build_model(config)
    out_dir = out_dir or os.path.join(workdir, "eval")
    name = row_name(config, method)
    rows, per_image = [], []
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
            values = evaluate_per_image(config, model, method, attention_vars,
                                        label=f"{name} step {step}",
                                        on_first_batch=on_first_batch)
            on_first_batch = None
            rows.append({"method": name, "step": step, **summarise(values)})
            per_image.append((step, values))
    else:
        values = evaluate_per_image(config, model, method, None, label=method,
                                    on_first_batch=on_first_batch)
        rows.append({"method": name, "step": "-", **summarise(values)})
        per_image.append(("-", values))
    with_boxes = any(c in rows[0] for c in metric_columns(config, True)
                     if c not in metric_columns(config, False))
    columns = [c for c in metric_columns(config, with_boxes) if c in rows[0]]
    if jax.process_index() == 0:
        formats = column_formats(config, with_boxes)
        paths = report.write_tables(rows, columns, out_dir, name, formats=formats,
                                    per_image=per_image)
        logging.info("wrote %s", ", ".join(paths.values()))
        with open(paths["md"]) as f:
            print(f.read())
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
