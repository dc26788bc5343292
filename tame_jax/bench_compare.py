"""Side-by-side comparisons for the benchmark, each timed alternately in one process:

- `vs_torch`: our TAME against a PyTorch TAME (`tame_jax.torch_tame`) on the same backbone,
  weights, images, batch, image size and CPU threads: the train step and the explanation,
  full-map and class-selective fusion on both sides (`python -m tame_jax.bench --vs-torch`);
- `eval_speed`: every explanation method through the demo's metrics (images/s), and the full
  ROAD (7 levels x MoRF/LeRF) on ResNet-50 against pytorch-grad-cam's ROAD, whose imputation
  is a scipy sparse solve per image on the CPU (`python -m tame_jax.bench --eval`).

Rounds alternate ours and theirs (A B A B ...), so both see the same machine load; ratios are
taken per round and reported as median and min–max over the rounds.
"""

from __future__ import annotations

import os
import runpy
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tame_jax import host_memory, optim, torch_tame, weights
from tame_jax.model import Model
from tame_jax.sharding import make_mesh, replicate, shard_batch
from tame_jax.timing import PeakMatmul, compiled_flops, machine_info
from tame_jax.train_step import init_state, make_train_step

ROAD_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 0.9)


def natural_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Returns n images (n, size, size, 3) in [0, 1] with image-like statistics: a smooth
    colour field, a few flat discs and boxes, fine noise (ROAD's solver converges faster on
    smooth images than on white noise, so noise would misstate its time)."""
    rng = np.random.default_rng(seed)
    field = jax.image.resize(jnp.asarray(rng.uniform(size=(n, 4, 4, 3)), jnp.float32),
                             (n, size, size, 3), "bilinear")
    img = 0.2 + 0.6 * np.asarray(field)
    yy, xx = np.mgrid[:size, :size] / size
    for i in range(n):
        for _ in range(6):
            cy, cx, r = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.25)
            inside = (((yy - cy) ** 2 + (xx - cx) ** 2) < r * r if rng.uniform() < 0.5
                      else (np.abs(yy - cy) < r) & (np.abs(xx - cx) < r / 2))
            img[i][inside] = rng.uniform(size=3)
    img += rng.normal(scale=0.02, size=img.shape)
    return np.clip(img, 0, 1).astype(np.float32)


def _time(fn: Callable[[], Any], steps: int) -> float:
    """Returns the median wall seconds of `steps` calls of fn (blocking on its result)."""
    times = []
    for _ in range(max(1, steps)):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _spread(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _share(part: Sequence[float], whole: Sequence[float]) -> str:
    """Returns the median of part/whole per round as a percentage."""
    return f"{100 * statistics.median(p / w for p, w in zip(part, whole, strict=True)):.0f} %"


def torch_flops(fn: Callable[[], Any]) -> float:
    """Returns the FLOPs torch's FlopCounterMode counts in one call of fn (convs, matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


TORCH_PROCESSES = ("own", "ours")  # --torch_process: a process of its own, or this one


def _torch_jobs(spec: dict[str, Any]) -> tuple[dict, dict]:
    """Returns ({job: call}, {job: FLOPs per call}) of the PyTorch TAME built from `spec`
    (the backbone's and attention's state dicts, the images, ...; see `_TorchSide`)."""
    torch, _ = torch_tame.import_torch()
    torch.set_num_threads(spec["threads"])
    ref = torch_tame.TorchTAME(
        spec["backbone"], spec["layers"], num_classes=spec["num_classes"],
        image_size=spec["image_size"], backbone_state=spec["backbone_state"],
        attention_state=spec["attention_state"], channels_last=spec["channels_last"])
    x_t = ref.images(spec["images"])
    calls, flops = {}, {}
    for fusion in ("full", "selective"):
        def train(selective=fusion == "selective"):
            ref.selective = selective
            return ref.train_step(x_t)

        def explain(selective=fusion == "selective"):
            ref.selective = selective
            return ref.explain(x_t)

        calls[("train", fusion)], calls[("explain", fusion)] = train, explain
    for job, fn in calls.items():
        flops[job] = torch_flops(fn)
        fn()  # warm-up: first calls allocate and page in
    return calls, flops


