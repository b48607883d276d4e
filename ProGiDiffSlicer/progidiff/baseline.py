"""The deterministic baseline: a MONAI 2D ``UNet`` trained on the same data, transforms and
budget as the diffusion model (``progidiff train --baseline unet``), so that every evaluation
can show ProGiDiff against it.

One network predicts every organ at once (one sigmoid channel per organ, overlaps allowed),
from the same 2.5D model-grid slices; its output goes through the same largest-component
post-processing and the same resampling back to the scan's grid as the proposals.
"""
from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .errors import InputError, ModelError
from .interrupts import StopRequest, ignore_interrupts_in_worker
from .model import sha256
from .outputs import replaced_whole
from .volume import (GridSpec, Scan, body_axis_coords, body_slices, context_slices, from_model_grid, guess_modality,
                     on_model_grid)

log = logging.getLogger(__name__)

BASELINE_WEIGHTS = "baseline.safetensors"
BASELINE_CARD = "baseline_card.json"
#: Suffix of the folder beside a model where `evaluate` looks for its baseline.
BASELINE_SUFFIX = "-baseline-unet"


def build_unet(in_channels: int, out_channels: int, channels: Sequence[int]) -> torch.nn.Module:
    from monai.networks.nets import UNet

    return UNet(spatial_dims=2, in_channels=in_channels, out_channels=out_channels, channels=tuple(channels),
                strides=tuple([2] * (len(channels) - 1)), num_res_units=1, norm="batch")


