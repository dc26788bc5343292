"""The demo on a vision transformer: T-TAME on a small ViT that classifies synthetic_shapes.

    python -m tame_jax.demo --config=configs/demo_vit.py --workdir=runs/demo_vit

The backbone (`vit_mini_16`: patch 16, width 64, 4 blocks, 8x8 token maps at 128 px) ships with
the package (made by `python -m tame_jax.tools.train_backbone --backbone=vit_mini_16
--fresh_images ...` on a GPU; command, device, seed and test accuracy, 88.1 %, in
tame_jax/assets/demo_vit_mini_16.json). TAME fuses the ln_1 outputs
of blocks 1, 2, 3 (T-TAME's taps: the last three blocks' first LayerNorm), trained with
T-TAME's recipe options; the baselines read the last block's ln_1 (pytorch-grad-cam's ViT
target). Everything else is the ResNet demo's (configs/demo.py).
"""

import runpy
from importlib import resources
from pathlib import Path


def get_config():
    """Returns the ViT demo config."""
    c = runpy.run_path(str(Path(__file__).with_name("demo.py")))["get_config"]()
    c.model.backbone = "vit_mini_16"
    c.model.backbone_kwargs = {}
    c.model.layers = tuple(f"encoder.layers.encoder_layer_{i}.ln_1" for i in (1, 2, 3))
    c.model.backbone_weights = str(
        resources.files("tame_jax") / "assets" / "demo_vit_mini_16.safetensors")
    c.bias_lr_factor = 1.0  # T-TAME
    c.loss.mask_space = "normalized"  # T-TAME
    c.eval.cam_layer = "encoder.layers.encoder_layer_3.ln_1"
    return c
