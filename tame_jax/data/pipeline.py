"""tf.data input pipelines: ImageNet (tfds), image folders, list files and synthetic_shapes.

Every batch is a dict of numpy arrays for this host: 'image' float32 (b, H, W, 3) in [0, 1],
'label' int32 (b,), and for evaluation 'valid' bool (b,) (False on padding), plus for
synthetic_shapes evaluation 'bbox' float32 (b, 4) in pixels and 'object_mask' bool (b, H, W).

Order and augmentation are pure functions of (seed, process, epoch, position in epoch):
each epoch visits this host's examples in an order drawn from (seed, process, epoch), and the
crop/flip of an example uses stateless random ops keyed by the same numbers and its position.
So `train_iterator(start_step=k)` yields exactly the batches an uninterrupted run yields from
step k on, and it gets there without decoding the skipped examples.

Broken images (`config.data.on_bad_image`): decoding errors drop the example inside tf.data
(`ignore_errors`), each element carries its position, and the batches are re-cut at the same
block boundaries as if nothing was dropped, so a bad file never shifts later batches. With
"error" the first missing position raises `BadImageError` naming the file. With "skip" it is
counted (`iterator.bad_images`, and the process-wide `BAD_IMAGES`), logged, and its slot is
filled by repeating another example of the same batch (train) or marked invalid (eval).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Iterator

import numpy as np
import tensorflow as tf

from tame_jax.data import synthetic_shapes
from tame_jax.data.preprocess import make_preprocess
from tame_jax.data.sources import (
    default_eval_split,
    folder_classes,
    make_source,
    read_list_file,
    tfds_builder,
)

_MAX_LOGGED = 20  # bad images named in the log per iterator; all are counted

log = logging.getLogger(__name__)
Batch = dict[str, np.ndarray]


# --------------------------------------------------------------------------- public types


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Sizes of a data set as configured (all hosts together)."""

    num_classes: int
    num_train_examples: int
    num_eval_examples: int
    image_size: int


class BadImageError(ValueError):
    """An image could not be decoded and config.data.on_bad_image == "error"."""


@dataclasses.dataclass
class BadImageLog:
    """How many broken images were dropped, and which (the first 1000 are named)."""

    count: int = 0
    names: list[str] = dataclasses.field(default_factory=list)

    def add(self, name: str) -> None:
        """Counts one dropped image."""
        self.count += 1
        if len(self.names) < 1000:
            self.names.append(name)


BAD_IMAGES = BadImageLog()  # every image skipped by any iterator of this process


class DataIterator(Iterator[Batch]):
    """An iterator of numpy batches that also exposes its bad-image log and its length."""

    def __init__(self, batches: Iterator[Batch], bad_images: BadImageLog, length: int | None):
        self._batches = batches
        self.bad_images = bad_images
        self.length = length  # batches per epoch (train) or in total (eval)

    def __next__(self) -> Batch:
        """Returns the next batch."""
        return next(self._batches)

    def __len__(self) -> int:
        """Returns the number of batches per epoch (train) or in total (eval)."""
        if self.length is None:
            raise TypeError("length unknown")
        return self.length


# --------------------------------------------------------------------------- batching


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """Returns (process_index, process_count), defaulting to JAX's."""
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, {process_count})")
    return process_index, process_count


