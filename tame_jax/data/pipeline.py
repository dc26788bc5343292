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
from collections.abc import Callable, Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from tame_jax.data import synthetic_shapes

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
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


# --------------------------------------------------------------------------- sources


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


def _list_folder(root: str, split: str, classes: list[str] | None) -> tuple[list, list, list]:
    """Returns (paths, labels, classes) of root/split/<class>/*.{jpg,jpeg,png}, sorted."""
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        raise FileNotFoundError(
            f"No folder {split_dir!r}: config.data.root must hold one folder per split "
            "(e.g. train/, validation/), each with one sub-folder per class."
        )
    found = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
    if classes is None:
        classes = found
    elif set(found) - set(classes):
        raise ValueError(
            f"{split_dir!r} has class folders {sorted(set(found) - set(classes))} that the train "
            "split lacks: every class must have a folder in the train split."
        )
    paths, labels = [], []
    for label, name in enumerate(classes):
        class_dir = os.path.join(split_dir, name)
        if not os.path.isdir(class_dir):
            continue  # a class with no examples in this split
        files = sorted(
            e.name for e in os.scandir(class_dir)
            if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)
        )  # fmt: skip
        paths += [os.path.join(class_dir, f) for f in files]
        labels += [label] * len(files)
    if not paths:
        raise FileNotFoundError(f"No {'/'.join(IMAGE_EXTENSIONS)} images under {split_dir!r}.")
    return paths, labels, classes


def _folder_classes(config) -> list[str]:
    """Returns the sorted class names of the folder source (from the train split if present)."""
    root = config.data.root
    for split in (config.data.get("train_split", "train"), config.data.get("eval_split")):
        if split and os.path.isdir(os.path.join(root, split)):
            return sorted(e.name for e in os.scandir(os.path.join(root, split)) if e.is_dir())
    raise FileNotFoundError(f"config.data.root={root!r} has no train or eval split folder.")


def _read_list_file(config, split: str) -> tuple[list, list]:
    """Returns (paths, labels) from the `relative/path label` lines of the split's list file."""
    list_file = config.data.get(f"{split}_list_file") or config.data.get("list_file")
    if not list_file or not os.path.isfile(list_file):
        raise FileNotFoundError(
            f"List file {list_file!r} not found: set config.data.list_file (or "
            f"config.data.{split}_list_file) to a file of `relative/path label` lines."
        )
    root = config.data.get("root") or ""
    paths, labels = [], []
    with open(list_file) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.rsplit(None, 1)
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise ValueError(f"{list_file}:{n}: expected `relative/path label`, got {line!r}")
            paths.append(os.path.join(root, parts[0]))
            labels.append(int(parts[1]))
    return paths, labels


class _FileSource:
    """Images named by a list of files (folder or list-file sources)."""

    def __init__(self, paths: list[str], labels: list[int], split: str):
        self.paths = np.asarray([os.fsencode(p) for p in paths])  # bytes: 1 byte per char
        self.labels = np.asarray(labels, dtype=np.int32)
        self.split = split
        self.extras = False

    def num_examples(self, pi: int, pc: int) -> int:
        """Returns the number of examples in host pi's shard."""
        return len(range(pi, len(self.paths), pc))

    def _order(self, pi: int, pc: int, order_seed: tuple | None) -> np.ndarray:
        """Returns the indices (into self.paths) of host pi's shard in epoch order."""
        shard = np.arange(pi, len(self.paths), pc)
        if order_seed is None:
            return shard
        return shard[np.random.default_rng(order_seed).permutation(len(shard))]

    def dataset(self, pi: int, pc: int, order_seed: tuple | None, start: int, end: int):
        """Returns the elements at epoch positions [start, end): {path, label, pos}."""
        idx = self._order(pi, pc, order_seed)[start:end]
        return tf.data.Dataset.from_tensor_slices(
            {
                "path": self.paths[idx],  # read in the parallel preprocessing map
                "label": self.labels[idx],
                "pos": np.arange(start, start + len(idx), dtype=np.int64),
            }
        )

    def describe(self, pi: int, pc: int, order_seed: tuple | None, pos: int) -> str:
        """Returns the file at epoch position pos."""
        return os.fsdecode(self.paths[self._order(pi, pc, order_seed)[pos]])

    def diagnose(self, pi: int, pc: int, order_seed: tuple | None, pos: int) -> str:
        """Returns why the file at epoch position pos cannot be read."""
        path = self.describe(pi, pc, order_seed, pos)
        try:
            _decode_rgb(tf.io.read_file(path))
        except (tf.errors.OpError, ValueError) as e:
            return str(getattr(e, "message", e)).strip().splitlines()[-1]
        return "decoded fine when retried"


