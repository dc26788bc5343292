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


def _record_reads(log: list[str]) -> None:
    """Makes the folder source append every file it is asked to read to `log`."""
    from tame_jax.data import sources

    original = sources._FileSource.dataset

    def dataset(self, pi, pc, order_seed, start, end):
        idx = self._order(pi, pc, order_seed)[start:end]
        log.extend(os.fsdecode(p) for p in self.paths[idx])
        return original(self, pi, pc, order_seed, start, end)

    sources._FileSource.dataset = dataset


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

    from tame_jax import cli, train

    out = sys.argv.pop(1)
    reads: list[str] = []
    _record_reads(reads)
    _record_saves(out)

    def run(config, workdir: str) -> None:
        try:
            train.main(config, workdir)
        finally:
            with open(os.path.join(out, f"read_{jax.process_index()}.json"), "w") as f:
                json.dump({"process_count": jax.process_count(), "files": reads,
                           "local_devices": jax.local_device_count(),
                           "devices": jax.device_count()}, f)

    cli.define_flags()
    cli.run(run)


if __name__ == "__main__":
    main()