def _local_batch(global_batch_size: int, process_count: int) -> int:
    """Returns the per-host batch size, or raises if the global batch does not split evenly."""
    if global_batch_size <= 0 or global_batch_size % process_count:
        up = max(process_count, -(-global_batch_size // process_count) * process_count)
        raise ValueError(
            f"global batch size {global_batch_size} does not split evenly over "
            f"{process_count} processes: use a multiple of {process_count}, e.g. {up}."
        )
    return global_batch_size // process_count


def _batched(config, ds, preprocess, local_batch: int):
    """Returns ds mapped, with undecodable elements dropped, batched and prefetched."""
    calls = config.data.get("num_parallel_calls") or os.cpu_count() or 1
    ds = ds.map(preprocess, num_parallel_calls=calls, deterministic=True)
    ds = ds.ignore_errors().batch(local_batch).prefetch(config.data.get("prefetch_batches", 2))
    options = tf.data.Options()
    options.deterministic = True
    # Autotuning off, with fixed parallelism instead: its optimisation thread sleeps up to 60 s
    # between rounds, and deleting an iterator (a finished eval pass, or training's iterator
    # at the end) waited for it: up to a minute lost per pass, measured in the demo.
    options.autotune.enabled = False
    if config.data.get("threads"):
        options.threading.private_threadpool_size = int(config.data.threads)
    return ds.with_options(options)


# --------------------------------------------------------------------------- re-alignment


def _take(batch: Batch, sl: slice) -> Batch:
    """Returns rows sl of every array of a batch."""
    return {k: v[sl] for k, v in batch.items()}


def _blocks(
    batches: Iterator[Batch], block: int, first_block: int, end: int
) -> Iterator[tuple[int, Batch]]:
    """Yields (b, rows at positions [b * block, (b + 1) * block) ∩ [0, end)) for every block b.

    `batches` come in increasing 'pos' order, with holes where an element was dropped; a block
    is complete once a later position (or a full block, or the end) has been seen.
    """
    buf: Batch | None = None
    b = first_block
    for batch in batches:
        buf = batch if buf is None else {k: np.concatenate([buf[k], batch[k]]) for k in batch}
        while buf is not None:
            n = int(np.searchsorted(buf["pos"], (b + 1) * block))
            if n == len(buf["pos"]) and n < block:
                break  # block b may still get rows from the next batch
            yield b, _take(buf, slice(0, n))
            buf = _take(buf, slice(n, None)) if n < len(buf["pos"]) else None
            b += 1
    while b * block < end:
        n = 0 if buf is None else int(np.searchsorted(buf["pos"], (b + 1) * block))
        yield b, (_take(buf, slice(0, n)) if buf is not None else {})
        buf = _take(buf, slice(n, None)) if buf is not None else None
        b += 1


class _BadImages:
    """Reports positions missing from a block: raises ("error") or counts and logs ("skip")."""

    def __init__(self, config, source, pi: int, pc: int, log_: BadImageLog):
        self.mode = config.data.get("on_bad_image", "skip")
        if self.mode not in ("skip", "error"):
            raise ValueError(f"config.data.on_bad_image={self.mode!r}: use 'skip' or 'error'.")
        self.source, self.pi, self.pc, self.log = source, pi, pc, log_

    def check(self, rows: Batch, lo: int, hi: int, order_seed: tuple | None) -> None:
        """Handles the positions in [lo, hi) that are not in rows['pos']."""
        have = rows.get("pos", np.zeros(0, np.int64))
        if len(have) == hi - lo:
            return
        for pos in np.setdiff1d(np.arange(lo, hi), have):
            name = self.source.describe(self.pi, self.pc, order_seed, int(pos))
            if self.mode == "error":
                why = self.source.diagnose(self.pi, self.pc, order_seed, int(pos))
                raise BadImageError(
                    f"Cannot decode image {name}: {why}. Fix: remove or replace this file, or "
                    "set config.data.on_bad_image='skip' to drop unreadable images (counted "
                    "and logged)."
                )
            self.log.add(name)
            BAD_IMAGES.add(name)
            if self.log.count <= _MAX_LOGGED:
                log.warning("Skipping unreadable image %s (%d skipped so far).", name,
                            self.log.count)  # fmt: skip


# --------------------------------------------------------------------------- public API


def get_dataset_info(config) -> DatasetInfo:
    """Returns the number of classes, train/eval example counts (all hosts) and image size."""
    train_split = config.data.get("train_split", "train")
    eval_split = default_eval_split(config)

    def count(split: str) -> int:
        try:
            return make_source(config, split).num_examples(0, 1)
        except FileNotFoundError:
            return 0

    kind = config.data.source
    if kind == "folder":
        num_classes = len(folder_classes(config))
    elif kind == "list":
        num_classes = config.data.get("num_classes") or 1 + max(
            max(read_list_file(config, s)[1], default=-1)
            for s in (train_split, eval_split)
            if config.data.get(f"{s}_list_file") or config.data.get("list_file")
        )
    elif kind in ("imagenet2012", "synthetic_shapes"):
        num_classes = tfds_builder(config).info.features["label"].num_classes
    else:
        make_source(config, train_split)  # raises the unknown-source error
        raise AssertionError
    return DatasetInfo(
        num_classes=int(num_classes),
        num_train_examples=count(train_split),
        num_eval_examples=count(eval_split),
        image_size=int(config.data.image_size),
    )


def _train_steps(source, local_batch: int, pc: int) -> int:
    """Returns the steps per epoch: the smallest host shard // local batch (same on all hosts)."""
    smallest = min(source.num_examples(i, pc) for i in range(pc))
    if smallest < local_batch:
        raise ValueError(
            f"Each host's train shard has at least {smallest} examples, fewer than the local "
            f"batch {local_batch}: lower the batch size or use more data."
        )
    return smallest // local_batch


def steps_per_epoch(config, global_batch_size: int) -> int:
    """Returns the number of train steps per epoch (the same on every host)."""
    _, pc = _process(None, None)
    source = make_source(config, config.data.get("train_split", "train"))
    return _train_steps(source, _local_batch(global_batch_size, pc), pc)


def train_iterator(
    config,
    *,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
) -> DataIterator:
    """Returns an endless iterator of this host's train batches, starting at start_step.

    Batch k is the same whatever start_step the iterator was built with.
    """
    pi, pc = _process(process_index, process_count)
    lb = _local_batch(global_batch_size, pc)
    source = make_source(config, config.data.get("train_split", "train"))
    steps = _train_steps(source, lb, pc)
    bad_log = BadImageLog()
    bad = _BadImages(config, source, pi, pc, bad_log)

    def batches() -> Iterator[Batch]:
        epoch, step = divmod(int(start_step), steps)
        while True:
            order_seed = (int(seed), pi, epoch)
            pre = make_preprocess(config, train=True, seed=seed, pi=pi, epoch=epoch)
            ds = _batched(config, source.dataset(pi, pc, order_seed, step * lb, steps * lb),
                          pre, lb)  # fmt: skip
            before = bad_log.count
            for b, rows in _blocks(ds.as_numpy_iterator(), lb, step, steps * lb):
                bad.check(rows, b * lb, (b + 1) * lb, order_seed)
                n = len(rows.get("pos", ()))
                if n == 0:
                    log.warning("Dropping train step %d of epoch %d: all its images are broken.",
                                b, epoch)  # fmt: skip
                    continue
                rows.pop("pos")
                yield rows if n == lb else _take(rows, np.arange(lb) % n)  # repeat to fill holes
            if bad_log.count > before:
                log.warning("Epoch %d: skipped %d unreadable images (%d in total).", epoch,
                            bad_log.count - before, bad_log.count)  # fmt: skip
            epoch, step = epoch + 1, 0

    return DataIterator(batches(), bad_log, steps)


def eval_iterator(
    config,
    *,
    global_batch_size: int,
    split: str | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> DataIterator:
    """Returns an iterator over every example of the split once, padded to full batches.

    'valid' is False on padding (and on skipped broken images); 'index' is each example's index
    in the split (-1 on padding), the same whatever the number of hosts. Every host yields the
    same number of batches, max over hosts of ceil(host examples / local batch).
    """
    pi, pc = _process(process_index, process_count)
    lb = _local_batch(global_batch_size, pc)
    source = make_source(config, split or default_eval_split(config))
    n = source.num_examples(pi, pc)
    num_batches = max(math.ceil(source.num_examples(i, pc) / lb) for i in range(pc))
    pre = make_preprocess(config, train=False, extras=source.extras)
    ds = _batched(config, source.dataset(pi, pc, None, 0, n), pre, lb)
    bad_log = BadImageLog()
    bad = _BadImages(config, source, pi, pc, bad_log)
    spec = {k: (v.shape[1:], v.dtype.as_numpy_dtype) for k, v in ds.element_spec.items()}

    def padded(rows: Batch) -> Batch:
        out = {}
        for k, (shape, dtype) in spec.items():
            if k == "pos":
                continue
            out[k] = np.zeros((lb, *shape), dtype)
            if k in rows:
                out[k][: len(rows[k])] = rows[k]
        out["valid"] = np.arange(lb) < len(rows.get("pos", ()))
        out["index"] = np.full(lb, -1, np.int64)
        out["index"][: len(rows.get("index", ()))] = rows.get("index", ())
        return out

    def batches() -> Iterator[Batch]:
        emitted = 0
        for b, rows in _blocks(ds.as_numpy_iterator(), lb, 0, n):
            bad.check(rows, b * lb, min((b + 1) * lb, n), None)
            if "pos" in rows:
                rows["index"] = source.split_index(pi, pc, rows["pos"])
            if len(rows.get("pos", ())) == lb:
                rows.pop("pos")
                rows["valid"] = np.ones(lb, bool)
                yield rows
            else:
                yield padded(rows)
            emitted += 1
        if bad_log.count:
            log.warning("Evaluation skipped %d unreadable images.", bad_log.count)
        for _ in range(num_batches - emitted):
            yield padded({})

    return DataIterator(batches(), bad_log, num_batches)


def prepare_synthetic_shapes(data_dir: str, *, seed: int = 0, config_name: str = "default") -> None:
    """Builds the synthetic_shapes demo data set under data_dir once (idempotent)."""
    synthetic_shapes.prepare_synthetic_shapes(data_dir, seed=seed, config_name=config_name)