class _TfdsSource:
    """A tfds data set (imagenet2012 or synthetic_shapes)."""

    def __init__(self, builder: tfds.core.DatasetBuilder, split: str, shuffle_buffer: int):
        self.builder = builder
        self.split = split
        self.shuffle_buffer = shuffle_buffer
        self.extras = "object_mask" in builder.info.features
        self._counts: dict[str, int] = {}

    def _host_split(self, pi: int, pc: int) -> str:
        """Returns the tfds split string of host pi's disjoint shard."""
        return tfds.split_for_jax_process(self.split, process_index=pi, process_count=pc)

    def _read(self, split: str, order_seed: tuple | None):
        """Returns the undecoded examples of a split, shuffled from order_seed if given."""
        decoders = {"image": tfds.decode.SkipDecoding()}
        if self.extras:
            decoders["object_mask"] = tfds.decode.SkipDecoding()
        seed = None if order_seed is None else _int_seed(order_seed)
        ds = self.builder.as_dataset(
            split=split,
            shuffle_files=seed is not None,
            decoders=decoders,
            read_config=tfds.ReadConfig(shuffle_seed=seed, try_autocache=False),
        )
        if seed is not None:
            ds = ds.shuffle(self.shuffle_buffer, seed=seed, reshuffle_each_iteration=False)
        return ds

    def num_examples(self, pi: int, pc: int) -> int:
        """Returns the number of examples in host pi's shard."""
        split = self._host_split(pi, pc)
        if split not in self._counts:
            try:
                self._counts[split] = self.builder.info.splits[split].num_examples
            except (KeyError, ValueError, AssertionError):  # no split metadata (e.g. mock_data)
                ds = self._read(split, None)
                self._counts[split] = int(ds.reduce(np.int64(0), lambda n, _: n + 1))
        return self._counts[split]

    def dataset(self, pi: int, pc: int, order_seed: tuple | None, start: int, end: int):
        """Returns the elements at epoch positions [start, end): {raw, label, pos, ...}."""
        ds = self._read(self._host_split(pi, pc), order_seed).take(end).enumerate().skip(start)

        def select(pos, ex):
            out = {"raw": ex["image"], "label": tf.cast(ex["label"], tf.int32), "pos": pos}
            if self.extras:
                out["mask_raw"] = ex["object_mask"]
                out["bbox"] = tf.cast(ex["bbox"], tf.float32)
            return out

        return ds.map(select)

    def describe(self, pi: int, pc: int, order_seed: tuple | None, pos: int) -> str:
        """Returns a description of the example at epoch position pos."""
        order = "in file order" if order_seed is None else f"in the order of seed {order_seed}"
        split = self._host_split(pi, pc)
        return f"{self.builder.name} example at position {pos} of '{split}' ({order})"

    def diagnose(self, pi: int, pc: int, order_seed: tuple | None, pos: int) -> str:
        """Returns a hint on why a tfds example cannot be decoded."""
        return "its encoded image does not decode; the prepared tfds files may be damaged"


def _int_seed(order_seed: tuple) -> int:
    """Returns a 31-bit integer seed derived from a tuple of ints."""
    return int(np.random.SeedSequence(list(order_seed)).generate_state(1)[0] >> 1)


