"""LR range test: `python -m tame_jax.lr_finder --config=configs/X.py --workdir=DIR`.

Trains from a fresh attention module while the learning rate grows exponentially from
`--min_lr` to `--max_lr` over `--num_steps` steps (momentum fixed at 0.9), and writes
`lr_finder.csv` (step, learning rate, loss, smoothed loss) and `lr_finder.png` (loss against
learning rate, log scale) to DIR. A good peak learning rate for the one-cycle schedule is
usually a little below where the smoothed loss falls fastest, well before it blows up.
Nothing is checkpointed; an existing training run in DIR is not touched.
"""

from __future__ import annotations

import csv
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging

from tame_jax import cli, optim
from tame_jax.losses import LossConfig
from tame_jax.sharding import check_global_batch, make_mesh, replicate, shard_batch
from tame_jax.train_step import init_state, make_train_step


def exponential_lr(min_lr: float, max_lr: float, num_steps: int) -> optim.Schedule:
    """Returns a schedule going from min_lr at step 0 to max_lr at step num_steps - 1."""
    ratio = math.log(max_lr / min_lr) / max(num_steps - 1, 1)
    return lambda step: min_lr * jnp.exp(ratio * jnp.asarray(step, jnp.float32))


def smooth(values: np.ndarray, beta: float = 0.9) -> np.ndarray:
    """Returns the bias-corrected exponential moving average of values."""
    out, avg = np.empty(len(values)), 0.0
    for i, v in enumerate(values):
        avg = beta * avg + (1 - beta) * v
        out[i] = avg / (1 - beta ** (i + 1))
    return out


def run(config: Any, workdir: str, *, min_lr: float, max_lr: float, num_steps: int,
        stop_factor: float = 4.0) -> dict[str, np.ndarray]:
    """Returns {'lr', 'loss', 'smoothed'} of the sweep; writes the CSV and the PNG to workdir."""
    from tame_jax import data
    from tame_jax.model import build_model

    if not 0 < min_lr < max_lr:
        raise ValueError(f"need 0 < min_lr < max_lr, got min_lr={min_lr}, max_lr={max_lr}")
    os.makedirs(workdir, exist_ok=True)
    mesh = make_mesh()
    check_global_batch(config.batch_size, mesh)
    model = build_model(config)
    schedule = exponential_lr(min_lr, max_lr, num_steps)
    tx = optim.make_optimizer(schedule, momentum=0.9, bias_lr_factor=config.bias_lr_factor)
    state = init_state(model, tx, jax.random.key(config.seed), mesh)
    step_fn = make_train_step(mesh, tx, backbone_mode=config.model.backbone_mode,
                              selective_fusion=config.model.selective_fusion,
                              train_labels=config.model.train_labels,
                              loss=LossConfig.from_config(config.get("loss")),
                              mask_space=config.loss.mask_space)
    data_labels = config.model.train_labels == "data"
    model = replicate(model, mesh)
    batches = data.train_iterator(config, global_batch_size=config.batch_size, seed=config.seed)
    key = jax.random.key(config.seed)
    logging.info("LR range test on %d devices of %d processes, batch %d", mesh.size,
                 jax.process_count(), config.batch_size)
    lrs, losses = [], []
    for step in range(num_steps):
        batch = next(batches)
        arrays = shard_batch({k: batch[k] for k in (("image", "label") if data_labels
                                                     else ("image",))}, mesh)
        state, metrics = step_fn(state, model, arrays["image"], jax.random.fold_in(key, step),
                                 arrays.get("label"))
        loss = float(metrics["loss"])
        lrs.append(float(schedule(step)))
        losses.append(loss)
        best = min(smooth(np.asarray(losses)))
        if not math.isfinite(loss) or smooth(np.asarray(losses))[-1] > stop_factor * best:
            logging.info("stopping the sweep at step %d: the loss diverged", step)
            break
        if step % 10 == 0:
            logging.info("step %d  lr %.3g  loss %.4f", step, lrs[-1], loss)
    result = {"lr": np.asarray(lrs), "loss": np.asarray(losses),
              "smoothed": smooth(np.asarray(losses))}
    if jax.process_index() == 0:
        write_outputs(result, workdir)
    return result


def write_outputs(result: dict[str, np.ndarray], workdir: str) -> None:
    """Writes lr_finder.csv and lr_finder.png into workdir."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(os.path.join(workdir, "lr_finder.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "learning_rate", "loss", "smoothed_loss"])
        for i, (lr, loss, sm) in enumerate(zip(result["lr"], result["loss"], result["smoothed"],
                                               strict=True)):
            w.writerow([i, f"{lr:.6g}", f"{loss:.6g}", f"{sm:.6g}"])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(result["lr"], result["loss"], alpha=0.3, label="loss")
    ax.plot(result["lr"], result["smoothed"], label="smoothed loss")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("TAME loss")
    ax.set_title("LR range test")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "lr_finder.png"), dpi=100)
    plt.close(fig)


def main(config: Any, workdir: str) -> None:
    """Entry point for `python -m tame_jax.lr_finder`."""
    f = flags.FLAGS
    run(config, workdir, min_lr=f.min_lr, max_lr=f.max_lr, num_steps=f.num_steps)


if __name__ == "__main__":
    cli.define_flags(workdir_help="where lr_finder.csv and lr_finder.png go")
    flags.DEFINE_float("min_lr", 1e-7, "learning rate of the first step")
    flags.DEFINE_float("max_lr", 1.0, "learning rate of the last step")
    flags.DEFINE_integer("num_steps", 200, "length of the sweep")
    cli.run(main)
