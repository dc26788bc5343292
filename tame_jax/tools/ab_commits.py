"""Paired A/B timing of two versions of the package in one process: what a change gained.

`python -m tame_jax.tools.ab_commits BEFORE [AFTER] [--backbones=resnet50] [--batch=8]
[--rounds=5] [--tasks=train,explain]`

BEFORE and AFTER are git commits (AFTER defaults to the working tree); each is extracted with
`git archive` into a temporary directory under a package name of its own, so both load into
one process. Both versions build the same benchmark model (seeded random weights) and images;
the train step (class-selective fusion) and the explanation are compiled for each, then timed
alternately (A B A B ..., `--rounds` rounds), so that both see the same machine load. Prints
per task: each side's milliseconds (min–max), the speed-up A/B (median, min–max over the
rounds' pairs) and each side's loss / map checksum, which must agree (same results).
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_version(commit: str | None, root: str) -> str:
    """Returns the importable package name of `commit` (None: this working tree)."""
    if commit is None:
        return "tame_jax"
    sha = subprocess.run(["git", "rev-parse", "--short=10", commit], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout.strip()
    name = f"tame_jax_{sha}"
    target = os.path.join(root, sha)
    os.makedirs(target, exist_ok=True)
    archive = subprocess.run(["git", "archive", sha, "tame_jax"], cwd=REPO, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", target], input=archive, check=True)
    os.rename(os.path.join(target, "tame_jax"), os.path.join(target, name))
    for folder, _, files in os.walk(os.path.join(target, name)):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                with open(path) as fh:
                    text = fh.read()
                with open(path, "w") as fh:
                    fh.write(text.replace("tame_jax", name))
    sys.path.insert(0, target)
    return name


def prepare(package: str, backbone: str, batch: int, image_size: int) -> dict[str, Any]:
    """Returns {'train': fn, 'explain': fn, 'loss': float, 'maps': float} for one version."""
    mod = lambda name: importlib.import_module(f"{package}.{name}")
    bench, optim, sharding, train_step = (mod(n) for n in
                                          ("bench", "optim", "sharding", "train_step"))
    Model = mod("model").Model
    mesh = sharding.make_mesh(jax.devices()[:1])
    model = sharding.replicate(bench.bench_model(backbone, "float32", image_size, None, 1000),
                               mesh)
    rng = np.random.default_rng(0)
    x_np = rng.uniform(size=(batch, image_size, image_size, 3)).astype(np.float32)
    x = sharding.shard_batch({"image": x_np}, mesh)["image"]
    tx = optim.make_optimizer(1e-4, total_steps=1000)
    state = train_step.init_state(model, tx, jax.random.key(1), mesh)
    key = jax.random.key(2)
    step = train_step.make_train_step(mesh, tx, selective_fusion=True)
    step = step.lower(state, model, x, key).compile()
    box = [state]

    def train():
        box[0], metrics = step(box[0], model, x, key)
        return metrics

    loss = float(train()["loss"])  # the first step's loss (same state in both versions)
    attention_vars = jax.jit(Model.init_attention)(model, jax.random.key(1))
    explain = jax.jit(lambda m, av, x: m.explain(av, x)[0]).lower(
        model, attention_vars, x).compile()
    maps = np.asarray(explain(model, attention_vars, x))
    return {"train": train, "explain": lambda: explain(model, attention_vars, x),
            "loss": loss, "maps": maps}


def paired(a: Any, b: Any, rounds: int) -> dict[str, list[float]]:
    """Returns the wall and process CPU seconds of a and b called alternately (one untimed
    call each first): {'a', 'b', 'a_cpu', 'b_cpu'}. On a CPU shared with other jobs the CPU
    time (the cycles this process got) is the steadier measure of the work."""
    jax.block_until_ready(a())
    jax.block_until_ready(b())
    out: dict[str, list[float]] = {"a": [], "b": [], "a_cpu": [], "b_cpu": []}
    for _ in range(rounds):
        for fn, name in ((a, "a"), (b, "b")):
            t0, c0 = time.perf_counter(), time.process_time()
            jax.block_until_ready(fn())
            out[name].append(time.perf_counter() - t0)
            out[name + "_cpu"].append(time.process_time() - c0)
    return out


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Runs the A/B comparison from command-line flags, prints the table; returns its rows."""
    parser = argparse.ArgumentParser(prog="python -m tame_jax.tools.ab_commits",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before")
    parser.add_argument("after", nargs="?", default=None, help="default: the working tree")
    parser.add_argument("--backbones", default="resnet50")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tasks", default="train,explain")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as root:
        packages = {"A": load_version(args.before, root), "B": load_version(args.after, root)}
        print(f"A = {args.before} ({packages['A']}), B = {args.after or 'working tree'}; "
              f"{jax.devices()[0].device_kind}, {os.cpu_count()} CPUs, batch {args.batch}")
        print("| backbone | task | A ms (min–max) | B ms (min–max) | speed-up A/B median "
              "(min–max) | same by CPU time | A loss / map sum | B loss / map sum |")
        print("|---|---|---|---|---|---|---|---|")
        for backbone in [b for b in args.backbones.split(",") if b]:
            sides = {k: prepare(p, backbone, args.batch, args.image_size)
                     for k, p in packages.items()}
            for task in [t for t in args.tasks.split(",") if t]:
                t = paired(sides["A"][task], sides["B"][task], args.rounds)
                ratios = [a / b for a, b in zip(t["a"], t["b"], strict=True)]
                cpu = [a / b for a, b in zip(t["a_cpu"], t["b_cpu"], strict=True)]
                check = {k: (s["loss"], float(s["maps"].sum())) for k, s in sides.items()}
                rows.append({"backbone": backbone, "task": task, **t, "ratios": ratios,
                             "cpu_ratios": cpu, "check": check})
                ta, tb = t["a"], t["b"]
                print(f"| {backbone} | {task} | {1e3 * min(ta):.0f}–{1e3 * max(ta):.0f} "
                      f"| {1e3 * min(tb):.0f}–{1e3 * max(tb):.0f} "
                      f"| {statistics.median(ratios):.2f}× ({min(ratios):.2f}–"
                      f"{max(ratios):.2f}) | {statistics.median(cpu):.2f}× ({min(cpu):.2f}–"
                      f"{max(cpu):.2f}) | {check['A'][0]:.6f} / {check['A'][1]:.3f} "
                      f"| {check['B'][0]:.6f} / {check['B'][1]:.3f} |", flush=True)
    return rows


if __name__ == "__main__":
    main()
