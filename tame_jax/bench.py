"""Benchmark: train step and explanation speed, FLOP utilisation, memory, selective fusion.

`python -m tame_jax.bench [--backbones=resnet50,vgg16] [--batch=8] [--dtype=float32]
[--image_size=224] [--steps=5] [--out=bench.json] [--quick]`

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
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tame_jax import backbones, optim
from tame_jax.attention import TAMEAttention
from tame_jax.config import default_config
from tame_jax.image_ops import minmax_normalize, resize_bilinear
from tame_jax.model import Model, compute_dtype
from tame_jax.parallel import (
    BATCH_AXIS,
    TrainState,
    make_mesh,
    make_train_step,
    replicate,
    shard_batch,
)

WARMUP = 2  # untimed calls after compilation


def time_calls(fn: Callable[[], Any], steps: int, warmup: int = WARMUP) -> float:
    """Returns the median wall time in seconds of `steps` calls of fn (after `warmup` calls).

    fn must return something `jax.block_until_ready` can wait on.
    """
    return time_paired(fn, None, steps, warmup)[0]


def time_paired(fn: Callable[[], Any], reference: Callable[[], Any] | None, steps: int,
                warmup: int = WARMUP) -> tuple[float, float]:
    """Returns (median seconds of fn, median over calls of t_reference / t_fn).

    After each timed call of fn, one call of `reference` (the peak matmul) is timed, so that
    both see the same machine load; the ratio is NaN without a reference.
    """
    seconds, ratio, _ = time_paired_cpu(fn, reference, steps, warmup)
    return seconds, ratio


def time_paired_cpu(fn: Callable[[], Any], reference: Callable[[], Any] | None, steps: int,
                    warmup: int = WARMUP) -> tuple[float, float, float]:
    """Returns `time_paired`'s two values plus the median ratio of process CPU times.

    The CPU-time ratio (reference / fn) counts only the cycles this process got, so on a CPU
    shared with other jobs it is the steadier measure of efficiency.
    """
    for _ in range(warmup):
        jax.block_until_ready(fn())
    if reference is not None:
        jax.block_until_ready(reference())
    times, ratios, cpu_ratios = [], [], []
    for _ in range(max(1, steps)):
        t0, c0 = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
        cpu = time.process_time() - c0
        if reference is not None:
            t0, c0 = time.perf_counter(), time.process_time()
            jax.block_until_ready(reference())
            ratios.append((time.perf_counter() - t0) / times[-1])
            cpu_ratios.append((time.process_time() - c0) / max(cpu, 1e-9))
    med = lambda xs: statistics.median(xs) if xs else float("nan")
    return statistics.median(times), med(ratios), med(cpu_ratios)


def _flops(compiled: Any) -> float:
    """Returns the 'flops' entry of a compiled executable's XLA cost analysis (0 if absent)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per partition
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


def _memory_bytes(compiled: Any) -> int:
    """Returns argument + output + temp bytes of a compiled executable (aliased bytes once)."""
    mem = compiled.memory_analysis()
    if mem is None:
        return 0
    total = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
    return int(total - getattr(mem, "alias_size_in_bytes", 0))


def _device_peak_bytes(device: jax.Device) -> int | None:
    """Returns the device's peak_bytes_in_use since start (GPU/TPU), or None where unreported."""
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - CPU backends may raise instead of returning None
        return None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


@dataclasses.dataclass
class PeakMatmul:
    """An n x n x n jnp.dot in the benchmark's dtype on the benchmark's device: the peak.

    Calling it runs one product (2 n^3 FLOPs). It is timed right after every timed call of a
    workload, so that utilisation compares the two under the same machine load (the CPU here
    may be shared); `flops_per_s` keeps every timing of it.
    """

    dtype: Any
    n: int
    fn: Callable[[], jax.Array]
    timings: list[float] = dataclasses.field(default_factory=list)

    @classmethod
    def create(cls, dtype: Any, n: int | None = None,
               device: jax.Device | None = None) -> PeakMatmul:
        """Returns the product for dtype; n defaults to 2048 on CPU and 8192 elsewhere."""
        device = device or jax.devices()[0]
        if n is None:
            n = 2048 if device.platform == "cpu" else 8192
        ka, kb = jax.random.split(jax.random.key(0))
        a = jax.device_put(jax.random.normal(ka, (n, n), jnp.float32).astype(dtype), device)
        b = jax.device_put(jax.random.normal(kb, (n, n), jnp.float32).astype(dtype), device)
        dot = jax.jit(jnp.dot)
        return cls(dtype=dtype, n=n, fn=lambda: dot(a, b))

    @property
    def flops(self) -> float:
        """Returns the FLOPs of one product, 2 n^3."""
        return 2.0 * self.n**3

    def __call__(self) -> jax.Array:
        """Returns one product, timing it (blocking) into `timings`."""
        t0 = time.perf_counter()
        out = jax.block_until_ready(self.fn())
        self.timings.append(time.perf_counter() - t0)
        return out

    def flops_per_s(self) -> float:
        """Returns the median FLOP/s over all timed products so far (the reported peak)."""
        return self.flops / statistics.median(self.timings)


