"""Input-pipeline throughput: images/s decoded and augmented, per host and per thread.

    python -m tame_jax.data.throughput --source=folder [--root=DIR] [--threads=1,2]
    python -m tame_jax.data.throughput --source=synthetic_shapes --data_dir=DIR

Without --root, a folder of ImageNet-like JPEGs (500x375, quality 90) is generated in a
temporary directory. Prints one table: for each thread count (the tf.data private thread pool
and the parallel map calls), the train (decode, resize, random crop, flip) and eval (decode,
resize, centre crop) pipelines' images/s, images/s per thread, and CPU ms per image.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import ml_collections
import numpy as np
from PIL import Image

from tame_jax import data


def make_jpeg_folder(root: str, num_images: int = 512, num_classes: int = 4, seed: int = 0) -> str:
    """Returns root after writing train/ and validation/ folders of 500x375 JPEGs."""
    rng = np.random.default_rng(seed)
    for split in ("train", "validation"):
        for i in range(num_images):
            path = os.path.join(root, split, f"class{i % num_classes}", f"{i:05d}.jpg")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            low = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
            img = np.asarray(low.resize((500, 375), Image.BICUBIC), np.int16)
            img = img + rng.integers(-12, 13, img.shape, dtype=np.int16)  # texture, like photos
            hw = (375, 500) if i % 3 else (500, 375)  # a third are portrait
            img = np.clip(img, 0, 255).astype(np.uint8)
            img = img if hw == (375, 500) else img.transpose(1, 0, 2)
            Image.fromarray(img).save(path, format="JPEG", quality=90)
    return root


def measure(
    config: ml_collections.ConfigDict, batch: int, steps: int, train: bool
) -> tuple[float, float]:
    """Returns (images/s, CPU ms/image) of the train or eval iterator after one warm-up batch.

    CPU time is the whole process's (all threads): unlike images/s it barely depends on what
    else the machine is running.
    """
    if train:
        it = data.train_iterator(
            config, global_batch_size=batch, seed=0, process_index=0, process_count=1
        )
    else:
        it = data.eval_iterator(config, global_batch_size=batch, process_index=0, process_count=1)
    next(it)  # warm-up: builds the pipeline and fills the prefetch buffer
    start, cpu = time.perf_counter(), time.process_time()
    n = 0
    for _ in range(steps):
        try:
            n += len(next(it)["label"])
        except StopIteration:
            break
    return n / (time.perf_counter() - start), 1e3 * (time.process_time() - cpu) / max(n, 1)


def main(argv: list[str] | None = None) -> list[tuple]:
    """Runs the measurement, prints the table, and returns its rows."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default="folder", choices=["folder", "synthetic_shapes"])
    p.add_argument("--root", default="", help="image folder (generated if empty)")
    p.add_argument("--data_dir", default="", help="tfds data_dir for synthetic_shapes")
    p.add_argument("--synthetic_config", default="default")
    p.add_argument("--num_images", type=int, default=512, help="generated JPEGs per split")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=12)
    args = p.parse_args(argv)

    if args.source == "folder":
        root = args.root or make_jpeg_folder(tempfile.mkdtemp(prefix="tame_jpegs_"),
                                             args.num_images)  # fmt: skip
        d = dict(source="folder", root=root, image_size=224, resize_size=256)
    else:
        data_dir = args.data_dir or tempfile.mkdtemp(prefix="tame_shapes_")
        data.prepare_synthetic_shapes(data_dir, config_name=args.synthetic_config)
        d = dict(source="synthetic_shapes", data_dir=data_dir, image_size=128, resize_size=128,
                 synthetic_config=args.synthetic_config, eval_split="test")  # fmt: skip
    rows = []
    for t in [int(x) for x in args.threads.split(",")]:
        cfg = ml_collections.ConfigDict(
            {"data": dict(d, threads=t, num_parallel_calls=t, on_bad_image="skip")}
        )
        for train in (True, False):
            ips, cpu_ms = measure(cfg, args.batch, args.steps, train)
            rows.append((args.source, "train" if train else "eval", t, ips, ips / t, cpu_ms))
    print(
        f"\n{'source':<17} {'pipeline':<8} {'threads':>7} {'images/s':>9} {'per thread':>10} "
        f"{'CPU ms/image':>12}"
    )
    for source, kind, t, ips, per, cpu_ms in rows:
        print(f"{source:<17} {kind:<8} {t:>7d} {ips:>9.1f} {per:>10.1f} {cpu_ms:>12.2f}")
    print(f"(host has {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f})")
    return rows


if __name__ == "__main__":
    main()
