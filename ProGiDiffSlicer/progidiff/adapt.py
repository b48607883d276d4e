"""``progidiff adapt``: few-shot low-rank (LoRA, peft) adaptation of a model to a new
modality (CT → MR), on the ControlNet branch's attention and convolution layers (and
optionally the base UNet's attention). The adapter is saved alone, records the base it
belongs to (sha256 of its weights) and refuses any other base."""
from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .configs import AdaptConfig  # noqa: F401 (re-exported: progidiff.adapt.AdaptConfig)
from .data import SliceDataset, prepare_case
from .datasets import read_dataset
from .errors import InputError, ModelError
from .label_names import dataset_organs
from .model import WEIGHTS_NAME, ProGiDiffModel, misplaced_folder, sha256
from .outputs import check_output_dir, staging, write_errors_as_os_errors
from .prompts import Vocabulary
from .train import _collate_text, mask_dice_loss, phrase_table
from .volume import GridSpec

log = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_CARD = "adapter_card.json"
#: Branch: attention projections and every convolution of the ControlNet copy and of the
#: custom image encoder (the layers that read the new modality's intensities).
BRANCH_TARGETS = r"controlnet\..*(to_q|to_k|to_v|to_out\.0|conv1|conv2|conv_in|conv_out|proj_in|proj_out)"
BASE_TARGETS = r"unet\..*(to_q|to_k|to_v|to_out\.0)"


def lora_config(rank: int, include_base: bool = False):
    from peft import LoraConfig

    target = f"({BRANCH_TARGETS}|{BASE_TARGETS})" if include_base else BRANCH_TARGETS
    return LoraConfig(r=rank, lora_alpha=rank, target_modules=target, lora_dropout=0.0, init_lora_weights=True)


def shot_slab(z_world_native: np.ndarray, shots: int) -> tuple[tuple[float, float], list[tuple[float, float]]]:
    """The K central native slices adapt; the slabs above and below are held out."""
    z = np.sort(z_world_native)
    if shots >= len(z):
        raise InputError(f"--shots {shots} leaves no slice to evaluate on ({len(z)} slices in the scan).")
    start = (len(z) - shots) // 2
    lo, hi = float(z[start]), float(z[start + shots - 1])
    half = float(np.median(np.diff(z))) / 2 if len(z) > 1 else 1.0
    held = [(float(z[0]) - half, lo - half), (hi + half, float(z[-1]) + half)]
    return (lo - half, hi + half), [(a, b) for a, b in held if b > a]


