"""Two-stage training with HF accelerate (CPU, one GPU, or ``accelerate launch`` on many).

Stage 1 trains the base UNet as a text-conditioned mask prior (skipped with a Stable
Diffusion backbone, whose base is pre-trained). Stage 2 trains the ControlNet branch and
the custom image encoder with the base frozen. Both regress x0 (``prediction_type='sample'``),
which lets few-step samplers (DPM-Solver++) give sharp masks.
"""
from __future__ import annotations

import csv
import logging
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from . import checkpoints
from .configs import DEFAULT_ORGANS, TrainConfig  # noqa: F401 (re-exported: progidiff.train.TrainConfig)
from .data import PreparedCase, SliceDataset, prepare_case, unseen_organ_ends, untrainable_organs
from .datasets import cases_in_split, read_dataset
from .errors import InputError
from .interrupts import StopRequest, ignore_interrupts_in_worker
from .label_names import dataset_organs, log_lesions_counted
from .model import WEIGHTS_NAME, ProGiDiffModel, small_unet_config
from .outputs import check_output_dir
from .prompts import TextEncoder, Vocabulary
from .volume import GridSpec

log = logging.getLogger(__name__)

def split_cases(cfg: TrainConfig, names: Sequence[str]) -> tuple[list[str], list[str]]:
    """(training case names, held-out case names) among the dataset's labelled cases."""
    if cfg.holdout_case_names is not None and cfg.holdout_cases:
        raise InputError("Give --holdout-cases or --holdout-like, not both: --holdout-like brings its card's held-out cases.")
    if cfg.holdout_case_names is not None:
        missing = [n for n in cfg.holdout_case_names if n not in names]
        if missing:
            raise InputError(f"{cfg.dataset}: the held-out case(s) {', '.join(missing)} of the card given to "
                             "--holdout-like are not in this dataset; give the dataset that model was trained on.")
        held = sorted(cfg.holdout_case_names)
    else:
        if cfg.holdout_cases < 0:
            raise InputError(f"--holdout-cases must be 0 or more, got {cfg.holdout_cases}.")
        if cfg.holdout_cases and cfg.holdout_cases >= len(names):
            raise InputError(f"{cfg.dataset}: --holdout-cases {cfg.holdout_cases} leaves nothing to train on (it has "
                             f"{len(names)} labelled case(s)); hold out fewer.")
        held = sorted(np.random.default_rng(cfg.seed).choice(sorted(names), cfg.holdout_cases, replace=False).tolist()) \
            if cfg.holdout_cases else []
    return [n for n in names if n not in held], held


def organs_to_train(cfg: TrainConfig, labels: dict[str, int], vocab: Vocabulary) -> tuple[str, ...]:
    """``cfg.organs``, each named by a label of the dataset; by default every default organ the labels name.
    A model card must not claim an organ its model never saw."""
    named = dataset_organs(labels, vocab)
    if cfg.organs is None:
        organs = tuple(o for o in DEFAULT_ORGANS if o in named)
        if not organs:
            raise InputError(f"{cfg.dataset}: dataset.json's labels ({', '.join(labels)}) name none of the organs ProGiDiff "
                             f"learns ({', '.join(DEFAULT_ORGANS)}); rename them in dataset.json.")
        log.info("organs: %s (those the dataset's labels name)", ", ".join(organs))
        return organs
    missing = [o for o in cfg.organs if o not in named]
    if missing:
        raise InputError(f"{cfg.dataset}: dataset.json has no label for {', '.join(missing)} (its labels: "
                         f"{', '.join(labels)}); leave {'it' if len(missing) == 1 else 'them'} out of --organs.")
    return tuple(cfg.organs)


