"""The training and adaptation settings (``progidiff train`` / ``adapt``), without torch.

Kept apart from train.py and adapt.py so that the command line can build its parser, whose
defaults are these, without importing torch and diffusers: ``progidiff --help`` took 5.0 s
on a 2-core machine with them, most of it importing diffusers' UNet blocks.
"""
from __future__ import annotations

from dataclasses import dataclass, field

#: Default range of the body-size augmentation: the slice's content drawn 0.8x to 1.33x as large.
BODY_SCALE = (0.8, 4 / 3)

DEFAULT_ORGANS = ("liver", "spleen", "kidney_left", "kidney_right", "gallbladder", "stomach", "pancreas",
                  "aorta", "inferior_vena_cava")


@dataclass
class TrainConfig:
    dataset: str
    output: str
    #: None: every organ of DEFAULT_ORGANS that the dataset's labels name
    organs: tuple[str, ...] | None = None
    base_model: str | None = None  # local Stable Diffusion folder
    stage1_steps: int = 600
    stage2_steps: int = 2400
    batch_size: int = 16
    lr: float = 3e-4
    seed: int = 0
    grid_size: int = 64
    grid_spacing: tuple[float, float, float] = (6.0, 6.0, 5.0)
    context: int = 1
    channels: tuple[int, ...] = (16, 32, 64, 128)
    encoder_channels: tuple[int, ...] = (16, 32, 32)
    holdout_fraction: float = 0.0
    holdout_z: dict | None = None  # {case: [(lo, hi), ...]} world-z slabs (mm) kept out of training
    #: Whole labelled cases kept out of training, for evaluate: this many, drawn with ``seed`` (a
    #: cohort's usual split: another person's scan, not another slab of the same person's) ...
    holdout_cases: int = 0
    #: ... or these, by name (``--holdout-like``: the same split as another model, e.g. its baseline)
    holdout_case_names: tuple[str, ...] | None = None
    #: Only the cases of this split, where the dataset records one (TotalSegmentator's meta.csv: "train")
    split: str | None = None
    modality: str | None = None
    #: "no", "fp16", "bf16", or None: accelerate's choice (``accelerate launch --mixed_precision``,
    #: ``accelerate config``), else "no". ``make_accelerator`` replaces None by what the run uses.
    mixed_precision: str | None = None
    checkpoint_every: int = 500
    #: t = T * u**high_noise_power: with 0.5, 75 % of samples have t > T/2. At low noise x0 is
    #: nearly given by x_t, so uniform t spends half the batch on what teaches nothing about the image.
    high_noise_power: float = 0.5
    #: Stage 2 also fine-tunes the base UNet (at lr x base_lr_scale). ProGiDiff keeps the base
    #: frozen; see the model card for which was used and why.
    finetune_base: bool = False
    base_lr_scale: float = 0.1
    #: A trained ProGiDiff model folder to fine-tune (stage 2 only): its grid, text encoder and
    #: weights are kept, so a researcher can continue the shipped model on their own labels.
    init_from: str | None = None
    #: What stage 1 pre-trains the base denoiser on: "masks" (a text-conditioned prior of the
    #: organs' shapes) or "images" (diffusion pre-training on the unlabelled scan slices
    #: themselves, no labels used). See docs/evaluation/ablation for which helps.
    stage1_data: str = "masks"
    #: The slice's normalised body-axis position as an extra input (Kurmukov et al.).
    anatomical_guidance: bool = False
    #: How the mask Dice term is reduced: "sample" (one Dice per slice, then the mean: a 9-pixel
    #: aorta weighs as much as a 500-pixel liver) or "batch" (one Dice over the whole batch, which
    #: large organs dominate; the model trained so learned nothing of the aorta, IVC or pancreas)
    #: or "both", their sum (the default: see mask_dice_loss for the measured comparison).
    dice_loss: str = "both"
    #: Body-size augmentation: each slice's content drawn this many times as large (min, max).
    body_scale: tuple[float, float] = BODY_SCALE
    #: Share of CT training slices given a random contrast phase from their labels (data.contrast_gain).
    contrast_phase: float = 0.0
    #: Share of CT training slices whose liver is made fatty, from their labels (data.fatty_liver_gain).
    fatty_liver: float = 0.0
    #: Share of CT training slices given focal liver lesions, from their labels (data.liver_lesion_gain).
    liver_lesions: float = 0.0
    #: "unet": train the deterministic MONAI UNet baseline instead (same data, transforms, budget).
    baseline: str | None = None
    resume: bool = False
    workers: int = 1
    command: str = ""
    extra: dict = field(default_factory=dict)


@dataclass
class AdaptConfig:
    dataset: str
    base: str
    output: str
    modality: str = "MR"
    shots: int = 10
    rank: int = 8
    steps: int = 300
    batch_size: int = 8
    lr: float = 1e-3
    seed: int = 0
    include_base: bool = False
    bias_field: bool = True
    command: str = ""
