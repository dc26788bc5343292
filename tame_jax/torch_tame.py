"""A PyTorch TAME (train step and explanation) for the benchmark's side-by-side comparison.

Written for this purpose from DESIGN §1, not from any reference code: a torchvision backbone,
frozen (eval mode, no parameter gradients), its TAME layers read by forward hooks; the "tame"
attention module in NCHW torch ops; the objective; SGD with Nesterov momentum and the two
parameter groups. It is the straightforward code (full fusion: all K maps, then the batch's
columns), with a class-selective option for an equal-algorithm comparison. Same weights as a
Flax `Model` through `tame_jax.weights`' state-dict export, so a test can check that both
compute the same loss and update (`tests/test_torch_tame.py`).

Needs the optional torch stack: `pip install -e ".[torch]"`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tame_jax import losses, optim

TORCH_MISSING = (
    "The PyTorch comparison needs torch and torchvision, which are not installed: "
    "pip install -e \".[torch]\" (CPU wheels: add --extra-index-url "
    "https://download.pytorch.org/whl/cpu), or run the benchmark without --vs-torch."
)


def import_torch() -> tuple[Any, Any]:
    """Returns (torch, torchvision); ImportError saying how to install them when missing."""
    try:
        import torch
        import torchvision
    except ImportError as e:
        raise ImportError(TORCH_MISSING) from e
    return torch, torchvision


def jax_cpu_threads() -> int:
    """Returns the number of CPU threads XLA's CPU client uses (the cores this process may use)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def make_attention(channels: Sequence[int], num_classes: int, size: int) -> Any:
    """Returns the torch TAME attention module (reference state-dict names: convs.i, bns.i,
    fuser) for feature maps of `channels`, maps of size S = `size`."""
    torch, _ = import_torch()
    nn, f = torch.nn, torch.nn.functional

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = nn.ModuleList([nn.Conv2d(c, c, 1) for c in channels])
            self.bns = nn.ModuleList([nn.BatchNorm2d(c) for c in channels])
            self.fuser = nn.Conv2d(sum(channels), num_classes, 1)

        def forward(self, feats, classes=None):
            """Returns (B, K, S, S) class logits maps, or (B, N, S, S) for classes (N,)."""
            branches = []
            for conv, bn, x in zip(self.convs, self.bns, feats, strict=True):
                y = torch.relu(bn(conv(x)) + x)
                branches.append(f.interpolate(y, size=(size, size), mode="bilinear",
                                              align_corners=False))
            z = torch.cat(branches, 1)  # (B, ΣC, S, S)
            if classes is None:
                return self.fuser(z)
            return f.conv2d(z, self.fuser.weight[classes], self.fuser.bias[classes])

    return Attention()


def tame_loss(images: Any, maps: Any, labels: Any, logits_masked: Any) -> tuple[Any, dict]:
    """Returns (loss, terms) of DESIGN's objective; maps (B, B, S, S) = M, images NCHW."""
    torch, _ = import_torch()
    b = images.shape[0]
    ce = torch.nn.functional.cross_entropy(logits_masked, labels)
    c = losses.PAPER
    area = ((maps + c.area_eps) ** c.area_power).mean()
    tv = ((maps[..., 1:, :] - maps[..., :-1, :]) ** 2).sum()
    tv = tv + ((maps[..., :, 1:] - maps[..., :, :-1]) ** 2).sum()
    sq = maps**2
    border = (sq[..., 0, :].sum() + sq[..., -1, :].sum() + sq[..., :, 0].sum()
              + sq[..., :, -1].sum())
    var = (tv + c.border * border) / (2 * b)
    loss = c.ce * ce + c.area * area + c.variation * var
    return loss, {"loss": loss, "ce": ce, "area": area, "variation": var}