def apply_adapter(model: ProGiDiffModel, adapter_dir: str | Path) -> ProGiDiffModel:
    """A copy of ``model`` with the adapter's LoRA weights injected (the base is untouched)."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    d = Path(adapter_dir)
    card = read_adapter_card(d)
    base_sha = getattr(model, "card", {}).get("sha256", {}).get(WEIGHTS_NAME)
    if base_sha and card.get("base_sha256") and card["base_sha256"] != base_sha:
        raise ModelError(f"{d}: this adapter was made for model '{card.get('base_model')}' "
                         f"(weights {card['base_sha256'][:12]}…), not for {Path(getattr(model, 'model_dir', '?')).name} "
                         f"({base_sha[:12]}…); use the adapter of this model or adapt it again.")
    cfg_data = json.loads((d / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    cfg = LoraConfig(**{k: v for k, v in cfg_data.items() if k in LoraConfig.__dataclass_fields__})
    adapted = copy.deepcopy(model)
    inject_adapter_in_model(cfg, adapted)
    state = load_file(str(d / ADAPTER_WEIGHTS))
    result = set_peft_model_state_dict(adapted, {k: v.float() for k, v in state.items()})
    if getattr(result, "unexpected_keys", None):
        raise ModelError(f"{d}: the adapter's layers do not match this model ({len(result.unexpected_keys)} unknown).")
    adapted.card = {**getattr(model, "card", {}), "adapter": card}
    adapted.model_dir = getattr(model, "model_dir", "")
    return adapted.eval()


def read_adapter_card(d: Path) -> dict:
    if not d.is_dir():
        raise ModelError(f"{d}: no such adapter folder.")
    wrong = misplaced_folder(d, ADAPTER_CARD)
    if wrong:
        raise ModelError(wrong)
    for name in (ADAPTER_CARD, ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (d / name).is_file():
            raise ModelError(f"{d}: the adapter folder lacks {name}; copy the whole folder again.")
    card = json.loads((d / ADAPTER_CARD).read_text(encoding="utf-8"))
    want = card.get("sha256", {}).get(ADAPTER_WEIGHTS)
    if want and sha256(d / ADAPTER_WEIGHTS) != want:
        raise ModelError(f"{d / ADAPTER_WEIGHTS}: its sha256 does not match the adapter card; copy it again.")
    return card


def find_adapter(model_dir: Path, modality: str, base_sha: str | None) -> Path | None:
    """An adapter for ``modality`` made for this base: beside the model (``<model>-*``) or in ``<model>/adapters``."""
    candidates = list(model_dir.parent.glob(f"{model_dir.name}-*")) + list((model_dir / "adapters").glob("*"))
    for c in sorted(candidates):
        card_path = c / ADAPTER_CARD
        if not card_path.is_file():
            continue
        card = json.loads(card_path.read_text(encoding="utf-8"))
        if card.get("modality") == modality and (base_sha is None or card.get("base_sha256") == base_sha):
            return c
    return None


def base_dice_loss(card: dict) -> str:
    """The Dice reduction the base was trained with, which adaptation keeps: a base trained
    before ``--dice-loss`` existed (ct-v3) used the batch Dice."""
    return card.get("training", {}).get("config", {}).get("dice_loss", "batch")


def adapt(cfg: AdaptConfig, progress: bool = True) -> Path:
    from diffusers import DDPMScheduler
    from peft import get_peft_model_state_dict, inject_adapter_in_model

    t0 = time.time()
    check_output_dir(Path(cfg.output), overwrite=True)
    base = ProGiDiffModel.from_pretrained(cfg.base)
    vocab = Vocabulary.from_dict(base.card["vocabulary"])
    info = read_dataset(cfg.dataset)
    grid = GridSpec(tuple(base.config.grid_spacing), tuple(base.config.grid_size))
    named = dataset_organs(info.labels, vocab)
    organs = [o for o in base.card["organs"] if o in named]
    if not organs:
        raise InputError(f"{cfg.dataset}: none of its label names matches the model's organs.")
    cases = [prepare_case(e, info.labels, vocab, grid, organs, cfg.modality) for e in info.cases if e.label is not None]
    holdout: dict[str, list[tuple[float, float]]] = {}
    adapt_slabs = {}
    for c in cases:
        adapt_slabs[c.name], holdout[c.name] = shot_slab(c.scan_z_mm, cfg.shots)
    from .prompts import TextEncoder, default_text_encoder_dir

    encoder = TextEncoder(default_text_encoder_dir(), max_length=base.config.text_max_length)
    table, counts = phrase_table(encoder, vocab, organs)
    model = copy.deepcopy(base)
    lcfg = lora_config(cfg.rank, cfg.include_base)
    # peft draws lora_A's initial weights from torch's global generator: without this the same
    # command gave another adapter every run (MR mean Dice 0.378 and 0.382 for two runs of seed 0).
    torch.manual_seed(cfg.seed)
    inject_adapter_in_model(lcfg, model)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = base.num_parameters()
    ds = SliceDataset(cases, organs, base.config.context, length=cfg.steps * cfg.batch_size, seed=cfg.seed,
                      exclude_z=holdout)
    if not cfg.bias_field:
        ds.transform.transforms = tuple(t for t in ds.transform.transforms if type(t).__name__ != "RandBiasFieldd")
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, num_workers=0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    sched = DDPMScheduler(num_train_timesteps=base.config.num_train_timesteps, beta_schedule=base.config.beta_schedule,
                          prediction_type="sample")
    dice_kind = base_dice_loss(base.card)
    dice = mask_dice_loss(dice_kind)
    gen = torch.Generator().manual_seed(cfg.seed)
    model.train()
    bar = tqdm(loader, total=cfg.steps, desc="adapt", disable=not progress, dynamic_ncols=True)
    losses = []
    for batch in bar:
        x0 = model.encode_mask(batch["label"])
        text = _collate_text(batch, table, counts, gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (x0.shape[0],), generator=gen)
        x_t = sched.add_noise(x0, torch.randn(x0.shape, generator=gen), t)
        pred = model(x_t, t, text, batch["image"], batch["coord"])
        loss = torch.nn.functional.mse_loss(pred, x0) + dice((pred.clamp(-1, 1) + 1) / 2, batch["label"])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{loss.item():.4f}")
    out = Path(cfg.output)
    # Written beside OUTPUT and moved in once whole: a Ctrl-C or SIGTERM while saving leaves no
    # adapter whose weights and card disagree.
    with staging(out, overwrite=True) as tmp:
        state = {k: v.detach().to(torch.float16).contiguous() for k, v in get_peft_model_state_dict(model).items()}
        with write_errors_as_os_errors(tmp / ADAPTER_WEIGHTS):
            save_file(state, str(tmp / ADAPTER_WEIGHTS))
        cfg_dict = lcfg.to_dict()
        cfg_dict = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg_dict.items()}
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(cfg_dict, indent=2, default=str), encoding="utf-8")
        card = {
            "kind": "lora-adapter", "modality": cfg.modality, "base_model": Path(cfg.base).name,
            "base_sha256": base.card["sha256"][WEIGHTS_NAME], "organs": organs, "rank": cfg.rank,
            "targets": lcfg.target_modules, "include_base": cfg.include_base, "shots": cfg.shots,
            "bias_field_augmentation": cfg.bias_field, "dice_loss": dice_kind,
            "trainable_parameters": trainable, "model_parameters": total, "trainable_fraction": trainable / total,
            "training": {"command": cfg.command, "dataset": str(cfg.dataset), "cases": [c.name for c in cases],
                         "steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr, "seconds": round(time.time() - t0, 1),
                         "final_loss_mean_last_50": float(np.mean(losses[-50:])) if losses else None,
                         "adapt_z_mm": {k: [round(v[0], 2), round(v[1], 2)] for k, v in adapt_slabs.items()},
                         "holdout_z_mm": {k: [[round(a, 2), round(b, 2)] for a, b in v] for k, v in holdout.items()}},
            "sha256": {ADAPTER_WEIGHTS: sha256(tmp / ADAPTER_WEIGHTS)},
        }
        (tmp / ADAPTER_CARD).write_text(json.dumps(card, indent=2), encoding="utf-8")
        from .card import write_markdown

        write_markdown(tmp)
    log.info("adapter saved to %s: %d trainable parameters (%.2f %% of %d) in %.0f s", out, trainable,
             100 * trainable / total, total, time.time() - t0)
    return out