def _tfds_builder(config) -> tfds.core.DatasetBuilder:
    """Returns the (prepared) tfds builder of config.data.source."""
    data_dir = config.data.get("data_dir") or None
    if config.data.source == "synthetic_shapes":
        name = config.data.get("synthetic_config", "default")
        if not data_dir:
            raise ValueError("synthetic_shapes needs config.data.data_dir (where it is built).")
        builder = synthetic_shapes.synthetic_builder(data_dir, name)
        if not builder.info.splits:
            log.info("Building synthetic_shapes/%s under %s (once).", name, data_dir)
            builder.download_and_prepare()
        return builder
    builder = tfds.builder(config.data.source, data_dir=data_dir)
    if not builder.info.splits:
        manual_dir = config.data.get("manual_dir") or None
        log.info("Preparing %s from manual_dir=%s (hours for ImageNet; once).", builder.name,
                 manual_dir)  # fmt: skip
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
        )
    return builder


def _source(config, split: str):
    """Returns the example source for one split of config.data."""
    kind = config.data.source
    if kind == "folder":
        paths, labels, _ = _list_folder(config.data.root, split, _folder_classes(config))
        return _FileSource(paths, labels, split)
    if kind == "list":
        return _FileSource(*_read_list_file(config, split), split)
    if kind == "synthetic_shapes" and split == "validation":
        split = "test"  # synthetic_shapes has train/test; accept the shared config default
    if kind in ("imagenet2012", "synthetic_shapes"):
        return _TfdsSource(_tfds_builder(config), split, config.data.get("shuffle_buffer", 16384))
    raise ValueError(
        f"Unknown config.data.source={kind!r}: use imagenet2012, folder, list or synthetic_shapes."
    )


def _default_eval_split(config) -> str:
    """Returns config.data.eval_split, or the source's usual evaluation split."""
    default = "test" if config.data.source == "synthetic_shapes" else "validation"
    return config.data.get("eval_split") or default


# --------------------------------------------------------------------------- preprocessing


def _decode_rgb(raw: tf.Tensor) -> tf.Tensor:
    """Returns the decoded uint8 (h, w, 3) image; JPEGs with accurate DCT like PIL."""
    return tf.cond(
        tf.io.is_jpeg(raw),
        lambda: tf.io.decode_jpeg(raw, channels=3, dct_method="INTEGER_ACCURATE"),
        lambda: tf.io.decode_image(raw, channels=3, expand_animations=False),
    )


