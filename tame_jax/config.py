"""The defaults every config starts from; `configs/*.py` override what differs."""

from __future__ import annotations

import ml_collections


def default_config() -> ml_collections.ConfigDict:
    """Returns the full set of options with the paper's ResNet-50 defaults."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.backbone = "resnet50"
    c.model.backbone_kwargs = ml_collections.ConfigDict()  # e.g. width for small ResNets
    c.model.num_classes = 1000
    c.model.layers = ("layer2", "layer3", "layer4")
    c.model.variant = "tame"
    c.model.max_size = 56
    # A local torchvision state dict (.safetensors/.npz/.pth); "random" = seeded random weights,
    # for tests and benchmarks only. The README says how to make the file once.
    c.model.backbone_weights = "weights/resnet50.safetensors"
    c.model.backbone_mode = "frozen"  # "train" reproduces the reference (BN batch stats, dropout)
    c.model.selective_fusion = True
    c.model.class_names = ()  # shown in overlays; empty = ImageNet names for 1000 classes
    c.model.dtype = "float32"  # "bfloat16": compute in bf16, params / loss / softmax in f32

    c.data = ml_collections.ConfigDict()
    c.data.source = "imagenet2012"  # | "folder" | "list" | "synthetic_shapes"
    c.data.data_dir = ml_collections.FieldReference(None, field_type=str)
    c.data.manual_dir = ml_collections.FieldReference(None, field_type=str)
    c.data.root = ""
    c.data.list_file = ""
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    c.data.image_size = 224
    c.data.resize_size = 256
    c.data.synthetic_config = "default"  # synthetic_shapes size: "default" | "tiny"
    c.data.on_bad_image = "skip"  # | "error"
    c.data.shuffle_buffer = 16_384
    c.data.num_parallel_calls = 0  # decoding threads per host; 0 = one per CPU core
    c.data.threads = 0  # tf.data's private thread pool size; 0 = TensorFlow's default
    c.data.prefetch_batches = 2

    c.batch_size = 32  # global, over all devices and hosts
    c.num_epochs = 4
    c.num_train_steps = -1  # > 0 overrides num_epochs
    c.learning_rate = 1e-4

    c.log_every = 50
    c.checkpoint_every = 1000
    c.keep_checkpoints = 3

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 32
    c.eval.num_examples = -1  # > 0: only the first N examples of the eval split
    c.eval.road_fractions = (0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 0.9)
    c.eval.ad_ic_fractions = (1.0, 0.5, 0.15)
    c.eval.insertion_steps = 32
    c.eval.cam_layer = ""  # baselines' layer; "" = the last of model.layers
    c.eval.rise_masks = 4000

    c.distributed = ml_collections.ConfigDict()
    c.distributed.coordinator_address = ""  # set these three only where auto-detection fails
    c.distributed.num_processes = -1
    c.distributed.process_id = -1
    return c
