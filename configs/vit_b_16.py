"""T-TAME on torchvision's ViT-B/16 (ImageNet), T-TAME's recipe (IDT-ITI/T-TAME, vit_TAME.py).

eta = 1e-3, 8 epochs, batch 32; taps: ln_1 of encoder blocks 9, 10, 11 (T-TAME's FX nodes
`encoder.layers.encoder_layer_N.ln`), 14x14x768 maps at 224 px. What T-TAME's code does
differently from TAME's recipe is set here: the mask multiplies the normalised input (a masked
pixel becomes the mean colour) and biases train at the kernels' learning rate. The rest is
TAME's and T-TAME's alike: weight decay 5e-4 on kernels and BatchNorm scales (not biases),
momentum cycling 0.95 -> 0.85 -> 0.95 (OneCycleLR's default, which overrides SGD's 0.9).
"""

from tame_jax.config import default_config


def get_config():
    """Returns the ViT-B/16 config."""
    c = default_config()
    c.model.backbone = "vit_b_16"
    c.model.layers = tuple(f"encoder.layers.encoder_layer_{i}.ln_1" for i in (9, 10, 11))
    c.model.backbone_weights = "weights/vit_b_16.safetensors"
    c.learning_rate = 1e-3
    c.num_epochs = 8
    c.batch_size = 32
    c.bias_lr_factor = 1.0
    c.loss.mask_space = "normalized"
    c.eval.cam_layer = "encoder.layers.encoder_layer_11.ln_1"  # pytorch-grad-cam's blocks[-1].norm1
    return c
