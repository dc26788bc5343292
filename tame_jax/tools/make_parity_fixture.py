"""Writes the PyTorch parity fixtures under tests/fixtures/ (needs torch + torchvision).

    python -m tame_jax.tools.make_parity_fixture [--out tests/fixtures] [--only ARCH ...]

Each architecture in `PARITY_CASES` is filled with deterministic pseudo-random weights from
`parity_state_dict` (numpy only, so the test can regenerate them without torch), run by the
PyTorch reference in float32 on two fixed inputs, and its logits plus a compact summary of the
feature maps are saved to `parity_<arch>.npz`. Not run by CI. The references: torchvision for
the ResNets and VGGs, and for EfficientNet-Lite `TorchEfficientNetLite` below, an independent
PyTorch transcription of Google's model (block strings, TF-"SAME" padding by explicit F.pad).
"""

from __future__ import annotations

import argparse
import zlib
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# arch -> (input size, layers summarised). Small inputs keep the fixture and the test fast;
# VGG at 96 / 64 leaves 3x3 / 2x2 maps before AdaptiveAvgPool2d((7, 7)) (non-divisible case),
# ResNet-50 at 160 has odd-sized maps (5x5 at layer4), which catches padding/stride errors.
# ViT-B/16 at 64 px: a 4x4 patch grid (17 tokens, position embeddings made at that size); its
# token layers are compared as torchvision's tokens with the class token dropped, reshaped.
PARITY_CASES: dict[str, tuple[int, tuple[str, ...]]] = {
    "resnet50": (160, ("maxpool", "layer1", "layer2", "layer3", "layer4")),
    "resnet18": (64, ("layer1.1", "layer2", "layer3", "layer4")),
    "vgg16": (96, ("features.4", "features.16", "features.23", "features.30", "avgpool")),
    "vgg16_bn": (64, ("features.23", "features.33", "features.43")),
    "vit_b_16": (64, ("conv_proj", "encoder.layers.encoder_layer_0.ln_2",
                      "encoder.layers.encoder_layer_9.ln_1", "encoder.layers.encoder_layer_11",
                      "encoder.ln")),
    # EfficientNet-Lite at odd sizes: stride-2 convs on odd maps (25 -> 13 -> 7 -> 4, 9 -> 5 ->
    # 3) need TensorFlow's asymmetric "SAME" padding to agree.
    "efficientnet_lite0": (100, ("stem", "_blocks.1", "stage3", "stage5", "stage7", "head")),
    "efficientnet_lite2": (72, ("stage2", "stage4", "stage6", "_conv_head")),
}
PARITY_CLASSES = {"vit_b_16": 10}  # fewer classes keep that fixture small (default 1000)
SEED = 0
BATCH = 2
SLICE_CHANNELS = 16


def parity_state_dict(arch: str, seed: int = SEED) -> dict[str, np.ndarray]:
    """Returns a deterministic torchvision-layout float32 state dict for `arch` (torch-free).

    Keys and shapes come from the Flax template (the fixture script checks them against
    torchvision with strict loading). Each tensor has its own generator seeded by (seed, key).
    Convs/linears are He-scaled so activations stay O(1) through 50 layers; BatchNorm has
    non-trivial running statistics (mean != 0, var != 1, var > 0); a ViT's class token and
    position embeddings are N(0, 0.5^2).
    """
    from tame_jax.backbones import build_backbone
    from tame_jax.backbones.vit import ARCHS as VIT_ARCHS
    from tame_jax.backbones.vit import vit_key
    from tame_jax.weights import torch_shape, torchvision_key

    module = build_backbone(arch, num_classes=PARITY_CLASSES.get(arch, 1000))
    size = PARITY_CASES[arch][0] if arch in PARITY_CASES else 32  # ViT: positions per size
    shapes = jax.eval_shape(
        lambda: module.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)
    )
    key_of = vit_key if arch in VIT_ARCHS else torchvision_key
    out: dict[str, np.ndarray] = {}
    for collection in ("params", "batch_stats"):
        for path, spec in jax.tree_util.tree_flatten_with_path(shapes.get(collection, {}))[0]:
            names = tuple(p.key for p in path)
            key = key_of(collection, names)
            out[key] = _tensor(key, torch_shape(names[-1], tuple(spec.shape)), seed)
    for key in [k for k in out if k.endswith(".running_mean")]:
        out[key.replace(".running_mean", ".num_batches_tracked")] = np.array(7, np.int64)
    return dict(sorted(out.items()))