def matmul_peak(dtype: Any, n: int | None = None, steps: int = 5,
                device: jax.Device | None = None) -> dict[str, float]:
    """Returns {'n', 'seconds', 'flops_per_s'} of an n x n x n jnp.dot in dtype on device."""
    peak = PeakMatmul.create(dtype, n, device)
    seconds = time_calls(peak.fn, steps)
    return {"n": peak.n, "seconds": seconds, "flops_per_s": peak.flops / seconds}


def conv_probe(peak: PeakMatmul, batch: int, steps: int = 5, spatial: int = 14,
               channels: int = 256, device: jax.Device | None = None) -> dict[str, float]:
    """Returns {'gflops', 'seconds', 'flop_utilisation'} of one 3x3 NHWC convolution alone.

    Default shape: ResNet-50's layer3 3x3 conv, (batch, 14, 14, 256) -> 256 channels.
    """
    device = device or jax.devices()[0]
    kx, kw = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (batch, spatial, spatial, channels), jnp.float32)
    w = jax.random.normal(kw, (3, 3, channels, channels), jnp.float32)
    x = jax.device_put(x.astype(peak.dtype), device)
    w = jax.device_put(w.astype(peak.dtype), device)
    conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
    flops = 2.0 * batch * spatial * spatial * 9 * channels * channels
    seconds, ratio, cpu_ratio = time_paired_cpu(lambda: conv(x, w), peak, steps)
    return {"gflops": flops / 1e9, "seconds": seconds,
            "flop_utilisation": flops / peak.flops * ratio,
            "flop_utilisation_cpu_time": flops / peak.flops * cpu_ratio}


def random_variables(module: nn.Module, image_size: int, seed: int = 0) -> dict[str, Any]:
    """Returns random backbone variables filled on the host (no XLA compilation of an init).

    Kernels ~ N(0, 1/fan_in), biases 0, BatchNorm scale 1, bias 0, mean 0, var 1. Speed does
    not depend on the values; jitting `module.init` would cost more compile time than the
    smoke-test benchmark itself.
    """
    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    shapes = jax.eval_shape(lambda x: module.init(jax.random.key(0), x, train=False), x)
    rng = np.random.default_rng(seed)

    def fill(path: tuple, leaf: jax.ShapeDtypeStruct) -> np.ndarray:
        name = getattr(path[-1], "key", str(path[-1]))
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(leaf.dtype)
        return np.full(leaf.shape, 1.0 if name in ("scale", "var") else 0.0, leaf.dtype)

    return {k: jax.tree_util.tree_map_with_path(fill, shapes[k])
            for k in ("params", "batch_stats") if k in shapes}


def bench_model(backbone: str, dtype: str, image_size: int, width: int | None,
                num_classes: int) -> Model:
    """Returns the Model that `build_model` would build for backbone, with random weights."""
    config = default_config()
    config.model.backbone = backbone
    config.model.layers = backbones.get_spec(backbone).default_layers
    config.model.dtype = dtype
    config.model.num_classes = num_classes
    config.data.image_size = image_size
    kwargs = {} if width is None else {"width": width}
    module = backbones.build_backbone(backbone, num_classes=num_classes,
                                      layers=config.model.layers,
                                      dtype=compute_dtype(dtype), **kwargs)
    attention = TAMEAttention(num_classes=num_classes, variant=config.model.variant,
                              max_size=config.model.max_size, axis_name=BATCH_AXIS,
                              dtype=compute_dtype(dtype))
    return Model(backbone=module, backbone_vars=random_variables(module, image_size),
                 attention=attention, layers=tuple(config.model.layers), image_size=image_size)


def _full_fusion_explain(model: Model) -> Callable[[Any, jax.Array], jax.Array]:
    """Returns explain(attention_vars, images) -> maps (B, H, W) via all K maps (full fusion)."""
    attention = model.attention.clone(axis_name=None)

    def explain(attention_vars: Any, images: jax.Array) -> jax.Array:
        logits, feats = model.features(images)
        classes = jnp.argmax(logits, axis=-1)  # (B,)
        c = attention.apply(attention_vars, feats, None, train=False)  # (B, S, S, K)
        c = jnp.take_along_axis(c, classes[:, None, None, None], axis=-1)[..., 0]  # (B, S, S)
        return resize_bilinear(minmax_normalize(c)[..., None], images.shape[1:3])[..., 0]

    return explain


