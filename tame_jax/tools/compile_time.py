"""Compile time and first-call latency of the explanation, weights as arguments vs closed over.

    python -m tame_jax.tools.compile_time [--backbones=resnet50,vgg16] [--batch=1] [--rounds=2]

For each backbone (seeded random weights, 224 px) it lowers and compiles `Model.explain` two
ways, alternating, `--rounds` times: with the model as an argument (how the package compiles
everything) and closed over by the jitted function (how it compiled before: the weights become
constants of the program). It prints the program text size, the compile time, the first call
of a fresh jit (trace + compile + run) and the median of three later calls.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence

import jax
import numpy as np

from tame_jax import backbones
from tame_jax.config import default_config
from tame_jax.model import Model, build_model


def measure(model: Model, attention_vars: dict, images: jax.Array, closed: bool
            ) -> dict[str, float]:
    """Returns {'text_mb', 'compile_s', 'first_call_s', 'run_s'} of one way of compiling."""
    if closed:
        make = lambda: jax.jit(lambda av, x: model.explain(av, x))  # noqa: E731
        args = (attention_vars, images)
    else:
        make = lambda: jax.jit(lambda m, av, x: m.explain(av, x))  # noqa: E731
        args = (model, attention_vars, images)
    lowered = make().lower(*args)
    text_mb = len(lowered.as_text()) / 1e6
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    fresh = make()
    t0 = time.perf_counter()
    jax.block_until_ready(fresh(*args))
    first = time.perf_counter() - t0
    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        runs.append(time.perf_counter() - t0)
    return {"text_mb": text_mb, "compile_s": compile_s, "first_call_s": first,
            "run_s": statistics.median(runs)}


def main(argv: Sequence[str] | None = None) -> None:
    """Prints one Markdown table row per backbone and way, with the range over the rounds."""
    p = argparse.ArgumentParser(prog="python -m tame_jax.tools.compile_time",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", default="resnet50,vgg16")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    print("| backbone | weights | program text | compile | first call | run |")
    print("|---|---|---|---|---|---|")
    for name in args.backbones.split(","):
        config = default_config()
        config.model.backbone = name
        config.model.layers = backbones.get_spec(name).default_layers
        config.model.backbone_weights = "random"
        model = build_model(config)
        av = jax.jit(Model.init_attention)(model, jax.random.key(1))
        x = np.random.default_rng(0).uniform(size=(args.batch, 224, 224, 3)).astype(np.float32)
        results: dict[bool, list[dict[str, float]]] = {True: [], False: []}
        for _ in range(args.rounds):
            for closed in (True, False):
                results[closed].append(measure(model, av, x, closed))
        for closed in (True, False):
            r = results[closed]

            def span(k: str, fmt: str = "{:.2f}", r=r) -> str:
                lo, hi = min(x[k] for x in r), max(x[k] for x in r)
                return fmt.format(lo) if fmt.format(lo) == fmt.format(hi) else \
                    f"{fmt.format(lo)}–{fmt.format(hi)}"

            print(f"| {name} | {'closed over (before)' if closed else 'arguments (now)'} "
                  f"| {span('text_mb', '{:.1f}')} MB | {span('compile_s')} s "
                  f"| {span('first_call_s')} s | {span('run_s')} s |", flush=True)


if __name__ == "__main__":
    main()
