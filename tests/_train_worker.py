"""A tiny training setup for the tests that run the trainer in other processes.

As a config file: `python -m tame_jax.train --config=tests/_train_worker.py
--config.data.root=DIR --workdir=W` trains a width-8 ResNet-18 at 64 px on an image folder.

As a script: `python tests/_train_worker.py OUT --config=... --workdir=...` runs the trainer
with the same flags as `python -m tame_jax.train` and also writes, for this process,
OUT/params_<process>.npz (the attention parameters it held at its last checkpoint save) and
OUT/read_<process>.json (the files its data pipeline was asked to read, the process count).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np

from tame_jax.config import default_config


def get_config():
    """Returns the config of a short run of a narrow random ResNet-18 on an image folder."""
    c = default_config()
    c.model.backbone = "resnet18"
    c.model.backbone_kwargs = {"width": 8}
    c.model.num_classes = 10
    c.model.backbone_weights = "random"
    c.data.source = "folder"
    c.data.root = ""  # set with --config.data.root
    c.data.image_size = 64
    c.data.resize_size = 64
    c.data.num_parallel_calls = 2
    c.data.threads = 2
    c.batch_size = 8
    c.num_train_steps = 4
    c.log_every = 1
    c.checkpoint_every = 2
    c.learning_rate = 1e-2
    return c


def make_folder(root: str, *, per_class: int = 8, classes: int = 2, size: int = 64,
                seed: int = 0) -> list[str]:
    """Returns the paths of root/train/<class>/<i>.png written as distinct random images."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for k in range(classes):
        d = os.path.join(root, "train", f"class{k}")
        os.makedirs(d, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)  # (H, W, 3)
            path = os.path.join(d, f"{i:03d}.png")
            Image.fromarray(img).save(path)
            paths.append(path)
    return paths


HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = os.path.join(HERE, "_train_worker.py")
REPO = os.path.dirname(HERE)


def subprocess_env(devices: int, cache_dir: str | None = None) -> dict[str, str]:
    """Returns the environment of a trainer subprocess: CPU, `devices` fake devices, no proxy."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    if cache_dir:  # the compiled step is reused by later runs of the same program
        env.update(JAX_COMPILATION_CACHE_DIR=cache_dir,
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return env


def free_port() -> int:
    """Returns a TCP port on localhost that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def train_command(workdir: str, root: str, *overrides: str, record: str | None = None
                  ) -> list[str]:
    """Returns `python -m tame_jax.train ...` on this config (or this worker if record)."""
    head = [sys.executable, CONFIG, record] if record else [sys.executable, "-m", "tame_jax.train"]
    return [*head, f"--config={CONFIG}", f"--workdir={workdir}", f"--config.data.root={root}",
            *overrides]


def start(cmd: list[str], env: dict[str, str], log: str) -> subprocess.Popen:
    """Returns the started process, its stdout and stderr going to the file `log`."""
    with open(log, "wb") as f:
        return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, log: str, timeout: float) -> str:
    """Returns the log of the process after it ended (killed after `timeout` seconds)."""
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    with open(log, errors="replace") as f:
        return f.read()


def _record_reads(log: list[str]) -> None:
    """Makes the folder source append every file it is asked to read to `log`."""
    from tame_jax.data import pipeline

    original = pipeline._FileSource.dataset

    def dataset(self, pi, pc, order_seed, start, end):
        idx = self._order(pi, pc, order_seed)[start:end]
        log.extend(os.fsdecode(p) for p in self.paths[idx])
        return original(self, pi, pc, order_seed, start, end)

    pipeline._FileSource.dataset = dataset


def _record_saves(out: str) -> None:
    """Makes every checkpoint save also write the parameters this process holds to `out`."""
    import jax

    from tame_jax import checkpoints

    original = checkpoints.Checkpointer.save

    def save(self, step, state, **kwargs):
        leaves = jax.tree_util.tree_leaves_with_path(state.params)
        np.savez(os.path.join(out, f"params_{jax.process_index()}.npz"),  # replicated: np works
                 **{jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves})
        return original(self, step, state, **kwargs)

    checkpoints.Checkpointer.save = save


def main() -> None:
    """Runs `python -m tame_jax.train` with the extra records (see the module docstring)."""
    import jax
    from absl import app

    from tame_jax import train

    out = sys.argv.pop(1)
    reads: list[str] = []
    _record_reads(reads)
    _record_saves(out)

    def run(argv: list[str]) -> None:
        try:
            train.main(argv)
        finally:
            with open(os.path.join(out, f"read_{jax.process_index()}.json"), "w") as f:
                json.dump({"process_count": jax.process_count(), "files": reads,
                           "local_devices": jax.local_device_count(),
                           "devices": jax.device_count()}, f)

    train.define_flags()
    app.run(run, flags_parser=train.parse_flags)


if __name__ == "__main__":
    main()