def holdout_slabs(cases: list[PreparedCase], organs: Sequence[str], fraction: float) -> dict[str, list[tuple[float, float]]]:
    """A contiguous slab per case, ``fraction`` of the organs' joint z-extent, centred on it."""
    out: dict[str, tuple[float, float]] = {}
    if fraction <= 0:
        return out
    for c in cases:
        present = [c.masks[o].reshape(len(c.z_world), -1).any(1) for o in organs if o in c.masks]
        if not present:
            continue
        zs = c.z_world[np.any(present, axis=0)]
        lo, hi = float(zs.min()), float(zs.max())
        mid, half = (lo + hi) / 2, (hi - lo) * fraction / 2
        out[c.name] = [(mid - half, mid + half)]
    return out


def phrase_table(encoder: TextEncoder, vocab: Vocabulary, organs: Sequence[str]) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Conditioning of every organ's display name (index 0) and synonyms: token states
    (O, P, L, D) and pooled embeddings (O, P, D), plus the phrase counts."""
    per = [[vocab[o].display] + [p for p in vocab[o].phrases if p != vocab[o].display] for o in organs]
    pmax = max(len(p) for p in per)
    table = torch.zeros(len(organs), pmax, encoder.max_length, encoder.hidden_size)
    pooled = torch.zeros(len(organs), pmax, encoder.hidden_size)
    for i, phrases in enumerate(per):
        table[i, : len(phrases)], pooled[i, : len(phrases)] = encoder.conditioning(phrases)
    return (table, pooled), torch.tensor([len(p) for p in per])


def build_model(cfg: TrainConfig, text_hidden: int) -> ProGiDiffModel:
    if cfg.base_model:
        return ProGiDiffModel.from_stable_diffusion(cfg.base_model, grid_size=(cfg.grid_size, cfg.grid_size),
                                                    image_channels=2 * cfg.context + 1,
                                                    grid_spacing=tuple(cfg.grid_spacing), context=cfg.context,
                                                    encoder_channels=tuple(cfg.encoder_channels))
    unet_cfg = small_unet_config(sample_size=cfg.grid_size, cross_attention_dim=text_hidden, channels=tuple(cfg.channels))
    # Self-attention only at the two coarsest levels: at 64x64 it cost 2.7x the time per
    # slice for no measured gain (measured: 43.6 vs 16.3 ms/slice on 2 CPU cores).
    n = len(cfg.channels)
    unet_cfg["down_block_types"] = ["DownBlock2D" if i < n - 2 else "CrossAttnDownBlock2D" for i in range(n)]
    unet_cfg["up_block_types"] = list(reversed(unet_cfg["down_block_types"]))
    unet_cfg["up_block_types"] = [b.replace("Down", "Up") for b in unet_cfg["up_block_types"]]
    return ProGiDiffModel(unet_config=unet_cfg, image_channels=2 * cfg.context + 1,
                          encoder_channels=tuple(cfg.encoder_channels),
                          grid_spacing=tuple(cfg.grid_spacing), grid_size=(cfg.grid_size, cfg.grid_size),
                          context=cfg.context, anatomical_guidance=cfg.anatomical_guidance)


def _collate_text(batch: dict, table: tuple[torch.Tensor, torch.Tensor], counts: torch.Tensor,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    # On the CPU, beside the table and the generator: accelerate's loader hands the batch over on
    # the GPU, where indexing the CPU table failed on the first step (seen on an H100).
    organ, phrase = batch["organ"].cpu(), batch["phrase"].cpu()
    # Half the time the display name, else a random synonym: the encoder's states for
    # "hepatic" and "Liver" both have to steer the model.
    pick = phrase % counts[organ]
    use_display = torch.rand(len(organ), generator=generator) < 0.5
    pick = torch.where(use_display, torch.zeros_like(pick), pick)
    return table[0][organ, pick], table[1][organ, pick]


def mask_dice_loss(kind: str = "both") -> torch.nn.Module:
    """The Dice term added to the x0 MSE (which alone barely sees a small organ: a 9-pixel aorta
    is 0.2 % of a 64x64 slice). "sample": per slice with smoothing 1, so that an organ-free slice
    scores 0 only when the prediction is empty and a few false pixels cost as much as a missed
    small organ; "batch": one Dice over the batch (the earlier default; ct-v3 was trained with it, and
    kept its liver, spleen and kidneys better than the per-slice run ct-v4 did: see the README);
    "both" (the default): their sum, the batch term for the large organs' outlines, the per-slice
    term so that the vessels are learned at all. Same command otherwise, "both" (ct-v6) against
    "sample" (ct-v4) raised held-out liver Dice 0.775 -> 0.827, spleen 0.661 -> 0.764 and
    gallbladder 0.339 -> 0.617 and kept aorta/IVC (0.875/0.846 against 0.905/0.848)."""
    from monai.losses import DiceLoss

    per_slice = DiceLoss(batch=False, smooth_nr=1.0, smooth_dr=1.0)
    per_batch = DiceLoss(batch=True)
    if kind == "sample":
        return per_slice
    if kind == "batch":
        return per_batch
    if kind == "both":
        return _SummedLoss(per_batch, per_slice)
    raise InputError(f"--dice-loss must be sample, batch or both, got {kind!r}.")


class _SummedLoss(torch.nn.Module):
    """Sum of losses on the same (input, target). MONAI has no loss combinator for two reductions
    of one loss (DiceCELoss and friends pair Dice with a cross-entropy), hence this."""

    def __init__(self, *losses: torch.nn.Module) -> None:
        super().__init__()
        self.losses = torch.nn.ModuleList(losses)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sum(loss(input, target) for loss in self.losses)


def check_config(cfg: TrainConfig, vocab: Vocabulary) -> None:
    """Refuse, in one line and before any work, settings that cannot train a model; name ``--organs`` as the
    vocabulary does ("left kidney" -> kidney_left), each once."""
    if cfg.organs is not None:
        found = [vocab.organ_for_label_name(o) for o in cfg.organs]
        unknown = [o for o, f in zip(cfg.organs, found) if f is None]
        if unknown:
            raise InputError(f"Unknown organ(s) {', '.join(unknown)}; the vocabulary has {', '.join(vocab.names())}.")
        cfg.organs = tuple(dict.fromkeys(f.name for f in found))
    if cfg.init_from and cfg.baseline:
        raise InputError("--init-from fine-tunes a ProGiDiff model; the --baseline UNet always trains from scratch.")
    if cfg.init_from and cfg.base_model:
        raise InputError("Give --init-from or --base-model, not both: --init-from already has its backbone.")
    if cfg.base_model and not Path(cfg.base_model).is_dir():
        raise InputError(f"--base-model {cfg.base_model}: no such folder (a local Stable Diffusion folder: unet/, "
                         "text_encoder/, tokenizer/, ...).")
    if cfg.stage1_steps < 0 or cfg.stage2_steps < 0:
        raise InputError(f"--stage1-steps and --stage2-steps count steps, 0 or more; got {cfg.stage1_steps} and "
                         f"{cfg.stage2_steps}.")
    if cfg.baseline and cfg.stage1_steps + cfg.stage2_steps == 0:
        raise InputError("The --baseline UNet trains for --stage1-steps + --stage2-steps steps; both are 0.")
    if not cfg.baseline and not cfg.init_from and cfg.stage2_steps == 0:
        # stage 2 trains the branch that reads the image: without it the model would ignore the scan. With
        # --init-from, 0 steps copies the model (on the dataset's organs), which is allowed.
        raise InputError("--stage2-steps 0 would save a model that never learned to read the scan; give 1 or more "
                         "(0 only with --init-from).")
    if not cfg.lr > 0:
        raise InputError(f"--lr must be above 0; got {cfg.lr:g}.")
    if not 0.0 <= cfg.holdout_fraction < 1.0:
        raise InputError(f"--holdout-fraction is the share of each case's organ extent kept out of training, 0 to "
                         f"under 1; got {cfg.holdout_fraction:g}.")
    for flag, share in (("--contrast-phase", cfg.contrast_phase), ("--fatty-liver", cfg.fatty_liver),
                        ("--liver-lesions", cfg.liver_lesions)):
        if not 0.0 <= share <= 1.0:
            raise InputError(f"{flag} is a share of the slices, 0 to 1; got {share:g}.")
    lo, hi = cfg.body_scale
    if not 0.2 <= lo <= hi <= 5.0:
        raise InputError(f"--body-scale MIN MAX needs 0.2 <= MIN <= MAX <= 5 (times as large), got {lo:g} {hi:g}.")


def make_accelerator(cfg: TrainConfig):
    """The run's ``accelerate.Accelerator``. Our learning-rate schedules count each process's own
    steps, so the scheduler steps once per optimizer step: accelerate's default steps it once per
    process, which under ``accelerate launch --num_processes 2`` ran the cosine twice as fast and
    then back up (measured on a 4-step stage: lr 1.5e-4, 0, 1.5e-4, 3e-4 instead of falling to 0).
    Without --mixed-precision the precision is accelerate's: an explicit "no" here silently
    overrode ``accelerate launch --mixed_precision bf16``. The precision the run uses goes back
    into ``cfg``, so that the card and the checkpoints (whose --resume compares it) record it."""
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, step_scheduler_with_optimizer=False)
    cfg.mixed_precision = str(accelerator.mixed_precision)
    return accelerator


def train(cfg: TrainConfig, progress: bool = True,
          on_step: Callable[[int, int, float], None] | None = None, stop: StopRequest | None = None) -> Path:
    """Train a model into ``cfg.output``; returns the folder of the saved model. ``stop`` (set by
    :func:`progidiff.interrupts.stop_on_signals`) ends the run at a step's end with a checkpoint,
    raising KeyboardInterrupt."""
    from accelerate.utils import set_seed
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_cosine_schedule_with_warmup

    out = Path(cfg.output)
    check_output_dir(out, overwrite=True)  # a file or an unwritable place: refused before hours of work
    accelerator = make_accelerator(cfg)
    set_seed(cfg.seed)
    vocab = Vocabulary.load()
    check_config(cfg, vocab)
    init_card = None
    info = read_dataset(cfg.dataset)
    cfg.organs = organs_to_train(cfg, info.labels, vocab)
    log_lesions_counted(info.labels, vocab)
    # Before the grid: a model to fine-tune brings its own grid.
    init = _load_init(cfg) if cfg.init_from else None
    grid = GridSpec(tuple(cfg.grid_spacing), (cfg.grid_size, cfg.grid_size))
    t0 = time.time()
    labelled = [e for e in info.cases if e.label is not None]
    if not labelled:
        raise InputError(f"{cfg.dataset}: no case has a label file in labelsTr/.")
    labelled = cases_in_split(labelled, cfg.split, cfg.dataset)
    train_names, held_cases = split_cases(cfg, [e.name for e in labelled])
    if held_cases:
        log.info("held out from training: %d whole case(s), %s", len(held_cases), ", ".join(held_cases))
    cases = [prepare_case(e, info.labels, vocab, grid, cfg.organs, cfg.modality or info.modality)
             for e in labelled if e.name in train_names]
    log.info("prepared %d case(s) in %.1fs", len(cases), time.time() - t0)
    slabs = cfg.holdout_z or holdout_slabs(cases, cfg.organs, cfg.holdout_fraction)
    missing = untrainable_organs(cases, cfg.organs, slabs)
    if missing:
        raise InputError(f"{cfg.dataset}: no training slice holds {', '.join(missing)} (an empty label in every case, or "
                         f"one only inside the held-out slab); leave {'it' if len(missing) == 1 else 'them'} out of --organs.")
    if cfg.baseline:
        if cfg.baseline != "unet":
            raise InputError(f"Unknown baseline {cfg.baseline!r}; the one baseline is 'unet'.")
        if cfg.resume:
            raise InputError("--resume continues a diffusion model's run; the --baseline UNet keeps no checkpoints "
                             "(it trains in one go: 12.7 min for the shipped one on 2 CPU cores).")
        from .baseline import train_baseline

        return train_baseline(cfg, cases, slabs, t0, progress=progress, held_cases=held_cases, stop=stop)
    if cfg.stage1_data not in ("masks", "images"):
        raise InputError(f"--stage1-data must be masks or images, got {cfg.stage1_data!r}.")

    if cfg.base_model or init is not None:
        # Stage 1 trains the base, which these bring pre-trained: 0 steps skips it below, and
        # the card does not claim steps that never ran.
        cfg.stage1_steps = 0
    if init is not None:
        model, encoder, init_card = init
    elif cfg.base_model:
        encoder = TextEncoder(Path(cfg.base_model) / "text_encoder", max_length=16,
                              tokenizer_dir=Path(cfg.base_model) / "tokenizer")
        model = build_model(cfg, encoder.hidden_size)
    else:
        encoder = TextEncoder(max_length=8)
        model = build_model(cfg, encoder.hidden_size)
    table, counts = phrase_table(encoder, vocab, cfg.organs)
    # Unlabelled slices carry no organ: stage 1 on images is conditioned on one neutral phrase.
    unlabelled_text = encoder.conditioning([f"axial {cases[0].modality} slice of the abdomen"])
    scheduler = DDPMScheduler(num_train_timesteps=model.config.num_train_timesteps,
                              beta_schedule=model.config.beta_schedule, prediction_type="sample")
    dice = mask_dice_loss(cfg.dice_loss)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / checkpoints.LOG
    state = checkpoints.start(cfg, out, accelerator.num_processes, accelerator.is_main_process)
    accelerator.wait_for_everyone()  # the main process may have cleared or cut the previous run's files
    # One stream per process: the same noise and timesteps on every GPU would make a batch of
    # 8 x 16 slices see 16 timesteps, not 128. Process 0 draws what a one-process run draws.
    gen = torch.Generator().manual_seed(cfg.seed + 7919 * accelerator.process_index)
    if state.step or state.stage > 1:
        checkpoints.load(out, state, model, gen, accelerator.process_index)
    t0 -= state.seconds  # the card's training time counts the time before the resume too

    if stop is not None:
        stop.defer()
    for stage, steps in ((1, cfg.stage1_steps), (2, cfg.stage2_steps)):
        if stage < state.stage or steps <= 0:
            continue
        start = state.step if stage == state.stage else 0
        train_params = list(model.unet.parameters()) if stage == 1 else model.branch_parameters()
        groups = [{"params": train_params, "lr": cfg.lr}]
        if stage == 2 and cfg.finetune_base:
            groups.append({"params": list(model.unet.parameters()), "lr": cfg.lr * cfg.base_lr_scale})
            train_params = train_params + groups[1]["params"]
        for p in model.parameters():
            p.requires_grad_(False)
        for p in train_params:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=1e-4)
        # Unlabelled pre-training must not pick slices by their labels: every body slice alike.
        ds = SliceDataset(cases, cfg.organs, cfg.context, length=steps * cfg.batch_size * accelerator.num_processes,
                          seed=cfg.seed * 1000 + stage, exclude_z=slabs,
                          positive_fraction=0.0 if stage == 1 and cfg.stage1_data == "images" else 0.75,
                          body_scale=tuple(cfg.body_scale), contrast_phase=cfg.contrast_phase,
                          fatty_liver=cfg.fatty_liver, liver_lesions=cfg.liver_lesions)
        # A resumed stage goes on with the items after the ones it trained on (item i is fixed by (seed, i)).
        todo = range(start * cfg.batch_size * accelerator.num_processes, len(ds))
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(ds, todo), batch_size=cfg.batch_size, num_workers=cfg.workers,
            worker_init_fn=ignore_interrupts_in_worker, persistent_workers=False)
        resumed = start > 0 and checkpoints.load_optimizer(out, state, stage, optimizer)
        # A resumed schedule starts at the step it stopped at (the loaded optimizer has its initial_lr).
        lr_sched = get_cosine_schedule_with_warmup(optimizer, min(100, steps // 10), steps,
                                                   last_epoch=start - 1 if resumed else -1)
        pmodel, optimizer, loader, lr_sched = accelerator.prepare(model, optimizer, loader, lr_sched)
        pmodel.train()
        bar = tqdm(total=steps, initial=start, desc=f"stage {stage}", disable=not (progress and accelerator.is_main_process),
                   dynamic_ncols=True)
        step = start
        # One log, the main process's: the others write theirs to nowhere (two "a" handles on one
        # file wrote the header twice under accelerate launch).
        # The bar closes before an error or a stop is reported, not after the command's last line.
        with bar, open(log_path if accelerator.is_main_process else os.devnull, "a", newline="", encoding="utf-8") as logf:
            writer = csv.writer(logf)
            if logf.tell() == 0:
                writer.writerow(["stage", "step", "loss", "mse", "dice", "lr", "seconds"])
            for batch in loader:
                label = batch["label"]
                unlabelled = stage == 1 and cfg.stage1_data == "images"
                if unlabelled:
                    # The centre slice in [-1, 1] as the "mask" to denoise: the base learns the
                    # scans' own structure without any label (the same range as encode_mask).
                    c = batch["image"].shape[1] // 2
                    x0 = batch["image"][:, c:c + 1] * 2 - 1
                    n = x0.shape[0]
                    text = (unlabelled_text[0].expand(n, -1, -1).to(x0.device), unlabelled_text[1].expand(n, -1).to(x0.device))
                else:
                    with torch.no_grad():
                        x0 = accelerator.unwrap_model(pmodel).encode_mask(label)
                    text = tuple(v.to(x0.device) for v in _collate_text(batch, table, counts, gen))
                noise = torch.randn(x0.shape, generator=gen).to(x0.device)
                u = torch.rand(x0.shape[0], generator=gen) ** cfg.high_noise_power
                t = (u * (scheduler.config.num_train_timesteps - 1)).round().long().to(x0.device)
                x_t = scheduler.add_noise(x0, noise, t)
                with accelerator.autocast():
                    pred = pmodel(x_t, t, text, batch["image"] if stage == 2 else None, batch["coord"])
                mse = torch.nn.functional.mse_loss(pred.float(), x0)
                if model.vae is None and not unlabelled:
                    dl = dice(((pred.float().clamp(-1, 1) + 1) / 2), label)
                else:
                    dl = torch.zeros((), device=mse.device)
                loss = mse + dl
                accelerator.backward(loss)
                accelerator.clip_grad_norm_(train_params, 1.0)
                optimizer.step()
                lr_sched.step()
                optimizer.zero_grad()
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}")
                if accelerator.is_main_process:
                    writer.writerow([stage, step, f"{loss.item():.5f}", f"{mse.item():.5f}", f"{dl.item():.5f}",
                                     f"{lr_sched.get_last_lr()[0]:.2e}", f"{time.time() - t0:.1f}"])
                    if step % 50 == 0:
                        logf.flush()
                if on_step is not None:
                    on_step(stage, step, float(loss.item()))
                # The last step's checkpoint is the stage's, below.
                halt = step < steps and stop_requested(accelerator, stop)
                if step < steps and (step % cfg.checkpoint_every == 0 or halt):
                    logf.flush()
                    checkpoints.save(accelerator, out, cfg, accelerator.unwrap_model(pmodel), optimizer, gen,
                                     stage, step, time.time() - t0, state.resumed_at)
                if halt:
                    raise KeyboardInterrupt
        model = accelerator.unwrap_model(pmodel)
        checkpoints.save(accelerator, out, cfg, model, None, gen, stage + 1, 0, time.time() - t0, state.resumed_at)
        if stage == 1 and cfg.stage2_steps > 0 and stop_requested(accelerator, stop):
            raise KeyboardInterrupt  # between the stages; a stop during the last one still saves the model

    seconds = time.time() - t0
    if accelerator.is_main_process:
        card = {
            "name": out.name, "modality": cases[0].modality, "organs": list(cfg.organs),
            "vocabulary": vocab.subset(cfg.organs).to_dict(),
            "grid": {"spacing_mm": list(cfg.grid_spacing), "size": [cfg.grid_size, cfg.grid_size], "context": cfg.context},
            "training": {"command": cfg.command, "dataset": str(cfg.dataset), "cases": [c.name for c in cases],
                         "seconds": round(seconds, 1), "processes": accelerator.num_processes,
                         "device": str(accelerator.device), "config": {k: v for k, v in asdict(cfg).items() if k not in ("extra",)},
                         "holdout_z_mm": {k: [[round(a, 2), round(b, 2)] for a, b in v] for k, v in slabs.items()},
                         "holdout_cases": held_cases,
                         "unseen_organ_ends": unseen_organ_ends(cases, cfg.organs, slabs)},
        }
        if state.resumed_at:
            card["training"]["resumed_at_stage_step"] = state.resumed_at
        if init_card is not None:
            card["training"]["init_from"] = init_record(init_card)
        model.save_pretrained(out, card=card)
        from .card import write_markdown

        write_markdown(out)
        shutil.rmtree(checkpoints.folder(out), ignore_errors=True)
        log.info("saved model to %s after %.0fs", out, seconds)
    accelerator.wait_for_everyone()
    return out


def stop_requested(accelerator, stop: StopRequest | None) -> bool:
    """Whether to stop after this step. With several processes a signal may reach them a step
    apart, and a checkpoint needs them all at one step: any process's request stops all (a
    one-number all-reduce per step, beside the step's gradient all-reduce)."""
    if stop is None:
        return False
    if accelerator.num_processes == 1:
        return stop.is_set()
    flag = torch.tensor([1.0 if stop.is_set() else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def init_record(init_card: dict) -> dict:
    """What a fine-tuned model's card says of the model it started from: its real cost is the
    whole chain, so the seconds, steps and commands of every model before it, in the order they ran."""
    it = init_card.get("training", {})
    ic = it.get("config", {})
    prior = it.get("init_from", {})
    earlier = prior.get("commands", [prior["command"]] if prior.get("command") else [])
    return {"model": init_card.get("name"), "command": it.get("command"), "commands": earlier + [it.get("command")],
            "sha256": init_card.get("sha256", {}).get(WEIGHTS_NAME),
            "seconds": (it.get("seconds") or 0) + (prior.get("seconds") or 0),
            "steps": ic.get("stage1_steps", 0) + ic.get("stage2_steps", 0) + prior.get("steps", 0)}


def _load_init(cfg: TrainConfig) -> tuple[ProGiDiffModel, TextEncoder, dict]:
    """The model to fine-tune, its prompt encoder and card; ``cfg`` takes the model's grid so
    that the slices are sampled as it was trained."""
    from .engine import load_text_encoder

    folder = Path(cfg.init_from)
    model = ProGiDiffModel.from_pretrained(folder)
    mc = model.config
    cfg.grid_spacing, cfg.grid_size, cfg.context = tuple(mc.grid_spacing), int(mc.grid_size[0]), int(mc.context)
    cfg.anatomical_guidance = bool(mc.anatomical_guidance)
    log.info("fine-tuning %s: stage 1 skipped, its %d px grid at %s mm kept", folder, cfg.grid_size, cfg.grid_spacing)
    return model, load_text_encoder(model, folder), model.card
