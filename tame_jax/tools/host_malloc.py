"""What the host allocator does in a `python -m tame_jax...` process, measured.

`python -m tame_jax.tools.host_malloc` prints its PID, the settings in force
(`tame_jax.host_memory`) and the minor page faults of re-allocating a freed 256 MB block:
about 0 where CPU runs keep freed memory, 65536 (one per 4 KiB page) with glibc's defaults
(`TAME_JAX_MALLOC=system`). `--train_step` also runs the ResNet-50 train step (batch 8,
224 px, selective fusion; 2 untimed calls, then `--steps`) and prints per step the minor page
faults, the kernel (system) CPU time, the user CPU time and the wall time.
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from collections.abc import Sequence

from tame_jax import host_memory


def train_step_costs(backbone: str = "resnet50", batch: int = 8, steps: int = 4
                     ) -> dict[str, float]:
    """Returns per train step: minor page faults, system and user CPU seconds, wall seconds."""
    import jax

    from tame_jax.tools.profile_step import compile_task

    _, call = compile_task(backbone, "train", batch, True)
    for _ in range(2):
        jax.block_until_ready(call())
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(steps):
        jax.block_until_ready(call())
    wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    return {"minor_faults": (r1.ru_minflt - r0.ru_minflt) / steps,
            "system_seconds": (r1.ru_stime - r0.ru_stime) / steps,
            "user_seconds": (r1.ru_utime - r0.ru_utime) / steps, "wall_seconds": wall / steps}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tame_jax.tools.host_malloc",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train_step", action="store_true")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args(argv)
    print(f"pid {os.getpid()}; host malloc: {host_memory.describe()}")
    print("minor page faults per reuse of a freed 256 MB block: "
          f"{host_memory.faults_per_reuse():.0f}")
    if args.train_step:
        c = train_step_costs(args.backbone, args.batch, args.steps)
        print(f"{args.backbone} train step, batch {args.batch}, per step: "
              f"{c['minor_faults']:.0f} minor page faults, system {c['system_seconds']:.3f} s, "
              f"user {c['user_seconds']:.3f} s, wall {c['wall_seconds']:.3f} s")


if __name__ == "__main__":
    main()