def _tensor(key: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Returns the pseudo-random tensor of one state-dict entry."""
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    if key.endswith(("class_token", "pos_embedding")):
        w = 0.5 * rng.standard_normal(shape)
    elif key.endswith("weight") and len(shape) >= 2:  # also a ViT's in_proj_weight
        fan_in = int(np.prod(shape[1:]))
        last = key.startswith(("fc.", "classifier.6.", "heads.head."))
        w = rng.standard_normal(shape, np.float32) * np.float32(
            np.sqrt((1.0 if last else 2.0) / fan_in))
    elif key.endswith("running_mean"):
        w = 0.2 * rng.standard_normal(shape)
    elif key.endswith("running_var"):
        w = rng.uniform(0.5, 2.0, shape)
    elif key.endswith(".weight"):  # BatchNorm scale
        w = rng.uniform(0.5, 1.2, shape)
    else:  # biases (conv, linear, BatchNorm shift)
        w = 0.1 * rng.standard_normal(shape)
    return w.astype(np.float32)


def parity_inputs(size: int, seed: int = SEED) -> np.ndarray:
    """Returns the two fixed normalised input images (2, size, size, 3), NHWC float32."""
    rng = np.random.default_rng([seed, size, 12345])
    return rng.standard_normal((BATCH, size, size, 3)).astype(np.float32)


def summarise(fmap: np.ndarray) -> dict[str, np.ndarray]:
    """Returns a compact summary of a (B, h, w, C) map: channel means and a fixed slice."""
    fmap = np.asarray(fmap, np.float32)
    return {
        "mean": fmap.mean(axis=(1, 2)),  # (B, C)
        "slice": fmap[:, :, :, :SLICE_CHANNELS][:, :: max(1, fmap.shape[1] // 4),
                                                ::max(1, fmap.shape[2] // 4)],  # (B, <=4.., 16)
    }


def tokens_to_nhwc(out: np.ndarray) -> np.ndarray:
    """Returns a torch feature as NHWC: NCHW maps transposed; ViT tokens (B, 1 + g*g, C) with
    the class token dropped and the patches reshaped to (B, g, g, C)."""
    if out.ndim == 4:
        return out.transpose(0, 2, 3, 1)
    b, n, c = out.shape
    g = int(round((n - 1) ** 0.5))
    return out[:, 1:].reshape(b, g, g, c)


def torchvision_forward(arch: str, state_dict: dict[str, np.ndarray], x_nhwc: np.ndarray,
                        layers: tuple[str, ...]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Returns the float32 eval-mode logits and NHWC feature maps of the PyTorch reference of
    `arch` (torchvision, or TorchEfficientNetLite) with `state_dict` loaded (needs torch)."""
    import torch

    if arch.startswith("efficientnet_lite"):
        return efficientnet_lite_forward(arch, state_dict, x_nhwc, layers)
    import torchvision

    head = next(k for k in ("fc.weight", "classifier.6.weight", "heads.head.weight")
                if k in state_dict)
    kwargs = {"image_size": x_nhwc.shape[1]} if arch.startswith("vit_") else {}
    model = getattr(torchvision.models, arch)(weights=None, num_classes=len(state_dict[head]),
                                              **kwargs)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()},
                          strict=True)
    model.eval()
    captured: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    hooks = [modules[name].register_forward_hook(
        lambda _m, _i, o, name=name: captured.__setitem__(name, o.detach().clone()))
        for name in layers]
    with torch.no_grad():
        logits = model(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy()))
    for hook in hooks:
        hook.remove()
    feats = {name: tokens_to_nhwc(captured[name].numpy()) for name in layers}
    return logits.numpy(), feats


# ----------------------------------------------------------------------------- EfficientNet-Lite
# An independent PyTorch model of EfficientNet-Lite, written from Google's description
# (efficientnet_lite_builder: the B0 block strings, ReLU6, no squeeze-excitation, stem/head and
# the first/last stage not scaled) with the state dict's module names, so that weights load
# with strict=True. It shares no code with tame_jax.backbones.efficientnet.

_B0_BLOCKS = ("r1_k3_s11_e1_i32_o16", "r2_k3_s22_e6_i16_o24", "r2_k5_s22_e6_i24_o40",
              "r3_k3_s22_e6_i40_o80", "r3_k5_s11_e6_i80_o112", "r4_k5_s22_e6_i112_o192",
              "r1_k3_s11_e6_i192_o320")
_LITE = {"efficientnet_lite0": (1.0, 1.0), "efficientnet_lite1": (1.0, 1.1),
         "efficientnet_lite2": (1.1, 1.2), "efficientnet_lite3": (1.2, 1.4),
         "efficientnet_lite4": (1.4, 1.8)}