def _torch_worker(conn: Any, spec: dict[str, Any]) -> None:
    """A PyTorch TAME in a process of its own: builds the jobs, sends (FLOPs, allocator),
    then times `steps` calls of each job it is asked for, until None."""
    calls, flops = _torch_jobs(spec)
    conn.send((flops, host_memory.describe()))
    while (request := conn.recv()) is not None:
        job, steps = request
        conn.send(_time(calls[job], steps))


class _TorchSide:
    """The PyTorch TAME's jobs, timed in this process (process='ours': the allocator and
    thread pools of this one) or in a child process of its own (process='own': started with
    glibc's malloc defaults, as a plain PyTorch script runs; `tame_jax.host_memory`).

    While the child runs a job, this process waits on the pipe: A B alternation holds."""

    def __init__(self, spec: dict[str, Any], process: str):
        if process not in TORCH_PROCESSES:
            raise ValueError(f"torch process {process!r}: one of {TORCH_PROCESSES}")
        self._conn, self._child = None, None
        if process == "ours":
            self._calls, self.flops = _torch_jobs(spec)
            self.malloc = host_memory.describe()
            return
        import multiprocessing

        context = multiprocessing.get_context("spawn")  # a fresh interpreter, no JAX state
        self._conn, child_conn = context.Pipe()
        saved = dict(os.environ)
        try:  # the child starts with glibc's defaults, whatever this process runs with
            for k in host_memory.GLIBC_SETTINGS:
                os.environ.pop(k, None)
            os.environ[host_memory.ENV] = "system"
            self._child = context.Process(target=_torch_worker, args=(child_conn, spec),
                                          daemon=True)
            self._child.start()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        child_conn.close()
        self.flops, self.malloc = self._receive()

    def _receive(self) -> Any:
        try:
            return self._conn.recv()
        except EOFError:
            raise RuntimeError(f"the PyTorch TAME's process exited (code "
                               f"{self._child.exitcode}); its error is printed above") from None

    def time(self, job: tuple[str, str], steps: int) -> float:
        """Returns the median seconds of `steps` calls of the job."""
        if self._conn is None:
            return _time(self._calls[job], steps)
        self._conn.send((job, steps))
        return self._receive()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.send(None)
            self._child.join(timeout=60)
            self._conn.close()


def _jobs(backbone: str, x_np: np.ndarray, num_classes: int, channels_last: bool,
          mesh: Any, torch_process: str) -> tuple[dict, _TorchSide, dict]:
    """Returns ({job: our call}, the torch side, {job: our FLOPs}) for the jobs (train |
    explain, full | selective) of one backbone, same weights and images on both sides."""
    from tame_jax.bench import bench_model

    batch, image_size = x_np.shape[:2]
    model = bench_model(backbone, "float32", image_size, None, num_classes)
    attention_vars = jax.jit(Model.init_attention)(model, jax.random.key(1))
    theirs = _TorchSide({
        "backbone": backbone, "layers": model.layers, "num_classes": num_classes,
        "image_size": image_size, "channels_last": channels_last, "images": x_np,
        "threads": torch_tame.jax_cpu_threads(),
        "backbone_state": weights.flax_to_torchvision(jax.device_get(model.backbone_vars)),
        "attention_state": weights.tame_state_dict_from_variables(
            jax.device_get(attention_vars))}, torch_process)
    model = replicate(model, mesh)
    x = shard_batch({"image": x_np}, mesh)["image"]
    tx = optim.make_optimizer(1e-4, total_steps=1000)
    key = jax.random.key(2)
    ours, flops = {}, {}
    for fusion in ("full", "selective"):
        selective = fusion == "selective"
        step = make_train_step(mesh, tx, selective_fusion=selective)
        state = init_state(model, tx, jax.random.key(1), mesh)  # donated: one per program
        train = step.lower(state, model, x, key).compile()
        explain_fn = Model.explain if selective else Model.explain_full
        explain = jax.jit(lambda m, av, x, f=explain_fn: f(m, av, x)[0]).lower(
            model, attention_vars, x).compile()
        box = [state]

        def train_call(train=train, box=box):
            box[0], metrics = train(box[0], model, x, key)
            return metrics

        ours[("train", fusion)] = train_call
        ours[("explain", fusion)] = lambda e=explain: e(model, attention_vars, x)
        flops[("train", fusion)] = compiled_flops(train)
        flops[("explain", fusion)] = compiled_flops(explain)
    return ours, theirs, flops


