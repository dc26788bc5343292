"""TAME on torchvision's VGG-16 (ImageNet), the paper's setup: eta = 1e-3, 8 epochs, batch 32."""

from tame_jax.config import default_config


def get_config():
    """Returns the VGG-16 config."""
    c = default_config()
    c.model.backbone = "vgg16"
    c.model.layers = ("features.16", "features.23", "features.30")
    c.model.backbone_weights = "weights/vgg16.safetensors"
    c.learning_rate = 1e-3
    c.num_epochs = 8
    return c
