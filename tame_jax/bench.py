"""Benchmark: train step and explanation speed, FLOP utilisation, memory, selective fusion.

`python -m tame_jax.bench [--backbones=resnet50,vgg16] [--batch=8] [--dtype=float32]
[--image_size=224] [--steps=5] [--out=bench.json] [--quick]`
`python -m tame_jax.bench --vs-torch [--rounds=3] [--steps=2] [...]`: ours against a PyTorch
TAME, alternated (`tame_jax.bench_compare`); `python -m tame_jax.bench --eval`: evaluation
speed per method on the demo, and ROAD against pytorch-grad-cam's.

For each backbone (random weights; speed does not depend on them) and each dtype it measures,
on one device (the first one; numbers are per chip):
- the train step with full-map fusion and with class-selective fusion;
- the explanation (map of the predicted class): full = all K maps then the predicted channel,
  selective = `Model.explain`'s per-image fusion path;
each as the median of `--steps` timed calls after warm-up calls, with FLOPs from XLA's cost
analysis of the compiled executable, memory from its memory analysis (and the device's
`peak_bytes_in_use` where it reports one), and FLOP utilisation against the peak of a large
matmul timed on the same device in the same run and dtype. A `conv probe` row gives the
utilisation of one ResNet-50 3x3 convolution alone, to tell the convolution kernel's own limit
from the rest of the step. `dtype` may list several, e.g. `--dtype=float32,bfloat16`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from tame_jax import backbones, bench_compare, optim, torch_tame
from tame_jax.config import default_config
from tame_jax.model import Model, build_model, compute_dtype
from tame_jax.sharding import make_mesh, replicate, shard_batch
from tame_jax.timing import (
    WARMUP,
    PeakMatmul,
    compiled_flops,
    compiled_memory_bytes,
    conv_probe,
    device_peak_bytes,
    machine_info,
    time_calls,
    time_paired_cpu,
)
from tame_jax.train_step import init_state, make_train_step


def bench_model(backbone: str, dtype: str, image_size: int, width: int | None,
                num_classes: int) -> Model:
    """Returns the Model of `backbone` with seeded random weights (speed ignores them)."""
    config = default_config()
    config.model.backbone = backbone
    config.model.layers = backbones.get_spec(backbone).default_layers
    config.model.dtype = dtype
    config.model.num_classes = num_classes
    config.model.backbone_weights = "random"
    # --width is a ResNet's base width; the other families ignore it
    config.model.backbone_kwargs = ({"width": width} if width is not None
                                    and backbone.startswith("resnet") else {})
    config.data.image_size = image_size
    return build_model(config)


def bench_backbone(backbone: str, *, batch: int, dtype: str, image_size: int, steps: int,
                   peak: PeakMatmul, width: int | None = None,
                   num_classes: int = 1000) -> dict[str, Any]:
    """Returns the measurements of one backbone and dtype: train and explain, full/selective."""
    device = jax.devices()[0]
    mesh = make_mesh([device])
    model = bench_model(backbone, dtype, image_size, width, num_classes)
    attention_vars = jax.jit(Model.init_attention)(model, jax.random.key(1))
    tx = optim.make_optimizer(1e-4, total_steps=1000)
    rng = np.random.default_rng(0)
    images_np = rng.uniform(size=(batch, image_size, image_size, 3)).astype(np.float32)
    images = shard_batch({"image": images_np}, mesh)["image"]
    model = replicate(model, mesh)
    key = jax.random.key(2)
    result: dict[str, Any] = {"backbone": backbone, "dtype": dtype, "batch": batch,
                              "image_size": image_size}

    def record(name: str, compiled: Any, fn: Callable[[], Any]) -> None:
        seconds, ratio, cpu_ratio = time_paired_cpu(fn, peak, steps)
        flops = compiled_flops(compiled)
        result[name] = {
            "seconds": seconds,
            "images_per_s": batch / seconds,
            "gflops_per_image": flops / batch / 1e9,
            # (flops / t_step) / (peak flops / t_peak), each step paired with a peak product.
            "flop_utilisation": flops / peak.flops * ratio,
            # The same with process CPU time instead of wall time (contention-proof on CPU).
            "flop_utilisation_cpu_time": flops / peak.flops * cpu_ratio,
            "memory_bytes": compiled_memory_bytes(compiled),
        }
        result[name]["gflops_per_s"] = flops / seconds / 1e9

    for selective in (False, True):
        step = make_train_step(mesh, tx, selective_fusion=selective)
        state = init_state(model, tx, jax.random.key(1), mesh)  # the step donates its state
        compiled = step.lower(state, model, images, key).compile()
        box = [state]

        def train_call(compiled=compiled, box=box):
            box[0], metrics = compiled(box[0], model, images, key)
            return metrics

        record(f"train_{'selective' if selective else 'full'}", compiled, train_call)
        metrics = jax.device_get(train_call())
        result[f"train_{'selective' if selective else 'full'}"]["loss"] = float(metrics["loss"])

    explainers = {"full": Model.explain_full, "selective": Model.explain}
    maps = {}
    for name, fn in explainers.items():
        compiled = jax.jit(lambda m, av, x, fn=fn: fn(m, av, x)[0]).lower(
            model, attention_vars, images).compile()
        record(f"explain_{name}", compiled,
               lambda compiled=compiled: compiled(model, attention_vars, images))
        maps[name] = np.asarray(compiled(model, attention_vars, images))
    # Both paths compute the same map; a large difference would make the comparison moot.
    result["explain_max_abs_diff"] = float(np.abs(maps["full"] - maps["selective"]).max())
    result["train_speedup_selective"] = (result["train_full"]["seconds"]
                                         / result["train_selective"]["seconds"])
    result["explain_speedup_selective"] = (result["explain_full"]["seconds"]
                                           / result["explain_selective"]["seconds"])
    peak = device_peak_bytes(device)
    if peak is not None:
        result["device_peak_bytes"] = peak
    return result


def run_benchmark(backbones: Sequence[str] = ("resnet50", "vgg16"), batch: int = 8,
                  dtypes: Sequence[str] = ("float32",), image_size: int = 224, steps: int = 5,
                  width: int | None = None, num_classes: int = 1000,
                  matmul_n: int | None = None, probe: bool = True) -> dict[str, Any]:
    """Returns the whole benchmark as a JSON-able dict: machine, peaks, one result per row."""
    out: dict[str, Any] = {"machine": machine_info(), "peaks": {}, "conv_probe": {},
                           "results": [],
                           "settings": {"batch": batch, "image_size": image_size,
                                        "steps": steps, "warmup": WARMUP}}
    for dtype in dtypes:
        peak = PeakMatmul.create(compute_dtype(dtype), matmul_n)
        time_calls(peak, max(steps, 3))
        if probe:
            out["conv_probe"][dtype] = conv_probe(peak, batch, steps=max(steps, 3))
        for name in backbones:
            out["results"].append(bench_backbone(
                name, batch=batch, dtype=dtype, image_size=image_size, steps=steps, peak=peak,
                width=width, num_classes=num_classes))
        best = peak.flops / min(peak.timings)
        out["peaks"][dtype] = {"n": peak.n, "flops_per_s": peak.flops_per_s(),
                               "best_flops_per_s": best, "timings": len(peak.timings)}
        for r in out["results"]:
            if r["dtype"] == dtype:  # conservative: median speed against the best peak seen
                for task in ("train_full", "train_selective", "explain_full",
                             "explain_selective"):
                    r[task]["flop_utilisation_vs_best"] = r[task]["gflops_per_s"] * 1e9 / best
    out["machine"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") \
        else None
    return out


def run_quick() -> dict[str, Any]:
    """Returns a smoke-test benchmark: resnet18 (width 16) at 64 px, batch 2, one timed step."""
    return run_benchmark(backbones=("resnet18",), batch=2, dtypes=("float32",), image_size=64,
                         steps=1, width=16, num_classes=100, matmul_n=512, probe=False)


def format_table(bench: dict[str, Any]) -> str:
    """Returns the benchmark as one Markdown table plus a line on the machine and the peaks."""
    m = bench["machine"]
    lines = [f"device: {m['device_kind']} ({m['platform']}), {m['cpu_count']} CPUs, "
             f"jax {m['jax']}, load average {m.get('load_average')}"]
    for dtype, p in bench["peaks"].items():
        probe = bench["conv_probe"].get(dtype)
        extra = (f"; one 3x3 conv (layer3) alone: {100 * probe['flop_utilisation']:.0f}% of "
                 f"peak ({100 * probe['flop_utilisation_cpu_time']:.0f}% by CPU time)"
                 ) if probe else ""
        lines.append(f"{dtype} matmul peak ({p['n']}^3): median {p['flops_per_s'] / 1e9:.1f}, "
                     f"best {p['best_flops_per_s'] / 1e9:.1f} GFLOP/s" + extra)
    lines += ["FLOP util: each timed call is followed by one timed peak matmul (same load), "
              "ratio of wall times; by CPU time: ratio of process CPU times; vs best peak: "
              "median speed / fastest peak matmul of the run.", "",
              "| backbone | dtype | batch | task | fusion | ms/step | img/s | GFLOP/img "
              "| GFLOP/s | FLOP util | by CPU time | vs best peak | memory MB "
              "| selective speed-up |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in bench["results"]:
        for task in ("train", "explain"):
            for fusion in ("full", "selective"):
                x = r[f"{task}_{fusion}"]
                ratio = f"{r[f'{task}_speedup_selective']:.2f}x" if fusion == "selective" else ""
                lines.append(
                    f"| {r['backbone']} | {r['dtype']} | {r['batch']} | {task} | {fusion} "
                    f"| {1e3 * x['seconds']:.0f} | {x['images_per_s']:.2f} "
                    f"| {x['gflops_per_image']:.2f} | {x['gflops_per_s']:.1f} "
                    f"| {100 * x['flop_utilisation']:.0f}% "
                    f"| {100 * x['flop_utilisation_cpu_time']:.0f}% "
                    f"| {100 * x['flop_utilisation_vs_best']:.0f}% "
                    f"| {x['memory_bytes'] / 2**20:.0f} | {ratio} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark from command-line flags, prints the table, writes JSON; returns it."""
    parser = argparse.ArgumentParser(prog="python -m tame_jax.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default="resnet50,vgg16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or both, "
                        "comma-separated")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median)")
    parser.add_argument("--out", default="bench.json")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: resnet18 width 16, 64 px, batch 2, 1 step")
    parser.add_argument("--vs-torch", dest="vs_torch", action="store_true",
                        help="ours against a PyTorch TAME, alternated (needs the [torch] extra)")
    parser.add_argument("--rounds", type=int, default=3, help="--vs-torch/--eval: A B rounds")
    parser.add_argument("--torch_channels_last", action="store_true",
                        help="--vs-torch: torch in channels_last memory format (NCHW default)")
    parser.add_argument("--torch_process", default="own",
                        choices=bench_compare.TORCH_PROCESSES,
                        help="--vs-torch: torch in a process of its own with glibc's malloc "
                        "defaults, as a plain PyTorch script runs (own), or in this one, with "
                        "the allocator settings of tame_jax.host_memory (ours)")
    parser.add_argument("--eval", action="store_true", help="evaluation speed: every method "
                        "on the demo, and ROAD against pytorch-grad-cam's")
    parser.add_argument("--eval_methods", default="tame,gradcam,gradcampp,scorecam,"
                        "ablationcam,rise")
    parser.add_argument("--eval_images", type=int, default=32,
                        help="--eval: images per method on the demo")
    parser.add_argument("--road_images", type=int, default=8,
                        help="--eval: ResNet-50 images for the ROAD comparison")
    parser.add_argument("--road_batch", type=int, default=8)
    parser.add_argument("--no_gradcam", action="store_true",
                        help="--eval: our ROAD only (no pytorch-grad-cam)")
    args = parser.parse_args(argv)
    if args.vs_torch or (args.eval and not args.no_gradcam):
        try:  # before any work: say what is missing and how to get it
            torch_tame.import_torch()
        except ImportError as e:
            raise SystemExit(str(e)) from e
    if args.vs_torch:
        if args.quick:
            bench = bench_compare.vs_torch(("resnet18",), batch=2, image_size=64, rounds=1,
                                           steps=1, num_classes=100,
                                           channels_last=args.torch_channels_last,
                                           torch_process=args.torch_process)
        else:
            bench = bench_compare.vs_torch(
                [b for b in args.backbones.split(",") if b], batch=args.batch,
                image_size=args.image_size, rounds=args.rounds, steps=args.steps,
                channels_last=args.torch_channels_last, torch_process=args.torch_process)
        table = bench_compare.format_vs_torch(bench)
    elif args.eval and args.quick:
        bench = bench_compare.eval_speed(("tame", "gradcam"), num_images=1, rounds=1,
                                         road_images=2, road_batch=2,
                                         vs_gradcam=not args.no_gradcam,
                                         road_backbone="resnet18", road_image_size=64)
        table = bench_compare.format_eval(bench)
    elif args.eval:
        bench = bench_compare.eval_speed(
            [m for m in args.eval_methods.split(",") if m], num_images=args.eval_images,
            rounds=args.rounds, road_images=args.road_images, road_batch=args.road_batch,
            vs_gradcam=not args.no_gradcam)
        table = bench_compare.format_eval(bench)
    elif args.quick:
        bench = run_quick()
        table = format_table(bench)
    else:
        dtypes = [d for d in args.dtype.split(",") if d]
        for d in dtypes:
            compute_dtype(d)  # clear error on a bad name, before any compilation
        bench = run_benchmark(backbones=[b for b in args.backbones.split(",") if b],
                              batch=args.batch, dtypes=dtypes, image_size=args.image_size,
                              steps=args.steps)
        table = format_table(bench)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(bench, f, indent=2)
        print(f"wrote {args.out}", file=sys.stderr)
    return bench


if __name__ == "__main__":
    main()