def _lite_blocks(arch: str) -> list[dict[str, int]]:
    """Returns the decoded block strings of an EfficientNet-Lite, one dict per block."""
    width, depth = _LITE[arch]

    def filters(c: int) -> int:
        c = c * width
        new = max(8, int(c + 4) // 8 * 8)
        return int(new + 8 if new < 0.9 * c else new)

    blocks = []
    for i, text in enumerate(_B0_BLOCKS):
        f = {part[0]: int(part[1:]) for part in text.split("_")}
        repeats = f["r"] if i in (0, len(_B0_BLOCKS) - 1) else int(np.ceil(f["r"] * depth))
        cin = 32 if i == 0 else filters(f["i"])  # the stem is not scaled
        for r in range(repeats):
            blocks.append({"in": cin if r == 0 else filters(f["o"]), "out": filters(f["o"]),
                           "k": f["k"], "s": f["s"] // 10 if r == 0 else 1, "e": f["e"],
                           "stage": i + 1})
    return blocks


def _torch_lite_module(arch: str, num_classes: int) -> Any:
    """Returns TorchEfficientNetLite(arch) (a torch.nn.Module; imported lazily)."""
    import torch.nn.functional as F
    from torch import nn

    class SameConv(nn.Conv2d):
        """Conv2d with TensorFlow's "SAME" padding: total k - 1 (stride 1) or what makes
        ceil(n / s) outputs, the odd pixel after."""

        def forward(self, x):
            pads = []
            for n, k, s in zip(x.shape[-2:], self.kernel_size, self.stride, strict=True):
                total = max((-(-n // s) - 1) * s + k - n, 0)
                pads.append((total // 2, total - total // 2))
            (top, bottom), (left, right) = pads
            return super().forward(F.pad(x, (left, right, top, bottom)))

    def bn(c):
        return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)

    class Block(nn.Module):
        def __init__(self, b):
            super().__init__()
            mid = b["in"] * b["e"]
            self.b = b
            if b["e"] != 1:
                self._expand_conv = SameConv(b["in"], mid, 1, bias=False)
                self._bn0 = bn(mid)
            self._depthwise_conv = SameConv(mid, mid, b["k"], stride=b["s"], groups=mid,
                                            bias=False)
            self._bn1 = bn(mid)
            self._project_conv = SameConv(mid, b["out"], 1, bias=False)
            self._bn2 = bn(b["out"])

        def forward(self, x):
            h = x
            if self.b["e"] != 1:
                h = F.relu6(self._bn0(self._expand_conv(h)))
            h = F.relu6(self._bn1(self._depthwise_conv(h)))
            h = self._bn2(self._project_conv(h))
            if self.b["s"] == 1 and self.b["in"] == self.b["out"]:
                h = h + x
            return h

    class TorchEfficientNetLite(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks_args = _lite_blocks(arch)
            self._conv_stem = SameConv(3, 32, 3, stride=2, bias=False)
            self._bn0 = bn(32)
            self._blocks = nn.ModuleList(Block(b) for b in self.blocks_args)
            self._conv_head = SameConv(self.blocks_args[-1]["out"], 1280, 1, bias=False)
            self._bn1 = bn(1280)
            self._fc = nn.Linear(1280, num_classes)

        def forward(self, x):
            """Returns (logits, {layer name: NCHW map}) for every tame_jax layer name."""
            maps = {"_conv_stem": self._conv_stem(x)}
            maps["_bn0"] = self._bn0(maps["_conv_stem"])
            h = maps["stem"] = F.relu6(maps["_bn0"])
            for n, block in enumerate(self._blocks):
                h = maps[f"_blocks.{n}"] = block(h)
                maps[f"stage{block.b['stage']}"] = h  # the last block of a stage wins
            maps["_conv_head"] = self._conv_head(h)
            maps["_bn1"] = self._bn1(maps["_conv_head"])
            h = maps["head"] = F.relu6(maps["_bn1"])
            maps["avgpool"] = h.mean(dim=(2, 3), keepdim=True)
            return self._fc(maps["avgpool"].flatten(1)), maps

    return TorchEfficientNetLite()


def efficientnet_lite_forward(arch: str, state_dict: dict[str, np.ndarray], x_nhwc: np.ndarray,
                              layers: tuple[str, ...]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Returns TorchEfficientNetLite's float32 eval-mode logits and NHWC maps of `layers`, with
    state_dict (lukemelas naming) loaded strictly; x_nhwc is the normalised input."""
    import torch

    model = _torch_lite_module(arch, len(state_dict["_fc.weight"]))
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()},
                          strict=True)
    model.eval()
    with torch.no_grad():
        logits, maps = model(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy()))
    return logits.numpy(), {name: maps[name].numpy().transpose(0, 2, 3, 1) for name in layers}


def main() -> None:
    """Writes tests/fixtures/parity_<arch>.npz for every case in PARITY_CASES (or --only)."""
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tests/fixtures")
    parser.add_argument("--only", nargs="*", default=None, help="these architectures only")
    args = parser.parse_args()
    torch.set_num_threads(2)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for arch, (size, layers) in PARITY_CASES.items():
        if args.only and arch not in args.only:
            continue
        logits, feats = torchvision_forward(arch, parity_state_dict(arch), parity_inputs(size),
                                            layers)
        arrays = {"logits": logits.astype(np.float32), "size": np.array(size),
                  "layers": np.array(layers)}
        for name, fmap in feats.items():
            for stat, value in summarise(fmap).items():
                arrays[f"{name}/{stat}"] = value
        path = out_dir / f"parity_{arch}.npz"
        np.savez_compressed(path, **arrays)
        scale = {name: float(np.abs(f).mean()) for name, f in feats.items()}
        print(f"{path}: {path.stat().st_size / 1024:.0f} KiB, |logits| mean "
              f"{np.abs(logits).mean():.3g}, feature |mean| {scale}")


if __name__ == "__main__":
    main()