def bench_backbone(backbone: str, *, batch: int, dtype: str, image_size: int, steps: int,
                   peak: PeakMatmul, width: int | None = None,
                   num_classes: int = 1000) -> dict[str, Any]:
    """Returns the measurements of one backbone and dtype: train and explain, full/selective."""
    device = jax.devices()[0]
    mesh = make_mesh([device])
    model = bench_model(backbone, dtype, image_size, width, num_classes)
    attention_vars = jax.jit(model.init_attention)(jax.random.key(1))
    tx = optim.make_optimizer(1e-4, total_steps=1000)
    rng = np.random.default_rng(0)
    images_np = rng.uniform(size=(batch, image_size, image_size, 3)).astype(np.float32)
    images = shard_batch({"image": images_np}, mesh)["image"]
    backbone_vars = replicate(model.backbone_vars, mesh)
    key = jax.random.key(2)
    result: dict[str, Any] = {"backbone": backbone, "dtype": dtype, "batch": batch,
                              "image_size": image_size}

    def record(name: str, compiled: Any, fn: Callable[[], Any]) -> None:
        seconds, ratio, cpu_ratio = time_paired_cpu(fn, peak, steps)
        flops = _flops(compiled)
        result[name] = {
            "seconds": seconds,
            "images_per_s": batch / seconds,
            "gflops_per_image": flops / batch / 1e9,
            # (flops / t_step) / (peak flops / t_peak), each step paired with a peak product.
            "flop_utilisation": flops / peak.flops * ratio,
            # The same with process CPU time instead of wall time (contention-proof on CPU).
            "flop_utilisation_cpu_time": flops / peak.flops * cpu_ratio,
            "memory_bytes": _memory_bytes(compiled),
        }
        result[name]["gflops_per_s"] = flops / seconds / 1e9

    for selective in (False, True):
        step = make_train_step(mesh, backbone=model.backbone, attention=model.attention, tx=tx,
                               layers=model.layers, selective_fusion=selective)
        # A copy: the step donates its state, and replicate() on one device does not copy.
        fresh = jax.tree.map(jnp.copy, attention_vars)
        state = replicate(TrainState.create(fresh, tx), mesh)
        compiled = step.lower(state, backbone_vars, images, key).compile()
        box = [state]

        def train_call(compiled=compiled, box=box):
            box[0], metrics = compiled(box[0], backbone_vars, images, key)
            return metrics

        record(f"train_{'selective' if selective else 'full'}", compiled, train_call)
        metrics = jax.device_get(train_call())
        result[f"train_{'selective' if selective else 'full'}"]["loss"] = float(metrics["loss"])

    explainers = {"full": _full_fusion_explain(model),
                  "selective": lambda av, x: model.explain(av, x)[0]}
    maps = {}
    for name, fn in explainers.items():
        compiled = jax.jit(fn).lower(attention_vars, images).compile()
        record(f"explain_{name}", compiled,
               lambda compiled=compiled: compiled(attention_vars, images))
        maps[name] = np.asarray(compiled(attention_vars, images))
    # Both paths compute the same map; a large difference would make the comparison moot.
    result["explain_max_abs_diff"] = float(np.abs(maps["full"] - maps["selective"]).max())
    result["train_speedup_selective"] = (result["train_full"]["seconds"]
                                         / result["train_selective"]["seconds"])
    result["explain_speedup_selective"] = (result["explain_full"]["seconds"]
                                           / result["explain_selective"]["seconds"])
    peak = _device_peak_bytes(device)
    if peak is not None:
        result["device_peak_bytes"] = peak
    return result


def machine_info() -> dict[str, Any]:
    """Returns a description of the machine: platform, devices, CPU count, load, XLA flags."""
    device = jax.devices()[0]
    info = {
        "jax": jax.__version__,
        "platform": device.platform,
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    if hasattr(os, "getloadavg"):
        info["load_average"] = list(os.getloadavg())
    return info


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
    args = parser.parse_args(argv)
    if args.quick:
        bench = run_quick()
    else:
        dtypes = [d for d in args.dtype.split(",") if d]
        for d in dtypes:
            compute_dtype(d)  # clear error on a bad name, before any compilation
        bench = run_benchmark(backbones=[b for b in args.backbones.split(",") if b],
                              batch=args.batch, dtypes=dtypes, image_size=args.image_size,
                              steps=args.steps)
    print(format_table(bench))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(bench, f, indent=2)
        print(f"wrote {args.out}", file=sys.stderr)
    return bench


if __name__ == "__main__":
    main()
