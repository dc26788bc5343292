"""Where examples come from: image folders, list files and tfds data sets (imagenet2012,
synthetic_shapes), each split into disjoint per-host shards in a seeded epoch order."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from tame_jax.data import synthetic_shapes
from tame_jax.data.preprocess import decode_rgb

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")

log = logging.getLogger(__name__)


def list_folder(root: str, split: str, classes: list[str] | None) -> tuple[list, list, list]:
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


def folder_classes(config) -> list[str]:
    """Returns the sorted class names of the folder source (from the train split if present)."""
    root = config.data.root
    for split in (config.data.get("train_split", "train"), config.data.get("eval_split")):
        if split and os.path.isdir(os.path.join(root, split)):
            return sorted(e.name for e in os.scandir(os.path.join(root, split)) if e.is_dir())
    raise FileNotFoundError(f"config.data.root={root!r} has no train or eval split folder.")


def read_list_file(config, split: str) -> tuple[list, list]:
    """Returns (paths, labels) from the split's list file: `relative/path label` lines, or
    `relative/path` lines without labels (then every label is -1); not a mix of the two."""
    list_file = config.data.get(f"{split}_list_file") or config.data.get("list_file")
    if not list_file or not os.path.isfile(list_file):
        raise FileNotFoundError(
            f"List file {list_file!r} not found: set config.data.list_file (or "
            f"config.data.{split}_list_file) to a file of `relative/path label` lines."
        )
    root = config.data.get("root") or ""
    paths, labels, unlabelled = [], [], []
    with open(list_file) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.rsplit(None, 1)
            if len(parts) == 2 and parts[1].lstrip("-").isdigit():
                paths.append(os.path.join(root, parts[0]))
                labels.append(int(parts[1]))
            else:  # a path without a label
                paths.append(os.path.join(root, line))
                labels.append(-1)
                unlabelled.append(n)
    if unlabelled and len(unlabelled) < len(paths):
        raise ValueError(
            f"{list_file}:{unlabelled[0]}: expected `relative/path label` like the other lines, "
            f"got {len(unlabelled)} line(s) without a label (first: line {unlabelled[0]}); give "
            "every line a label, or none")
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

    def split_index(self, pi: int, pc: int, pos: np.ndarray) -> np.ndarray:
        """Returns the indices in the split of host pi's examples at positions pos (in file
        order): host pi holds every pc-th file from pi."""
        return self._order(pi, pc, None)[np.asarray(pos, np.int64)]

    def describe(self, pi: int, pc: int, order_seed: tuple | None, pos: int) -> str:
        """Returns the file at epoch position pos."""
        return os.fsdecode(self.paths[self._order(pi, pc, order_seed)[pos]])

    def diagnose(self, pi: int, pc: int, order_seed: tuple | None, pos: int) -> str:
        """Returns why the file at epoch position pos cannot be read."""
        path = self.describe(pi, pc, order_seed, pos)
        try:
            decode_rgb(tf.io.read_file(path))
        except (tf.errors.OpError, ValueError) as e:
            return str(getattr(e, "message", e)).strip().splitlines()[-1]
        return "decoded fine when retried"


class _TfdsSource:
    """A tfds data set (imagenet2012 or synthetic_shapes).

    Prepared as ArrayRecord (the default for data sets prepared by this package), it is read
    by index: each epoch visits this host's examples in a seeded permutation, and reading
    epoch positions [start, end) reads exactly those records, so a resume starts where it
    stopped without reading what came before. Prepared as TFRecord (by older versions or
    other tools), it is read as a stream (shuffled files and a shuffle buffer) and a resume
    reads and discards the positions before `start`.
    """

    _RECORDS_PER_READ = 64  # records fetched per random-access read

    def __init__(self, builder: tfds.core.DatasetBuilder, split: str, shuffle_buffer: int):
        self.builder = builder
        self.split = split
        self.shuffle_buffer = shuffle_buffer
        self.extras = "object_mask" in builder.info.features
        self.random_access = builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD
        if not self.random_access:
            log.warning("%s in %s is stored as %s: resuming mid-epoch reads the epoch from its "
                        "start. Prepare it again (delete that folder) to get ArrayRecord files, "
                        "which are read by position.", builder.name, builder.data_dir,
                        builder.info.file_format)
        self._counts: dict[str, int] = {}
        self._sources: dict[str, object] = {}

    def _host_split(self, pi: int, pc: int) -> str:
        """Returns the tfds split string of host pi's disjoint shard."""
        return tfds.split_for_jax_process(self.split, process_index=pi, process_count=pc)

    def _decoders(self) -> dict:
        decoders = {"image": tfds.decode.SkipDecoding()}
        if self.extras:
            decoders["object_mask"] = tfds.decode.SkipDecoding()
        return decoders

    def _read(self, split: str, order_seed: tuple | None):
        """Returns the undecoded examples of a split as a stream (TFRecord files)."""
        seed = None if order_seed is None else _int_seed(order_seed)
        ds = self.builder.as_dataset(
            split=split,
            shuffle_files=seed is not None,
            decoders=self._decoders(),
            read_config=tfds.ReadConfig(shuffle_seed=seed, try_autocache=False),
        )
        if seed is not None:
            ds = ds.shuffle(self.shuffle_buffer, seed=seed, reshuffle_each_iteration=False)
        return ds

    def records(self, pi: int, pc: int):
        """Returns host pi's shard as a random-access sequence of serialized examples."""
        split = self._host_split(pi, pc)
        if split not in self._sources:
            self._sources[split] = self.builder.as_data_source(
                split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
        return self._sources[split]

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

    def _order(self, pi: int, pc: int, order_seed: tuple | None) -> np.ndarray:
        """Returns the record indices of host pi's shard in epoch order (random access)."""
        n = self.num_examples(pi, pc)
        if order_seed is None:
            return np.arange(n)
        return np.random.default_rng(order_seed).permutation(n)

    def split_index(self, pi: int, pc: int, pos: np.ndarray) -> np.ndarray:
        """Returns the indices in the split of host pi's examples at positions pos (in record
        order): the hosts hold consecutive blocks (`tfds.split_for_jax_process`)."""
        return sum(self.num_examples(i, pc) for i in range(pi)) + np.asarray(pos, np.int64)

    def _indexed(self, pi: int, pc: int, order_seed: tuple | None, start: int, end: int):
        """Returns the examples at epoch positions [start, end), read by index: (raw, pos)."""
        records = self.records(pi, pc)
        idx = self._order(pi, pc, order_seed)[start:end]
        step = self._RECORDS_PER_READ

        def read():
            for c in range(0, len(idx), step):
                chunk = [int(i) for i in idx[c:c + step]]
                for j, raw in enumerate(records.__getitems__(chunk)):
                    yield raw, start + c + j

        ds = tf.data.Dataset.from_generator(read, output_signature=(
            tf.TensorSpec((), tf.string), tf.TensorSpec((), tf.int64)))
        features, decoders = self.builder.info.features, self._decoders()
        return ds.map(lambda raw, pos: (pos, features.deserialize_example(raw, decoders=decoders)))

    def dataset(self, pi: int, pc: int, order_seed: tuple | None, start: int, end: int):
        """Returns the elements at epoch positions [start, end): {raw, label, pos, ...}."""
        if self.random_access:
            ds = self._indexed(pi, pc, order_seed, start, end)
        else:
            ds = self._read(self._host_split(pi, pc), order_seed).take(end).enumerate()
            ds = ds.skip(start)

        def select(pos, ex):
            out = {"raw": ex["image"], "label": tf.cast(ex["label"], tf.int32), "pos": pos}
            if self.extras:
                out["mask_raw"] = ex["object_mask"]
                out["bbox"] = tf.cast(ex["bbox"], tf.float32)
            return out

        return ds.map(select)

    def describe(self, pi: int, pc: int, order_seed: tuple | None, pos: int) -> str:
        """Returns a description of the example at epoch position pos."""
        split = self._host_split(pi, pc)
        if self.random_access:
            index = int(self._order(pi, pc, order_seed)[pos])
            return f"{self.builder.name} example {index} of '{split}' (epoch position {pos})"
        order = "in file order" if order_seed is None else f"in the order of seed {order_seed}"
        return f"{self.builder.name} example at position {pos} of '{split}' ({order})"

    def diagnose(self, pi: int, pc: int, order_seed: tuple | None, pos: int) -> str:
        """Returns a hint on why a tfds example cannot be decoded."""
        return "its encoded image does not decode; the prepared tfds files may be damaged"


def _int_seed(order_seed: tuple) -> int:
    """Returns a 31-bit integer seed derived from a tuple of ints."""
    return int(np.random.SeedSequence(list(order_seed)).generate_state(1)[0] >> 1)


def prepared(make: Callable[..., tfds.core.DatasetBuilder],
             prepare: Callable[[tfds.core.DatasetBuilder], None]) -> tfds.core.DatasetBuilder:
    """Returns make()'s builder with its data prepared, once for all processes of a job.

    Data is prepared as ArrayRecord files (`make(file_format="array_record")`), which are read
    by position; data found already prepared keeps its format. With several processes (a
    shared data_dir), process 0 prepares while the others wait at a barrier, then every
    process opens the prepared data: they never write the same files.
    """
    import jax

    builder = make()
    if builder.info.splits:
        if jax.process_count() == 1:
            return builder
    elif jax.process_index() == 0:
        prepare(make(file_format="array_record"))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"tame_jax: {builder.name} prepared")
    return make()