class TorchTAME:
    """A torchvision backbone (frozen) with TAME attention: `train_step` and `explain`.

    backbone_state / attention_state: torch-layout state dicts (numpy or tensors) to load, e.g.
    `weights.flax_to_torchvision(model.backbone_vars)` and
    `weights.tame_state_dict_from_variables(attention_vars)`; None keeps torch's random init.
    selective: fuse only the batch's classes (training) / each image's class (explanation).
    """

    def __init__(self, backbone: str, layers: Sequence[str], *, num_classes: int = 1000,
                 image_size: int = 224, max_size: int = 56,
                 backbone_state: Mapping[str, Any] | None = None,
                 attention_state: Mapping[str, Any] | None = None,
                 learning_rate: float = 1e-4, momentum: float = 0.9,
                 selective: bool = False, channels_last: bool = False,
                 mean: Sequence[float] = (0.485, 0.456, 0.406),
                 std: Sequence[float] = (0.229, 0.224, 0.225)):
        torch, torchvision = import_torch()
        self.torch, self.layers, self.selective = torch, tuple(layers), selective
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        net = torchvision.models.get_model(backbone, weights=None, num_classes=num_classes)
        if backbone_state is not None:
            net.load_state_dict({k: torch.tensor(np.asarray(v)) for k, v in
                                 backbone_state.items()})
        self.backbone = net.eval().requires_grad_(False).to(memory_format=self.memory_format)
        self.taps: dict[str, Any] = {}
        for name in self.layers:
            net.get_submodule(name).register_forward_hook(
                lambda _m, _i, out, name=name: self.taps.__setitem__(name, out))
        with torch.no_grad():
            x = torch.zeros(1, 3, image_size, image_size)
            net(x)
            channels = [self.taps[n].shape[1] for n in self.layers]
            size = min(self.taps[self.layers[0]].shape[-1], max_size)
        self.attention = make_attention(channels, num_classes, size)
        if attention_state is not None:
            self.attention.load_state_dict(
                {k: torch.tensor(np.asarray(v)) for k, v in attention_state.items()})
        self.attention.to(memory_format=self.memory_format).train()
        decay = [p for n, p in self.attention.named_parameters() if not n.endswith("bias")]
        bias = [p for n, p in self.attention.named_parameters() if n.endswith("bias")]
        self.optimizer = torch.optim.SGD(
            [{"params": decay, "weight_decay": optim.WEIGHT_DECAY, "lr": learning_rate},
             {"params": bias, "weight_decay": 0.0,
              "lr": optim.BIAS_LR_FACTOR * learning_rate}],
            lr=learning_rate, momentum=momentum, nesterov=True)
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    def images(self, images_nhwc: np.ndarray) -> Any:
        """Returns a (B, 3, H, W) float32 tensor of NHWC images in [0, 1]."""
        x = self.torch.from_numpy(np.ascontiguousarray(np.asarray(images_nhwc, np.float32)))
        return x.permute(0, 3, 1, 2).contiguous(memory_format=self.memory_format)

    def features(self, x: Any) -> tuple[Any, list[Any]]:
        """Returns (logits, [tapped maps]) of images x (NCHW, [0, 1]) through the frozen net."""
        logits = self.backbone((x - self.mean) / self.std)
        return logits, [self.taps[n] for n in self.layers]

    def train_step(self, x: Any) -> dict[str, float]:
        """Runs one TAME step on images x (NCHW in [0, 1]); returns the loss terms (before the
        update): features, model-truth labels, the maps of the batch's classes, the masked
        forward through the frozen backbone, the backward to the attention, the SGD update."""
        torch, f = self.torch, self.torch.nn.functional
        b = x.shape[0]
        with torch.no_grad():
            logits, feats = self.features(x)
        labels = logits.argmax(1)  # (B,)
        if self.selective:
            c = self.attention(feats, labels)  # (B, B, S, S)
        else:
            c = self.attention(feats)[:, labels]  # all K maps, then the batch's columns
        maps = torch.sigmoid(c)  # M: (B, B, S, S)
        own = maps[torch.arange(b), torch.arange(b)]  # (B, S, S)
        up = f.interpolate(own[:, None], size=x.shape[-2:], mode="bilinear",
                           align_corners=False)
        logits_masked, _ = self.features(x * up)
        loss, terms = tame_loss(x, maps, labels, logits_masked)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {k: float(v.detach()) for k, v in terms.items()}

    def explain(self, x: Any) -> Any:
        """Returns maps (B, H, W) in [0, 1] of the predicted classes for images x (NCHW)."""
        torch, f = self.torch, self.torch.nn.functional
        with torch.inference_mode():
            self.attention.eval()
            logits, feats = self.features(x)
            classes = logits.argmax(1)
            b = x.shape[0]
            if self.selective:
                c = self.attention(feats, classes)[torch.arange(b), torch.arange(b)]
            else:
                c = self.attention(feats)[torch.arange(b), classes]  # (B, S, S)
            self.attention.train()
            lo = c.amin(dim=(1, 2), keepdim=True)
            hi = c.amax(dim=(1, 2), keepdim=True)
            c = (c - lo) / (hi - lo).clamp_min(1e-12)
            return f.interpolate(c[:, None], size=x.shape[-2:], mode="bilinear",
                                 align_corners=False)[:, 0]

    def attention_state(self) -> dict[str, np.ndarray]:
        """Returns a copy of the attention's state dict as numpy arrays (reference names)."""
        return {k: v.detach().cpu().numpy().copy()
                for k, v in self.attention.state_dict().items()}
