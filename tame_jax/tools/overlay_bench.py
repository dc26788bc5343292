"""Time one overlay written to PNG: the lookup-table path (`viz.overlay` + `write_panels`, what
explain writes) against a matplotlib figure (`viz.write_overlay`), alternately in one run.

    python -m tame_jax.tools.overlay_bench [--size=224] [--rounds=20]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from tame_jax import viz


def main() -> None:
    """Prints one table: median milliseconds per overlay PNG for each path, and the ratio."""
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=20)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    image = rng.random((args.size, args.size, 3)).astype(np.float32)
    heat = rng.random((args.size, args.size)).astype(np.float32)
    times: dict[str, list[float]] = {"lookup table": [], "matplotlib figure": []}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "x.png")
        viz.write_overlay(path, image, [heat], ["x"])  # imports and warm-up
        viz.write_panels(path, [viz.overlay(image, heat)], ["x"])
        for _ in range(args.rounds):
            t = time.perf_counter()
            viz.write_panels(path, [viz.overlay(image, heat)], ["x"])
            times["lookup table"].append(time.perf_counter() - t)
            t = time.perf_counter()
            viz.write_overlay(path, image, [heat], ["x"])
            times["matplotlib figure"].append(time.perf_counter() - t)
    ms = {k: 1000 * float(np.median(v)) for k, v in times.items()}
    print(f"| path ({args.size} px, median of {args.rounds}) | ms per overlay PNG |")
    print("|---|---|")
    for k, v in ms.items():
        print(f"| {k} | {v:.1f} |")
    print(f"| ratio | {ms['matplotlib figure'] / ms['lookup table']:.1f}x |")


if __name__ == "__main__":
    main()
