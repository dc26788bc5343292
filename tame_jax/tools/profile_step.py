"""Where the train step's (or the explanation's) time goes, op by op, from a profiler trace.

`python -m tame_jax.tools.profile_step [--backbone=resnet50] [--task=train] [--batch=8]
[--fusion=selective] [--top=25] [--trace_dir=/tmp/tame_profile]`

Compiles the task like the benchmark does, runs it twice, traces one more call with
`jax.profiler`, and prints (1) the time per kind of op (library convolutions and matmuls, and
of those the backward's input-gradient ones; transposes and copies; pooling; elementwise loop
fusions; the rest) with its share of all op time, and (2) the `--top` slowest ops with their
shapes and the JAX operation they come from. Times are summed over the CPU's worker threads.
"""

from __future__ import annotations

import argparse
import collections
import glob
import re
import tempfile
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from tame_jax import optim
from tame_jax.model import Model
from tame_jax.sharding import make_mesh, replicate, shard_batch
from tame_jax.train_step import init_state, make_train_step

SKIP = ("ThreadpoolListener", "ThunkExecutor", "end:", "SlinkyThreadPool")


def compile_task(backbone: str, task: str, batch: int, selective: bool,
                 image_size: int = 224) -> tuple[Any, Any]:
    """Returns (compiled executable, call()) of the train step or the explanation."""
    from tame_jax.bench import bench_model

    mesh = make_mesh(jax.devices()[:1])
    model = replicate(bench_model(backbone, "float32", image_size, None, 1000), mesh)
    x_np = np.random.default_rng(0).uniform(size=(batch, image_size, image_size, 3))
    x = shard_batch({"image": x_np.astype(np.float32)}, mesh)["image"]
    if task == "train":
        tx = optim.make_optimizer(1e-4, total_steps=1000)
        state = init_state(model, tx, jax.random.key(1), mesh)
        key = jax.random.key(2)
        compiled = make_train_step(mesh, tx, selective_fusion=selective).lower(
            state, model, x, key).compile()
        box = [state]

        def call():
            box[0], metrics = compiled(box[0], model, x, key)
            return metrics

        return compiled, call
    attention_vars = jax.jit(Model.init_attention)(model, jax.random.key(1))
    fn = Model.explain if selective else Model.explain_full
    compiled = jax.jit(lambda m, av, x: fn(m, av, x)[0]).lower(model, attention_vars,
                                                                  x).compile()
    return compiled, lambda: compiled(model, attention_vars, x)


def op_table(hlo_text: str) -> dict[str, tuple[str, str]]:
    """Returns {instruction name: (result shape, JAX op_name)} from an optimised HLO module."""
    out = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s+(?:ROOT )?%([\w.\-]+) = (\S+) ", line)
        if m:
            op = re.search(r'op_name="([^"]*)"', line)
            out[m.group(1)] = (m.group(2), op.group(1) if op else "")
    return out


def kind(name: str, op_name: str) -> str:
    """Returns the kind of an executed op from its HLO name and JAX op_name."""
    grad = "input-gradient " if "transpose(" in op_name else ""
    what = "conv" if "conv" in op_name or "conv" in name else "matmul"
    if name.startswith(("ynn_fusion", "xnn_fusion", "onednn")):
        return f"{grad}{what} (library call)"
    if re.match(r"(convolution|conv_general|dot)", name):
        return f"{grad}{what} (XLA's own loops, outside the library)"
    if name.startswith(("transpose", "copy")) or "_transpose" in name:
        return "transpose / copy"
    if any(k in name for k in ("reduce-window", "reduce_window", "select-and-scatter",
                               "scatter", "iota")):
        return "pooling (reduce-window, scatter)"
    if "fusion" in name:
        return "elementwise / reduction loop fusion"
    return "other"


def profile(call: Any, compiled: Any, trace_dir: str) -> list[tuple[str, float, str, str]]:
    """Returns [(op name, seconds summed over threads, shape, op_name)] of one traced call."""
    for _ in range(2):
        jax.block_until_ready(call())
    with jax.profiler.trace(trace_dir):
        jax.block_until_ready(call())
    path = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))[-1]
    table = op_table(compiled.as_text())
    times: collections.Counter[str] = collections.Counter()
    for plane in jax.profiler.ProfileData.from_file(path).planes:
        for line in plane.lines:
            if "XLA" not in line.name:
                continue
            for event in line.events:
                if not event.name.startswith(SKIP):
                    times[event.name] += event.duration_ns * 1e-9
    return [(n, t, *table.get(n, ("?", ""))) for n, t in times.most_common()]


def main(argv: Sequence[str] | None = None) -> list[tuple[str, float, str, str]]:
    """Profiles the task from command-line flags and prints the two tables; returns the ops."""
    parser = argparse.ArgumentParser(prog="python -m tame_jax.tools.profile_step",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--task", default="train", choices=("train", "explain"))
    parser.add_argument("--fusion", default="selective", choices=("selective", "full"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--trace_dir", default="")
    args = parser.parse_args(argv)
    compiled, call = compile_task(args.backbone, args.task, args.batch,
                                  args.fusion == "selective", args.image_size)
    trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="tame_profile_")
    ops = profile(call, compiled, trace_dir)
    total = sum(t for _, t, _, _ in ops)
    by_kind: collections.Counter[str] = collections.Counter()
    count: collections.Counter[str] = collections.Counter()
    for name, t, _, op_name in ops:
        by_kind[kind(name, op_name)] += t
        count[kind(name, op_name)] += 1
    print(f"{args.backbone} {args.task} ({args.fusion} fusion), batch {args.batch}: "
          f"{total * 1e3:.0f} ms of op time over all threads; trace in {trace_dir}\n")
    print("| kind | ops | ms | share |\n|---|---|---|---|")
    for k, t in by_kind.most_common():
        print(f"| {k} | {count[k]} | {t * 1e3:.0f} | {100 * t / total:.1f}% |")
    print("\n| op | ms | shape | from |\n|---|---|---|---|")
    for name, t, shape, op_name in ops[:args.top]:
        print(f"| {name} | {t * 1e3:.1f} | {shape[:40]} | {op_name[-80:]} |")
    return ops


if __name__ == "__main__":
    main()