def train_baseline(cfg, cases, slabs: dict, t0: float, progress: bool = True, held_cases: list[str] | None = None,
                   stop: StopRequest | None = None) -> Path:
    """Train the baseline into ``cfg.output`` with the diffusion run's data, transforms and
    budget (stage 1 + stage 2 steps, same batch size and learning rate). It keeps no checkpoints
    (12.7 min for the shipped one on 2 CPU cores): a signal stops it at once, except while saving."""
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from monai.losses import DiceCELoss

    from .data import SliceDataset
    from .prompts import Vocabulary
    from .train import make_accelerator

    # The same accelerate set-up as the diffusion model: `accelerate launch` shares the batches over GPUs.
    accelerator = make_accelerator(cfg)
    torch.manual_seed(cfg.seed)
    organs = list(cfg.organs)
    in_ch = 2 * cfg.context + 1 + int(cfg.anatomical_guidance)
    net = build_unet(in_ch, len(organs), cfg.channels)
    steps = cfg.stage1_steps + cfg.stage2_steps
    ds = SliceDataset(cases, organs, cfg.context, length=steps * cfg.batch_size * accelerator.num_processes,
                      seed=cfg.seed * 1000 + 7, exclude_z=slabs, multilabel=True, body_scale=tuple(cfg.body_scale),
                      contrast_phase=cfg.contrast_phase, fatty_liver=cfg.fatty_liver,
                      liver_lesions=cfg.liver_lesions)
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, num_workers=cfg.workers,
                                         worker_init_fn=ignore_interrupts_in_worker)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    lr_sched = get_cosine_schedule_with_warmup(opt, min(100, steps // 10), steps)
    loss_fn = DiceCELoss(sigmoid=True, batch=True)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    pnet, opt, loader, lr_sched = accelerator.prepare(net, opt, loader, lr_sched)
    pnet.train()
    main = accelerator.is_main_process
    with open(out / "train_log.csv", "w" if main else "a", newline="", encoding="utf-8") as logf:
        writer = csv.writer(logf)
        if main:
            writer.writerow(["step", "loss", "lr", "seconds"])
        for step, batch in enumerate(tqdm(loader, total=steps, desc="baseline unet", disable=not (progress and main),
                                          dynamic_ncols=True), 1):
            x = batch["image"]
            if cfg.anatomical_guidance:
                x = torch.cat([x, batch["coord"].reshape(-1, 1, 1, 1).expand(x.shape[0], 1, *x.shape[-2:])], 1)
            with accelerator.autocast():
                loss = loss_fn(pnet(x).float(), batch["label"])
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(pnet.parameters(), 1.0)
            opt.step()
            lr_sched.step()
            opt.zero_grad()
            if main:
                writer.writerow([step, f"{loss.item():.5f}", f"{lr_sched.get_last_lr()[0]:.2e}", f"{time.time() - t0:.1f}"])
    accelerator.wait_for_everyone()
    net = accelerator.unwrap_model(pnet)
    if not main:
        return out
    if stop is not None:
        stop.defer()  # a signal from here on waits for the save to end
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    with replaced_whole(out / BASELINE_WEIGHTS) as tmp:  # a failed save keeps a previous baseline's weights
        save_file(state, str(tmp))
    vocab = Vocabulary.load()
    card = {
        "kind": "baseline-unet", "modality": cases[0].modality, "organs": organs,
        "vocabulary": vocab.subset(organs).to_dict(),
        "processes": accelerator.num_processes,
        "network": {"class": "monai.networks.nets.UNet", "in_channels": in_ch, "channels": list(cfg.channels),
                    "num_res_units": 1, "anatomical_guidance": bool(cfg.anatomical_guidance)},
        "grid": {"spacing_mm": list(cfg.grid_spacing), "size": [cfg.grid_size, cfg.grid_size], "context": cfg.context},
        "training": {"command": cfg.command, "dataset": str(cfg.dataset), "cases": [c.name for c in cases],
                     "steps": steps, "batch_size": cfg.batch_size, "lr": cfg.lr, "seconds": round(time.time() - t0, 1),
                     "holdout_z_mm": {k: [[round(a, 2), round(b, 2)] for a, b in v] for k, v in slabs.items()},
                     "holdout_cases": list(held_cases or [])},
        "parameters": sum(p.numel() for p in net.parameters()),
        "sha256": {BASELINE_WEIGHTS: sha256(out / BASELINE_WEIGHTS)},
    }
    (out / BASELINE_CARD).write_text(json.dumps(card, indent=2), encoding="utf-8")
    (out / "README.md").write_text(render_card(card), encoding="utf-8")
    log.info("baseline UNet saved to %s after %.0fs", out, time.time() - t0)
    return out


def render_card(card: dict) -> str:
    """The baseline's card as Markdown (its measured numbers sit in the evaluation reports and in
    the card of the diffusion model it is compared with, as the "baseline UNet" column)."""
    t, n = card["training"], card["network"]
    return "\n".join([
        f"# Baseline: deterministic MONAI UNet ({', '.join(card['organs'])})", "",
        f"`{n['class']}` (2D, {card['parameters']:,} parameters, {n['in_channels']} input channels: the slice and its "
        f"neighbours{' and the body-axis coordinate' if n.get('anatomical_guidance') else ''}; one sigmoid output per organ), "
        "trained on the same slices, augmentation and number of optimisation steps as the diffusion model it is compared with.",
        "", "## Training", "",
        f"- Command: `{t['command']}`", f"- Data: `{t['dataset']}`, cases {', '.join(t['cases'])}",
        f"- {t['steps']} steps, batch {t['batch_size']}, lr {t['lr']}; wall time {t['seconds'] / 60:.1f} min on the CPU",
        f"- Held out from training (world z, mm): {json.dumps(t['holdout_z_mm'])}",
        *([f"- Held out from training, whole cases: {', '.join(t['holdout_cases'])}"] if t.get("holdout_cases") else []), "",
        "Measured numbers: the `baseline UNet` column of `progidiff evaluate` (it finds this folder beside the model "
        "as `<model>-baseline-unet`).", ""])


def find_baseline(model_dir: Path) -> Path | None:
    """The baseline trained beside a model (``<model>-baseline-unet``), if there is one."""
    cand = model_dir.parent / f"{model_dir.name}{BASELINE_SUFFIX}"
    return cand if (cand / BASELINE_CARD).is_file() else None


class Baseline:
    """A loaded baseline UNet: ``segment(scan, organ)`` → mask on the scan's grid."""

    def __init__(self, folder: str | Path, device: torch.device | str = "cpu") -> None:
        d = Path(folder)
        if not (d / BASELINE_CARD).is_file() or not (d / BASELINE_WEIGHTS).is_file():
            raise ModelError(f"{d}: not a baseline folder (no {BASELINE_CARD} / {BASELINE_WEIGHTS}); "
                             "make one with `progidiff train DATASET --baseline unet -o DIR`.")
        self.folder = d
        self.card = json.loads((d / BASELINE_CARD).read_text(encoding="utf-8"))
        want = self.card.get("sha256", {}).get(BASELINE_WEIGHTS)
        if want and sha256(d / BASELINE_WEIGHTS) != want:
            raise ModelError(f"{d / BASELINE_WEIGHTS}: its sha256 does not match the card; copy the folder again.")
        net_cfg = self.card["network"]
        self.organs = list(self.card["organs"])
        self.net = build_unet(net_cfg["in_channels"], len(self.organs), net_cfg["channels"])
        self.net.load_state_dict(load_file(str(d / BASELINE_WEIGHTS)))
        self.device = torch.device(device)
        self.net.to(self.device).eval()
        g = self.card["grid"]
        self.grid = GridSpec(tuple(g["spacing_mm"]), tuple(g["size"]))
        self.context = int(g["context"])
        self.guidance = bool(net_cfg.get("anatomical_guidance", False))
        self._last: tuple | None = None  # (scan image, modality, model grid, probabilities) of the last scan

    def _probabilities(self, scan: Scan, modality: str) -> tuple:
        """Model grid and every organ's probabilities (O, Z, H, W) for the scan. One forward pass
        gives all organs, so the result of the last scan is kept: evaluate asks for each organ in
        turn, and resampling the scan again per organ cost about 0.3 s each."""
        if self._last is not None and self._last[0] is scan.image and self._last[1] == modality:
            return self._last[2], self._last[3]
        # A wide body gets a wider window, as the diffusion model's (3 halvings: steps of 8 px).
        ref, vol = on_model_grid(scan.image, self.grid, modality, fit_body=2 ** (len(self.card["network"]["channels"]) - 1))
        stack = torch.as_tensor(context_slices(vol, self.context))
        if self.guidance:
            c = torch.as_tensor(body_axis_coords(vol)).reshape(-1, 1, 1, 1).expand(len(vol), 1, *vol.shape[1:])
            stack = torch.cat([stack, c], 1)
        idx = body_slices(vol)
        probs = np.zeros((len(self.organs),) + vol.shape, np.float32)
        with torch.inference_mode():
            for i in range(0, len(idx), 64):
                sel = idx[i:i + 64]
                probs[:, sel] = torch.sigmoid(self.net(stack[sel].to(self.device))).float().cpu().numpy().transpose(1, 0, 2, 3)
        self._last = (scan.image, modality, ref, probs)
        return ref, probs

    def segment(self, scan: Scan, organ: str, modality: str = "auto", keep_largest: bool = True) -> np.ndarray:
        """Binary mask (array order of the scan) of ``organ`` (a vocabulary name)."""
        if organ not in self.organs:
            raise InputError(f"The baseline was not trained for {organ}; it knows {', '.join(self.organs)}.")
        mod = guess_modality(scan)[0] if modality == "auto" else modality
        ref, probs = self._probabilities(scan, mod)
        prob = probs[self.organs.index(organ)]
        if keep_largest:
            from .engine import _keep_largest

            prob = _keep_largest(prob[None], prob[None] > 0.5)[0][0]
        return from_model_grid(prob, ref, scan.image)