def vs_torch(backbones: Sequence[str] = ("resnet50", "vgg16"), batch: int = 8,
             image_size: int = 224, rounds: int = 3, steps: int = 2, num_classes: int = 1000,
             channels_last: bool = False, torch_process: str = "own") -> dict[str, Any]:
    """Returns our and the PyTorch TAME's timings, alternated over `rounds` rounds.

    Jobs: train / explain x full / selective fusion, on each side. In each round every job
    runs `steps` timed calls on our side, then on torch's (median each), then one peak matmul.
    torch_process: 'own' (a child process with glibc's malloc defaults, as a plain PyTorch
    script runs) or 'ours' (this process, with its allocator settings).
    """
    torch, _ = torch_tame.import_torch()
    device = jax.devices()[0]
    if device.platform != "cpu":
        raise SystemExit("--vs-torch compares both on the CPU; run it where JAX uses the CPU "
                         "(JAX_PLATFORMS=cpu).")
    threads = torch_tame.jax_cpu_threads()
    mesh = make_mesh([device])
    peak = PeakMatmul.create(jnp.float32)
    out: dict[str, Any] = {"machine": machine_info(), "torch": torch.__version__,
                           "threads": threads, "batch": batch, "image_size": image_size,
                           "rounds": rounds, "steps": steps, "channels_last": channels_last,
                           "torch_process": torch_process, "results": []}
    x_np = natural_images(batch, image_size)
    for backbone in backbones:
        ours, theirs, flops = _jobs(backbone, x_np, num_classes, channels_last, mesh,
                                    torch_process)
        out["torch_malloc"] = theirs.malloc
        try:
            for job in ours:  # warm-up: first calls allocate and page in (torch's: built)
                jax.block_until_ready(ours[job]())
            times = {job: {"ours": [], "torch": []} for job in ours}
            peaks = []
            for _ in range(rounds):
                for job in ours:
                    times[job]["ours"].append(_time(ours[job], steps))
                    times[job]["torch"].append(theirs.time(job, steps))
                peaks.append(_time(peak, 1))
        finally:
            theirs.close()
        peak_flops = peak.flops / statistics.median(peaks)
        row: dict[str, Any] = {"backbone": backbone, "peak_flops_per_s": peak_flops, "jobs": {}}
        for (task, fusion), t in times.items():
            f_ours, f_torch = flops[(task, fusion)], theirs.flops[(task, fusion)]
            med_o, med_t = statistics.median(t["ours"]), statistics.median(t["torch"])
            row["jobs"][f"{task}_{fusion}"] = {
                "ours_seconds": t["ours"], "torch_seconds": t["torch"],
                "ours_images_per_s": batch / med_o, "torch_images_per_s": batch / med_t,
                "speedup": _spread([b / a for a, b in zip(t["ours"], t["torch"], strict=True)]),
                "ours_gflops_per_image": f_ours / batch / 1e9,
                "torch_gflops_per_image": f_torch / batch / 1e9,
                "ours_flop_utilisation": f_ours / med_o / peak_flops,
                "torch_flop_utilisation": f_torch / med_t / peak_flops,
            }
        for task in ("train", "explain"):  # our default (selective) vs the straightforward code
            t = times[(task, "selective")]["ours"], times[(task, "full")]["torch"]
            row[f"{task}_default_vs_reference"] = _spread(
                [b / a for a, b in zip(*t, strict=True)])
        out["results"].append(row)
    return out