def tfds_builder(config) -> tfds.core.DatasetBuilder:
    """Returns the (prepared) tfds builder of config.data.source."""
    data_dir = config.data.get("data_dir") or None
    if config.data.source == "synthetic_shapes":
        name = config.data.get("synthetic_config", "default")
        if not data_dir:
            raise ValueError("synthetic_shapes needs config.data.data_dir (where it is built).")

        def build(builder: tfds.core.DatasetBuilder) -> None:
            log.info("Building synthetic_shapes/%s under %s (once).", name, data_dir)
            builder.download_and_prepare()

        return prepared(lambda **kw: synthetic_shapes.synthetic_builder(data_dir, name, **kw),
                        build)
    manual_dir = config.data.get("manual_dir") or None

    def prepare(builder: tfds.core.DatasetBuilder) -> None:
        log.info("Preparing %s from manual_dir=%s (hours for ImageNet; once).", builder.name,
                 manual_dir)  # fmt: skip
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))

    return prepared(lambda **kw: tfds.builder(config.data.source, data_dir=data_dir, **kw),
                    prepare)


def make_source(config, split: str):
    """Returns the example source for one split of config.data."""
    kind = config.data.source
    if kind == "folder":
        paths, labels, _ = list_folder(config.data.root, split, folder_classes(config))
        return _FileSource(paths, labels, split)
    if kind == "list":
        return _FileSource(*read_list_file(config, split), split)
    if kind == "synthetic_shapes" and split == "validation":
        split = "test"  # synthetic_shapes has train/test; accept the shared config default
    if kind in ("imagenet2012", "synthetic_shapes"):
        return _TfdsSource(tfds_builder(config), split, config.data.get("shuffle_buffer", 16384))
    raise ValueError(
        f"Unknown config.data.source={kind!r}: use imagenet2012, folder, list or synthetic_shapes."
    )


def default_eval_split(config) -> str:
    """Returns config.data.eval_split, or the source's usual evaluation split."""
    default = "test" if config.data.source == "synthetic_shapes" else "validation"
    return config.data.get("eval_split") or default
