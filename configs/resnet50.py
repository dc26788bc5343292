"""TAME on torchvision's ResNet-50 (ImageNet), the paper's setup: eta = 1e-4, 4 epochs, batch 32."""

from tame_jax.config import default_config


def get_config():
    """Returns the ResNet-50 config."""
    c = default_config()
    c.model.backbone = "resnet50"
    c.model.layers = ("layer2", "layer3", "layer4")
    c.model.backbone_weights = "weights/resnet50.safetensors"
    c.learning_rate = 1e-4
    c.num_epochs = 4
    return c