def format_vs_torch(result: dict[str, Any]) -> str:
    """Returns the side-by-side table (Markdown) with a header line on the setting."""
    m = result["machine"]
    lines = [f"ours (jax {m['jax']}, XLA CPU) vs PyTorch {result['torch']} "
             f"({'channels_last' if result['channels_last'] else 'NCHW'}), "
             f"{result['threads']} threads each, batch {result['batch']}, "
             f"{result['image_size']} px, float32; {result['rounds']} rounds A B A B of "
             f"{result['steps']} timed calls (median each); load average "
             f"{m.get('load_average')}",
             f"host malloc: ours {m.get('host_malloc', '?')}; torch in "
             f"{'a process of its own' if result.get('torch_process') == 'own' else 'ours'}, "
             f"{result.get('torch_malloc', '?')}",
             "speed-up = torch time / our time per round: median (min–max); util = GFLOP/s "
             "over the float32 matmul peak timed in the same rounds (ours: XLA cost analysis, "
             "torch: FlopCounterMode).", "",
             "| backbone | task | fusion | ours img/s | torch img/s | speed-up | ours GFLOP/img "
             "| torch GFLOP/img | ours util | torch util |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["results"]:
        for name, j in r["jobs"].items():
            task, fusion = name.split("_")
            s = j["speedup"]
            lines.append(
                f"| {r['backbone']} | {task} | {fusion} | {j['ours_images_per_s']:.2f} "
                f"| {j['torch_images_per_s']:.2f} | {s['median']:.2f}× "
                f"({s['min']:.2f}–{s['max']:.2f}) | {j['ours_gflops_per_image']:.1f} "
                f"| {j['torch_gflops_per_image']:.1f} "
                f"| {100 * j['ours_flop_utilisation']:.0f}% "
                f"| {100 * j['torch_flop_utilisation']:.0f}% |")
        for task in ("train", "explain"):
            s = r[f"{task}_default_vs_reference"]
            lines.append(f"| {r['backbone']} | {task} | ours selective vs torch full | | "
                         f"| **{s['median']:.2f}×** ({s['min']:.2f}–{s['max']:.2f}) "
                         "| | | | |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- evaluation


def demo_config() -> Any:
    """Returns configs/demo.py of this checkout (the demo's backbone, metrics and sizes)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "configs", "demo.py")
    return runpy.run_path(path)["get_config"]()


def method_speed(methods: Sequence[str], num_images: int, rounds: int) -> dict[str, Any]:
    """Returns per method the seconds per batch of its maps and of the demo's metrics."""
    from tame_jax import evaluation
    from tame_jax.model import build_model

    config = demo_config()
    batch = int(config.eval.batch_size)
    model = build_model(config)
    attention_vars = jax.jit(Model.init_attention)(model, jax.random.key(1))
    size = int(config.data.image_size)
    images = jnp.asarray(natural_images(batch, size, seed=1))
    metrics_of = evaluation.batch_metrics(config, with_boxes=False)
    key = jax.random.key(0)
    out: dict[str, Any] = {"batch": batch, "image_size": size, "backbone":
                           config.model.backbone, "metrics": evaluation.metric_columns(
                               config, False), "methods": {}}
    batches = max(1, -(-num_images // batch))
    for method in methods:
        maps_of = evaluation.map_fn(method, config)
        t0 = time.perf_counter()
        classes = evaluation.predict_fn()(model, images)
        maps = jax.block_until_ready(maps_of(model, attention_vars, images, classes, key))
        jax.block_until_ready(metrics_of(model, images, maps, classes, key, None))
        first = time.perf_counter() - t0
        t_maps, t_metrics = [], []
        for _ in range(rounds * batches):
            t0 = time.perf_counter()
            classes = evaluation.predict_fn()(model, images)
            maps = jax.block_until_ready(maps_of(model, attention_vars, images, classes, key))
            t1 = time.perf_counter()
            jax.block_until_ready(metrics_of(model, images, maps, classes, key, None))
            t_maps.append(t1 - t0)
            t_metrics.append(time.perf_counter() - t1)
        med_maps, med_metrics = statistics.median(t_maps), statistics.median(t_metrics)
        out["methods"][method] = {
            "maps_images_per_s": batch / med_maps, "metrics_images_per_s": batch / med_metrics,
            "images_per_s": batch / (med_maps + med_metrics), "first_call_seconds": first}
    return out


def gradcam_road(model: Model, x_np: np.ndarray, maps: np.ndarray, classes: np.ndarray,
                 fractions: Sequence[float]
                 ) -> tuple[Callable[[], np.ndarray], Callable[[], None]]:
    """Returns (road, forwards): road() runs pytorch-grad-cam's ROAD, MoRF and LeRF at each
    fraction, on the normalised images through the torchvision twin of `model`, and returns
    (2, B, F) top-1 kept; forwards() runs only its classifier passes (one per level)."""
    torch, torchvision = torch_tame.import_torch()
    try:
        from pytorch_grad_cam.metrics.road import ROADLeastRelevantFirst, ROADMostRelevantFirst
    except ImportError as e:
        raise ImportError("The ROAD comparison needs pytorch-grad-cam: pip install grad-cam "
                          "(part of the [parity] extra).") from e
    net = torchvision.models.get_model(model.backbone.arch, weights=None,
                                       num_classes=int(model.backbone.num_classes))
    net.load_state_dict({k: torch.tensor(np.asarray(v)) for k, v in
                         weights.flax_to_torchvision(jax.device_get(model.backbone_vars)).items()})
    net.eval()
    mean = torch.tensor(model.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.std).view(1, 3, 1, 1)
    x = (torch.from_numpy(x_np).permute(0, 3, 1, 2) - mean) / std

    def run() -> np.ndarray:
        kept = np.zeros((2, len(x_np), len(fractions)), bool)
        for o, metric_cls in enumerate((ROADMostRelevantFirst, ROADLeastRelevantFirst)):
            for f, fraction in enumerate(fractions):
                # grad-cam keeps the pixels below the percentile: removes 1 - percentile.
                metric = metric_cls(percentile=100 * (1 - fraction))
                # Score = "top-1 still the class": one forward per level, as ours does (no
                # second forward of the clean images, return_diff=False).
                targets = [lambda out, c=int(c): (out.argmax() == c).float() for c in classes]
                kept[o, :, f] = metric(x, maps, targets, net, return_diff=False) > 0.5
        return kept

    def forwards() -> None:
        with torch.no_grad():  # as the ROAD metric runs the classifier
            for _ in range(2 * len(fractions)):
                net(x)

    return run, forwards


def road_speed(num_images: int, rounds: int, batch: int, vs_gradcam: bool = True,
               backbone: str = "resnet50", image_size: int = 224) -> dict[str, Any]:
    """Returns the seconds of the full ROAD (7 levels x MoRF/LeRF) on `num_images` images,
    ours and (vs_gradcam) pytorch-grad-cam's, alternated over `rounds` rounds."""
    from tame_jax import metrics
    from tame_jax.bench import bench_model

    if vs_gradcam:
        torch, _ = torch_tame.import_torch()
        torch.set_num_threads(torch_tame.jax_cpu_threads())
    model = bench_model(backbone, "float32", image_size, None, 1000)
    attention_vars = jax.jit(Model.init_attention)(model, jax.random.key(1))
    x_np = natural_images(num_images, image_size, seed=2)
    explain = jax.jit(Model.explain)
    maps, classes = [], []
    for i in range(0, num_images, batch):
        m, c, _ = explain(model, attention_vars, jnp.asarray(x_np[i:i + batch]))
        maps.append(np.asarray(m))
        classes.append(np.asarray(c))
    maps, classes = np.concatenate(maps), np.concatenate(classes)
    road = jax.jit(lambda m, x, maps, c, key: metrics.road_orders(
        m.classify, x, maps, c, key, ROAD_FRACTIONS, ("morf", "lerf")))
    key = jax.random.key(0)

    def ours() -> np.ndarray:
        kept = [road(model, jnp.asarray(x_np[i:i + batch]), jnp.asarray(maps[i:i + batch]),
                     jnp.asarray(classes[i:i + batch]), key) for i in range(0, num_images, batch)]
        return np.concatenate([np.asarray(k) for k in kept], axis=1)  # (2, N, F)

    # The classifier passes alone (one per level and image, as in ROAD): the work both sides
    # share, which bounds the speed-up whatever the imputation costs.
    classify = jax.jit(lambda m, x: m.classify(x))
    x_dev = [jnp.asarray(x_np[i:i + batch]) for i in range(0, num_images, batch)]

    def our_forwards() -> None:
        jax.block_until_ready([classify(model, x) for _ in range(2 * len(ROAD_FRACTIONS))
                               for x in x_dev])

    t0 = time.perf_counter()
    kept_ours = ours()
    compile_and_first = time.perf_counter() - t0
    our_forwards()
    theirs, their_forwards = (gradcam_road(model, x_np, maps, classes, ROAD_FRACTIONS)
                              if vs_gradcam else (None, None))
    t_ours, t_theirs, f_ours, f_theirs = [], [], [], []
    for _ in range(rounds):
        t_ours.append(_time(ours, 1))
        f_ours.append(_time(our_forwards, 1))
        if theirs is not None:
            t0 = time.perf_counter()
            kept_theirs = theirs()
            t_theirs.append(time.perf_counter() - t0)
            f_theirs.append(_time(their_forwards, 1))
    out: dict[str, Any] = {"backbone": backbone, "images": num_images, "batch": batch,
                           "image_size": image_size,
                           "levels": 2 * len(ROAD_FRACTIONS), "ours_seconds": t_ours,
                           "ours_first_call_seconds": compile_and_first,
                           "ours_forward_seconds": f_ours,
                           "ours_images_per_s": num_images / statistics.median(t_ours)}
    if theirs is not None:
        out.update(gradcam_seconds=t_theirs, gradcam_forward_seconds=f_theirs,
                   # torch's whole ROAD over our classifier passes alone: the speed-up if our
                   # imputation took no time at all.
                   ceiling=_spread([b / f for f, b in zip(f_ours, t_theirs, strict=True)]),
                   gradcam_images_per_s=num_images / statistics.median(t_theirs),
                   speedup=_spread([b / a for a, b in zip(t_ours, t_theirs, strict=True)]),
                   # Same images, maps, masks and classifier: the kept fractions should agree
                   # up to the imputation noise and solver tolerance.
                   kept_ours=kept_ours.mean(axis=1).tolist(),
                   kept_gradcam=kept_theirs.mean(axis=1).tolist())
    return out


def eval_speed(methods: Sequence[str], num_images: int = 32, rounds: int = 2,
               road_images: int = 8, road_batch: int = 8, vs_gradcam: bool = True,
               road_backbone: str = "resnet50", road_image_size: int = 224) -> dict[str, Any]:
    """Returns the evaluation speeds: per method on the demo, and ROAD vs pytorch-grad-cam."""
    return {"machine": machine_info(), "demo": method_speed(methods, num_images, rounds),
            "road": road_speed(road_images, rounds, road_batch, vs_gradcam, road_backbone,
                               road_image_size)}


def format_eval(result: dict[str, Any]) -> str:
    """Returns the evaluation-speed tables (Markdown)."""
    d, r = result["demo"], result["road"]
    lines = [f"Evaluation on the demo setup ({d['backbone']}, {d['image_size']} px, batch "
             f"{d['batch']}; metrics: {', '.join(d['metrics'])}); load average "
             f"{result['machine'].get('load_average')}", "",
             "| method | maps img/s | metrics img/s | total img/s | first call s |",
             "|---|---|---|---|---|"]
    for name, m in d["methods"].items():
        lines.append(f"| {name} | {m['maps_images_per_s']:.1f} | {m['metrics_images_per_s']:.1f} "
                     f"| {m['images_per_s']:.1f} | {m['first_call_seconds']:.1f} |")
    lines += ["", f"Full ROAD ({r['levels']} levels: MoRF and LeRF at "
              f"{', '.join(f'{100 * f:g}' for f in ROAD_FRACTIONS)}%) on {r['backbone']}, "
              f"{r['images']} images of {r['image_size']} px (ours in batches of "
              f"{r['batch']}):", "",
              "| | img/s | of the time: classifier passes | speed-up (median, min–max) |",
              "|---|---|---|---|",
              f"| ours (JAX, multigrid CG) | {r['ours_images_per_s']:.2f} "
              f"| {_share(r['ours_forward_seconds'], r['ours_seconds'])} | |"]
    if "gradcam_images_per_s" in r:
        s, c = r["speedup"], r["ceiling"]
        lines.append(f"| pytorch-grad-cam (scipy spsolve per image) "
                     f"| {r['gradcam_images_per_s']:.3f} "
                     f"| {_share(r['gradcam_forward_seconds'], r['gradcam_seconds'])} "
                     f"| **{s['median']:.1f}×** ({s['min']:.1f}–{s['max']:.1f}) |")
        lines.append(f"| ceiling: theirs / our classifier passes alone (a free imputation) "
                     f"| | | {c['median']:.1f}× ({c['min']:.1f}–{c['max']:.1f}) |")
        lines.append("")
        lines.append("top-1 kept, MoRF then LeRF per level — ours: "
                     + "; ".join(" ".join(f"{v:.2f}" for v in o) for o in r["kept_ours"])
                     + " — grad-cam: "
                     + "; ".join(" ".join(f"{v:.2f}" for v in o) for o in r["kept_gradcam"]))
    return "\n".join(lines)