def _shorter_side_size(h: tf.Tensor, w: tf.Tensor, size: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Returns (new_h, new_w) with the shorter side = size, like torchvision's Resize(size)."""
    h64, w64 = tf.cast(h, tf.float64), tf.cast(w, tf.float64)
    new_h = tf.where(h <= w, size, tf.cast(size * h64 / w64, tf.int32))
    new_w = tf.where(h <= w, tf.cast(size * w64 / h64, tf.int32), size)
    return new_h, new_w


def _resize(img: tf.Tensor, new_h: tf.Tensor, new_w: tf.Tensor, method: str) -> tf.Tensor:
    """Returns img resized to (new_h, new_w) (float32 for bilinear); identity if same size."""
    shape = tf.shape(img)
    same = tf.logical_and(shape[0] == new_h, shape[1] == new_w)
    if method == "nearest":
        return tf.cond(same, lambda: img, lambda: tf.image.resize(img, [new_h, new_w], "nearest"))
    return tf.cond(
        same,
        lambda: tf.cast(img, tf.float32),
        lambda: tf.image.resize(img, [new_h, new_w], method="bilinear", antialias=True),
    )


def _make_preprocess(
    config, *, train: bool, seed: int = 0, pi: int = 0, epoch: int = 0, extras: bool = False
) -> Callable[[dict], dict]:
    """Returns the per-example map: decode, resize shorter side, crop (+ flip), scale to [0,1]."""
    size = int(config.data.image_size)
    resize = int(config.data.get("resize_size") or size)
    if resize < size:
        raise ValueError(f"config.data.resize_size={resize} < image_size={size}: raise it.")
    base = tf.random.experimental.stateless_fold_in(tf.constant([seed, pi], tf.int64), epoch)

    def preprocess(ex: dict) -> dict:
        raw = tf.io.read_file(ex["path"]) if "path" in ex else ex["raw"]
        img = _decode_rgb(raw)  # (h, w, 3) uint8
        h, w = tf.shape(img)[0], tf.shape(img)[1]
        new_h, new_w = _shorter_side_size(h, w, resize)
        img = _resize(img, new_h, new_w, "bilinear")  # (new_h, new_w, 3) float32 in [0, 255]
        out = {"label": ex["label"], "pos": ex["pos"]}
        if train:
            key = tf.random.experimental.stateless_fold_in(base, ex["pos"])
            crop_key, flip_key = tf.unstack(tf.random.experimental.stateless_split(key, 2))
            img = tf.image.stateless_random_crop(img, [size, size, 3], seed=crop_key)
            img = tf.image.stateless_random_flip_left_right(img, seed=flip_key)
        else:  # centre crop, offsets rounded like torchvision's CenterCrop (half to even)
            top = tf.cast(tf.math.round(tf.cast(new_h - size, tf.float32) / 2.0), tf.int32)
            left = tf.cast(tf.math.round(tf.cast(new_w - size, tf.float32) / 2.0), tf.int32)
            img = img[top : top + size, left : left + size]
            if extras:
                mask = tf.io.decode_png(ex["mask_raw"], channels=1)  # (h, w, 1) uint8 {0, 1}
                mask = _resize(mask, new_h, new_w, "nearest")[top : top + size, left : left + size]
                out["object_mask"] = tf.reshape(mask > 0, [size, size])
                scale = tf.cast(tf.stack([new_h, new_w, new_h, new_w]), tf.float32)
                shift = tf.cast(tf.stack([top, left, top, left]), tf.float32)
                out["bbox"] = tf.clip_by_value(ex["bbox"] * scale - shift, 0.0, float(size))
        out["image"] = tf.reshape(img, [size, size, 3]) / 255.0
        return out

    return preprocess


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
    eval_split = _default_eval_split(config)

    def count(split: str) -> int:
        try:
            return _source(config, split).num_examples(0, 1)
        except FileNotFoundError:
            return 0

    kind = config.data.source
    if kind == "folder":
        num_classes = len(_folder_classes(config))
    elif kind == "list":
        num_classes = config.data.get("num_classes") or 1 + max(
            max(_read_list_file(config, s)[1], default=-1)
            for s in (train_split, eval_split)
            if config.data.get(f"{s}_list_file") or config.data.get("list_file")
        )
    elif kind in ("imagenet2012", "synthetic_shapes"):
        num_classes = _tfds_builder(config).info.features["label"].num_classes
    else:
        _source(config, train_split)  # raises the unknown-source error
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
    source = _source(config, config.data.get("train_split", "train"))
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
    source = _source(config, config.data.get("train_split", "train"))
    steps = _train_steps(source, lb, pc)
    bad_log = BadImageLog()
    bad = _BadImages(config, source, pi, pc, bad_log)

    def batches() -> Iterator[Batch]:
        epoch, step = divmod(int(start_step), steps)
        while True:
            order_seed = (int(seed), pi, epoch)
            pre = _make_preprocess(config, train=True, seed=seed, pi=pi, epoch=epoch)
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

    'valid' is False on padding (and on skipped broken images); every host yields the same
    number of batches, max over hosts of ceil(host examples / local batch).
    """
    pi, pc = _process(process_index, process_count)
    lb = _local_batch(global_batch_size, pc)
    source = _source(config, split or _default_eval_split(config))
    n = source.num_examples(pi, pc)
    num_batches = max(math.ceil(source.num_examples(i, pc) / lb) for i in range(pc))
    pre = _make_preprocess(config, train=False, extras=source.extras)
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
        return out

    def batches() -> Iterator[Batch]:
        emitted = 0
        for b, rows in _blocks(ds.as_numpy_iterator(), lb, 0, n):
            bad.check(rows, b * lb, min((b + 1) * lb, n), None)
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

