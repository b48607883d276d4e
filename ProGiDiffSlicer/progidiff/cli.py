"""The ``progidiff`` command: segment, train, evaluate (one verb per job, as nnU-Net)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from .errors import Cancelled, ProGiDiffError
from .interrupts import cancel_on_signals

#: Kept equal to engine.DEFAULT_STEPS (a test checks); not imported so that --help stays fast (no torch import).
DEFAULT_STEPS = 4

if TYPE_CHECKING:  # numpy is imported where it is used, so that --help stays fast
    import numpy as np

log = logging.getLogger("progidiff")

EPILOG_SEGMENT = """example:
  progidiff segment scan.nii.gz --prompt liver --proposals 8 -o out/
  progidiff segment dicom_folder/ --prompt "left kidney" --steps 6 --seed 1 -o out/
  accelerate launch -m progidiff.cli segment cohort/ --prompt pancreas -o results/   # cases split over GPUs
REVIEW CAREFULLY: the proposals agree (mean pairwise Dice) below 0.80, or more than 0.03 below the organ's
agreement on the model's training data (its card); report.json's "warnings" lists every warning given
"""
EPILOG_TRAIN = """example:
  progidiff train ../shared/data/ct-abdomen -o my_model --organs liver spleen
  progidiff train ../shared/data/ct-abdomen -o my_model-baseline-unet --baseline unet   # the deterministic baseline
  progidiff train MY_DATASET -o my_model --init-from Resources/Models/progidiff-ct-abdomen --stage2-steps 500 --lr 1e-4
  accelerate launch -m progidiff.cli train DATASET -o MODEL --mixed-precision bf16   # several GPUs
  progidiff train ../shared/data/ct-abdomen -o my_model --organs liver spleen --resume   # go on after Ctrl-C
  progidiff train MY_COHORT -o my_model --holdout-cases 5   # then: progidiff evaluate my_model MY_COHORT -o eval/
  progidiff train Totalsegmentator_dataset_v201 -o my_model --split train   # then: evaluate ... --split test
"""


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def _positive_float(text: str) -> float:
    """A learning rate or a scale of one: above 0 (torch's optimizers raise a ValueError on a negative one)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number")
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return v


def _add_train(sub: argparse._SubParsersAction) -> None:
    from .configs import DEFAULT_ORGANS, TrainConfig

    d = TrainConfig(dataset="", output="")
    p = sub.add_parser("train", help="train a model on an nnU-Net/MSD-style dataset",
                       description="Train a ProGiDiff model (stage 1: base mask prior; stage 2: ControlNet branch + image encoder, base frozen).",
                       epilog=EPILOG_TRAIN, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", help="folder with imagesTr/, labelsTr/ and dataset.json (or that JSON file, if named otherwise)")
    p.add_argument("-o", "--output", required=True, help="model folder to write")
    p.add_argument("--organs", nargs="+", help="organs to learn (vocabulary names; default: those of "
                   f"{', '.join(DEFAULT_ORGANS)} that the dataset's labels name)")
    p.add_argument("--base-model", help="local Stable Diffusion folder to build on (skips stage 1)")
    p.add_argument("--init-from", metavar="MODEL",
                   help="fine-tune this trained ProGiDiff model (e.g. the shipped one) on DATASET instead of starting "
                        "from scratch: stage 1 is skipped, the model's grid and prompt encoder are kept")
    p.add_argument("--stage1-steps", type=int, default=d.stage1_steps)
    p.add_argument("--stage2-steps", type=int, default=d.stage2_steps)
    p.add_argument("--batch-size", type=_positive_int, default=d.batch_size)
    p.add_argument("--lr", type=_positive_float, default=d.lr)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--holdout-fraction", type=float, default=0.0,
                   help="hold out a central slab of this fraction of the organs' extent (for evaluate)")
    p.add_argument("--holdout-cases", type=int, default=0, metavar="N",
                   help="hold out N whole labelled cases (drawn with --seed; recorded in the card), for evaluate to "
                        "score on: a cohort's usual split")
    p.add_argument("--holdout-like", metavar="DIR",
                   help="hold out the same slabs and cases as this model/adapter card (e.g. to train a baseline on the "
                        "same split)")
    p.add_argument("--split", help="only the cases of this split (\"train\"), where the dataset records one: "
                                   "the TotalSegmentator dataset's meta.csv")
    p.add_argument("--modality", choices=["CT", "MR"], help="the dataset's modality (default: from dataset.json)")
    p.add_argument("--finetune-base", action="store_true",
                   help="stage 2 also trains the base UNet (ProGiDiff freezes it; faster convergence on small budgets)")
    p.add_argument("--base-lr-scale", type=_positive_float, default=d.base_lr_scale, help="base UNet lr = lr x this (with --finetune-base)")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"],
                   help="default: accelerate's (`accelerate launch --mixed_precision bf16`, `accelerate config`), "
                        "else no; bf16 on a GPU")
    p.add_argument("--checkpoint-every", type=_positive_int, default=d.checkpoint_every,
                   help=f"steps between checkpoints in OUTPUT/checkpoints (default {d.checkpoint_every}; one is also "
                        "written at the end of each stage)")
    p.add_argument("--resume", action="store_true",
                   help="go on from OUTPUT/checkpoints after Ctrl-C or SIGTERM (either writes a checkpoint of the step "
                        "it stopped at) or a killed job: give the command it was started with; the run ends as if it "
                        "had never stopped")
    p.add_argument("--workers", type=int, default=d.workers, help="data-loading worker processes")
    p.add_argument("--stage1-data", choices=["masks", "images"], default=d.stage1_data,
                   help="stage 1 pre-trains the base on the organ masks (a shape prior, default) or on the unlabelled "
                        "scan slices (diffusion pre-training without labels)")
    p.add_argument("--anatomical-guidance", action="store_true",
                   help="give the model each slice's normalised body-axis position as an extra input")
    p.add_argument("--dice-loss", choices=["sample", "batch", "both"], default=d.dice_loss,
                   help="reduce the mask Dice term per slice (small organs such as the aorta count as much as large "
                        "ones), over the whole batch (how ct-v3 was trained; large organs dominate, vessels are not "
                        "learned) or both, summed (default: learns the vessels and keeps more of the large organs than "
                        "the per-slice Dice alone)")
    p.add_argument("--body-scale", type=float, nargs=2, metavar=("MIN", "MAX"), default=list(d.body_scale),
                   help="body-size augmentation: each training slice's content drawn MIN to MAX times as large "
                        f"(default {d.body_scale[0]:g} {d.body_scale[1]:.3g}; the shipped model's last 600 steps used "
                        "0.6 1.6667, which keeps the spleen on smaller bodies and the stomach on larger ones)")
    p.add_argument("--contrast-phase", type=float, default=d.contrast_phase, metavar="SHARE",
                   help="share of CT training slices (0-1) given a random contrast phase, portal-venous to arterial, "
                        "organ by organ from their labels (default 0; the shipped model's last 600 steps used 0.5: a "
                        "model trained on unenhanced scans only finds no aorta or IVC on enhanced ones)")
    p.add_argument("--fatty-liver", type=float, default=d.fatty_liver, metavar="SHARE",
                   help="share of CT training slices (0-1) whose liver is made fatty, 10 to 60 HU darker, from "
                        "their labels (default 0): steatosis, in about a quarter of adults, takes an unenhanced "
                        "liver under the spleen")
    p.add_argument("--liver-lesions", type=float, default=d.liver_lesions, metavar="SHARE",
                   help="share of CT training slices (0-1) given 1 to 6 round liver lesions, 8-40 mm across and 20 "
                        "to 80 HU darker than the liver, from their labels (default 0): metastases, which the shipped "
                        "model cuts the liver along")
    p.add_argument("--baseline", choices=["unet"],
                   help="train the deterministic MONAI UNet baseline instead (same data, transforms and budget); "
                        "name its folder MODEL-baseline-unet so that evaluate finds it beside MODEL")


def _holdout_from(folder: str) -> dict:
    from .evaluate import holdout_of

    return holdout_of(Path(folder))


def _held_out_cases_from(folder: str) -> tuple[str, ...]:
    from .evaluate import held_out_cases_of

    return tuple(held_out_cases_of(Path(folder)))


def _run_train(a: argparse.Namespace, argv: Sequence[str]) -> int:
    from . import checkpoints
    from .train import TrainConfig, train

    cfg = TrainConfig(dataset=a.dataset, output=a.output, organs=tuple(a.organs) if a.organs else None, base_model=a.base_model,
                      stage1_steps=a.stage1_steps, stage2_steps=a.stage2_steps, batch_size=a.batch_size,
                      lr=a.lr, seed=a.seed, holdout_fraction=a.holdout_fraction,
                      mixed_precision=a.mixed_precision, checkpoint_every=a.checkpoint_every,
                      resume=a.resume, workers=a.workers, command="progidiff " + shlex.join(argv),
                      modality=a.modality, finetune_base=a.finetune_base, base_lr_scale=a.base_lr_scale,
                      holdout_z=_holdout_from(a.holdout_like) if a.holdout_like else None,
                      holdout_cases=a.holdout_cases, split=a.split,
                      holdout_case_names=_held_out_cases_from(a.holdout_like) if a.holdout_like else None,
                      stage1_data=a.stage1_data, anatomical_guidance=a.anatomical_guidance, baseline=a.baseline,
                      dice_loss=a.dice_loss, init_from=a.init_from, body_scale=tuple(a.body_scale),
                      contrast_phase=a.contrast_phase, fatty_liver=a.fatty_liver,
                      liver_lesions=a.liver_lesions)
    from accelerate import PartialState  # the state train() sets up: under accelerate launch, say things once

    from .interrupts import stop_on_signals

    try:
        # Ctrl-C or SIGTERM: the step ends, a checkpoint is written, then KeyboardInterrupt.
        with stop_on_signals() as stop:
            out = train(cfg, stop=stop)
    except KeyboardInterrupt:
        if not PartialState().is_main_process:
            return 130
        ckpt = checkpoints.folder(Path(cfg.output))
        if cfg.baseline:
            where = "the baseline keeps no checkpoints, so nothing was saved"
        elif (ckpt / checkpoints.STATE).is_file():
            at = json.loads((ckpt / checkpoints.STATE).read_text(encoding="utf-8"))
            after = (f"stage {at['stage']}, step {at['step']}" if at["step"] else f"the end of stage {at['stage'] - 1}")
            where = f"its last checkpoint, after {after}, is in {ckpt}: run the same command with --resume to go on"
        else:
            where = "it stopped before its first checkpoint, so nothing was saved"
        print(f"progidiff: training stopped; {where}.", file=sys.stderr)
        return 130
    if PartialState().is_main_process:
        print(f"model saved to {out}")
    return 0


def _add_segment(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("segment", help="write N mask proposals for an organ prompt",
                       description="Segment an organ named by a text prompt: writes proposal_NN.nii.gz (best first), "
                                   "consensus.nii.gz, uncertainty.nii.gz, proposals.seg.nrrd, overview.png and report.json.",
                       epilog=EPILOG_SEGMENT, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="NIfTI/NRRD/MHA files, DICOM folders, or folders of them (or of a folder "
                                              "per patient holding one scan file)")
    p.add_argument("-p", "--prompt", required=True, help="the organ, e.g. liver, 'left kidney', hepatic, IVC")
    p.add_argument("-n", "--proposals", type=int, default=8, help="number of proposals N (default 8)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"denoising steps (default {DEFAULT_STEPS})")
    p.add_argument("--scheduler", default="dpm++", help="dpm++ (default) or ddim")
    p.add_argument("--seed", type=int, default=0, help="seed of the first proposal; proposal k uses seed+k")
    p.add_argument("--modality", default="auto", choices=["auto", "CT", "MR"])
    p.add_argument("--model", help="model folder (default: the shipped CT model)")
    p.add_argument("--adapter", default="auto",
                   help="LoRA adapter folder, 'auto' (the one for the input's modality beside the model) or 'none'")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--batch-size", type=_positive_int, help="slices per model call (default: from the device)")
    p.add_argument("--series", help="DICOM SeriesInstanceUID when a folder holds several series")
    p.add_argument("--no-prepass", action="store_true",
                   help="sample every body slice instead of locating the organ's slab first")
    p.add_argument("--overwrite", action="store_true", help="replace results already in the output folder")
    p.add_argument("-o", "--output", required=True, help="output folder (one subfolder per case for several inputs)")


def _adapter_arg(value: str | None) -> str | None:
    return None if value in (None, "none", "None") else value


def _run_segment(a: argparse.Namespace, argv: Sequence[str]) -> int:
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from .engine import Engine, SegmentOptions
    from .segment import segment_file
    from .volume import case_names, find_inputs

    opts = SegmentOptions(proposals=a.proposals, steps=a.steps, scheduler=a.scheduler, seed=a.seed,
                          modality=a.modality, batch_size=a.batch_size, prepass=not a.no_prepass)
    opts.validate()
    inputs = find_inputs(a.inputs)
    out = Path(a.output)
    rank, world, device = 0, 1, a.device
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Under `accelerate launch`, each process takes every world-th case on its own device.
        from accelerate import PartialState

        state = PartialState()
        rank, world = state.process_index, state.num_processes
        device = str(state.device.type) if a.device == "auto" else a.device
    jobs = [(p, out if len(inputs) == 1 else out / name, name) for p, name in zip(inputs, case_names(inputs))][rank::world]
    from .outputs import check_output_dir
    for _, o, _ in jobs:
        check_output_dir(o, a.overwrite)
    # Log lines (the modality guessed, warnings) go through tqdm.write while a bar is drawn, so that they
    # neither break the bar nor are written into it.
    with cancel_on_signals() as cancel, logging_redirect_tqdm():
        engine = Engine(a.model, device=device, adapter=_adapter_arg(a.adapter))
        engine.resolve(a.prompt)
        failed, failed_names = 0, []
        for path, o, name in jobs:
            bar = tqdm(total=1, desc=f"{name}: {a.prompt}", unit="eval", dynamic_ncols=True, leave=True)

            def progress(stage: str, done: int, total: int, _case=name) -> None:
                bar.set_description(f"{_case}: {stage}", refresh=False)
                bar.total = total
                bar.n = done
                bar.refresh()

            try:
                report = segment_file(engine, path, a.prompt, o, opts, overwrite=a.overwrite, progress=progress,
                                      series=a.series, cancel=cancel)
            except ProGiDiffError as exc:
                if len(jobs) == 1 or isinstance(exc, Cancelled):
                    raise
                # In a cohort one bad case must not stop the others: report it, on its own line, and go on.
                bar.close()
                print(f"progidiff: error: {exc}", file=sys.stderr)
                failed = max(failed, exc.exit_code)
                failed_names.append(name)
                continue
            finally:
                bar.close()
            vol, dia = report["volume_ml"], report["diameter_mm"]
            print(f"{name}: {report['organ_display']} · {len(report['proposals'])} proposals · agreement "
                  f"{report['agreement']:.2f} · volume {vol['min']:.0f}/{vol['median']:.0f}/{vol['max']:.0f} mL, largest "
                  f"diameter {dia['min']:.0f}/{dia['median']:.0f}/{dia['max']:.0f} mm (min/median/max)"
                  f" · {report['seconds']:.1f}s{' · REVIEW CAREFULLY' if report['review'] else ''}\n  -> {o}/ (overview: {o / 'overview.png'})")
            for w in report["warnings"]:
                log.warning(w["text"])
        if failed:
            print(f"progidiff: {len(failed_names)} of {len(jobs)} cases failed ({', '.join(failed_names)}: see above); "
                  "the others are complete.", file=sys.stderr)
        return failed


EPILOG_REFINE = """example:
  progidiff refine scan.nii.gz --prompt liver --mask edited.nii.gz --keep changed.nii.gz --proposals 8 -o refined/
  (edited: your corrected mask; keep: the voxels to keep exactly, e.g. those you changed)
"""


def _add_refine(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("refine", help="re-sample proposals around an expert's edited mask",
                       description="Start from an edited mask, keep the KEEP voxels exactly, and re-generate the rest "
                                   "(partially noised by --strength). Same outputs as segment.",
                       epilog=EPILOG_REFINE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="the scan (file or DICOM folder)")
    p.add_argument("-p", "--prompt", required=True, help="the organ, as given to segment")
    p.add_argument("--mask", required=True, help="the edited mask (0/1 image on the scan's grid)")
    p.add_argument("--keep", required=True, help="voxels to keep exactly (0/1 image on the scan's grid)")
    p.add_argument("-n", "--proposals", type=int, default=8)
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--strength", type=float, default=0.6, help="how much of the edited mask is re-noised (0-1]")
    p.add_argument("--seed", type=int, default=0, help="seed of the first proposal; proposal k uses seed+k")
    p.add_argument("--modality", default="auto", choices=["auto", "CT", "MR"])
    p.add_argument("--model")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("-o", "--output", required=True)


def _read_mask_on(path: str, scan) -> np.ndarray:
    import SimpleITK as sitk

    from .errors import InputError
    from .volume import _first_line

    try:
        m = sitk.ReadImage(path)
    except RuntimeError as exc:
        raise InputError(f"{path}: cannot be read as a mask ({_first_line(exc)}).") from exc
    if m.GetDimension() != 3 or m.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path}: a mask must be a 3D single-component image.")
    import numpy as np

    arr = sitk.GetArrayViewFromImage(m)
    values = np.unique(arr[arr != 0])
    if len(values) > 1:
        # a label map of several segments (Slicer's "export to label map" of them all): their union
        # would be taken for the organ (the sample CT's 61 labels: 2,087 mL for a liver of 1,140)
        shown = ", ".join(f"{v:g}" for v in values[:5]) + (", …" if len(values) > 5 else "")
        raise InputError(f"{path}: holds {len(values)} labels ({shown}), not one mask; give a 0/1 mask of the one "
                         "organ (export that segment alone).")
    # Nearest-neighbour onto the scan's grid (a no-op when the mask was saved from it).
    on_scan = sitk.GetArrayFromImage(sitk.Resample(m, scan.image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)) > 0
    if len(values) and not on_scan.any():
        raise InputError(f"{path}: lies wholly outside the scan; was it drawn on another scan?")
    return on_scan


def _run_refine(a: argparse.Namespace, argv: Sequence[str]) -> int:
    from .engine import Engine, SegmentOptions
    from .outputs import check_output_dir
    from .segment import write_result
    from .volume import read_scan

    opts = SegmentOptions(proposals=a.proposals, steps=a.steps, seed=a.seed, modality=a.modality)
    opts.validate()
    out = Path(a.output)
    check_output_dir(out, a.overwrite)
    scan = read_scan(a.input)
    edited, keep = _read_mask_on(a.mask, scan), _read_mask_on(a.keep, scan)
    with cancel_on_signals() as cancel:
        engine = Engine(a.model, device=a.device)
        result = engine.refine(scan, a.prompt, edited, keep, opts, strength=a.strength, cancel=cancel)
        report = write_result(result, engine, out, a.overwrite, extra={"refined_from": str(a.mask), "kept": str(a.keep),
                                                                       "strength": a.strength})
    vol = report["volume_ml"]
    print(f"{report['organ_display']}: {len(report['proposals'])} refined proposals · agreement {report['agreement']:.2f}"
          f" · volume {vol['min']:.0f}/{vol['median']:.0f}/{vol['max']:.0f} mL -> {out}/")
    return 0


EPILOG_ADAPT = """example:
  progidiff adapt ../shared/data/mr-abdomen --from Resources/Models/progidiff-ct-abdomen --modality MR --shots 10 \\
      -o Resources/Models/progidiff-ct-abdomen-mr-lora
"""


def _add_adapt(sub: argparse._SubParsersAction) -> None:
    from .configs import AdaptConfig

    d = AdaptConfig("", "", "")
    p = sub.add_parser("adapt", help="few-shot LoRA adaptation to a new modality (CT -> MR)",
                       description="Train a LoRA adapter (peft) on the ControlNet branch with K labelled slices of a new "
                                   "modality: the K central slices of each case adapt, the slabs above and below are held out.",
                       epilog=EPILOG_ADAPT, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", help="folder with imagesTr/, labelsTr/, dataset.json (or that JSON file, if named otherwise)")
    p.add_argument("--from", dest="base", required=True, help="the model to adapt")
    p.add_argument("--modality", default="MR", choices=["CT", "MR"])
    p.add_argument("--shots", type=_positive_int, default=d.shots, help="labelled slices to adapt on (default 10)")
    p.add_argument("--rank", type=_positive_int, default=d.rank, help="LoRA rank (default 8)")
    p.add_argument("--steps", type=_positive_int, default=d.steps)
    p.add_argument("--batch-size", type=_positive_int, default=d.batch_size)
    p.add_argument("--lr", type=_positive_float, default=d.lr)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--include-base", action="store_true", help="also adapt the base UNet's attention")
    p.add_argument("--no-bias-field", action="store_true", help="switch off bias-field augmentation")
    p.add_argument("-o", "--output", required=True)


def _run_adapt(a: argparse.Namespace, argv: Sequence[str]) -> int:
    from .adapt import AdaptConfig, adapt

    # SIGTERM as Ctrl-C: the adapter is written through a staging folder, so nothing half-written stays.
    with cancel_on_signals():
        out = adapt(AdaptConfig(dataset=a.dataset, base=a.base, output=a.output, modality=a.modality, shots=a.shots,
                                rank=a.rank, steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed,
                                include_base=a.include_base, bias_field=not a.no_bias_field,
                                command="progidiff " + shlex.join(argv)))
    print(f"adapter saved to {out}")
    return 0


EPILOG_BENCH = """example:
  progidiff bench --device cpu --quality ../shared/data/ct-abdomen --out docs/benchmarks.md --json bench.json
"""


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure speed and memory on the shipped sample CT",
                       description="Denoiser throughput and fraction of the device's matmul rate, end-to-end segment "
                                   "time for N = 1, 4, 8, 16, the naive way, peak memory; writes a Markdown table and a plot.",
                       epilog=EPILOG_BENCH, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--model")
    p.add_argument("--quality", metavar="DATASET", help="also measure Dice against steps on this dataset's held-out slab")
    p.add_argument("--json", help="write the raw numbers to this file")
    p.add_argument("--out", default="docs/benchmarks.md", help="Markdown report (a PNG plot is written beside it)")


def _run_bench(a: argparse.Namespace, argv: Sequence[str]) -> int:
    from .bench import run_bench

    run_bench(a.device, a.model, Path(a.out), Path(a.json) if a.json else None, a.quality)
    print(Path(a.out).read_text(encoding="utf-8"))
    return 0


EPILOG_EVALUATE = """example:
  progidiff evaluate Resources/Models/progidiff-ct-abdomen ../shared/data/ct-abdomen --proposals 8 -o eval/
  progidiff evaluate my_model MY_COHORT -o eval/   # trained with --holdout-cases: scores the held-out cases only
  progidiff evaluate Resources/Models/progidiff-ct-abdomen Task09_Spleen -o eval/   # an MSD task, as downloaded
  progidiff evaluate Resources/Models/progidiff-ct-abdomen btcv/dataset_0.json -o eval/   # MONAI's BTCV
  progidiff evaluate Resources/Models/progidiff-ct-abdomen Totalsegmentator_dataset_v201 --split test --max-cases 20 -o eval/
writes report.md, report.json, report.png (Dice per organ and method) and report-slices.png (each organ's
slice where the ranked-first proposal is most wrong, with every method's outline); report.md also lists the
warnings segment gave (NOTHING FOUND, REVIEW CAREFULLY, unseen end, window cut, dark liver, wrong side?, sides
swapped?, heart?) beside each Dice
"""


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="Dice/HD95 per organ: ranked-first, consensus, best-of-N, RandTop-3, GED",
                       description="Evaluate a model on a labelled dataset (nnU-Net's, MSD's or TotalSegmentator's layout): on the held-out slab "
                                   "recorded in the model card for the cases it was trained on, and on the whole "
                                   "cases it held out or never saw.",
                       epilog=EPILOG_EVALUATE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="model folder")
    p.add_argument("dataset", help="folder with imagesTr/, labelsTr/, dataset.json (or that JSON file, if named otherwise)")
    p.add_argument("-n", "--proposals", type=_positive_int, default=8)
    p.add_argument("--steps", type=_positive_int, default=DEFAULT_STEPS)
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the first proposal (proposal k uses seed+k); another seed shows how much the "
                        "numbers move with the sampling alone")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--adapter", default="auto", help="LoRA adapter folder, 'auto' or 'none'")
    p.add_argument("--modality", default="auto", choices=["auto", "CT", "MR"])
    p.add_argument("--region-from", help="a model or adapter folder whose card names the held-out slabs to score on")
    p.add_argument("--baseline", default="auto",
                   help="baseline UNet folder to score beside the model; 'auto' (MODEL-baseline-unet beside MODEL, if "
                        "present) or 'none'")
    p.add_argument("--simulate-edits", action="store_true",
                   help="also simulate an expert fixing the worst slice of the ranked-first proposal, then refine")
    p.add_argument("--into-card", action="store_true",
                   help="record the per-organ results in the model card (or the adapter card with --adapter DIR); on the "
                        "training dataset, segment then asks for review where the proposals agree well below the "
                        "agreement recorded")
    p.add_argument("--split", help="only the cases of this split (\"test\"), where the dataset records one: "
                                   "the TotalSegmentator dataset's meta.csv")
    p.add_argument("--max-cases", type=_positive_int, metavar="N",
                   help="stop after N cases that hold one of the model's organs (a first look at a large cohort)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("-o", "--output", required=True, help="report folder (report.md, report.json, report.png)")


def _run_evaluate(a: argparse.Namespace, argv: Sequence[str]) -> int:
    from .evaluate import evaluate

    # SIGTERM (a job scheduler, `timeout`) as Ctrl-C: the staging folder is removed (it was left behind).
    with cancel_on_signals():
        rep = evaluate(a.model, a.dataset, Path(a.output), proposals=a.proposals, steps=a.steps, seed=a.seed,
                       device=a.device, overwrite=a.overwrite, command="progidiff " + shlex.join(argv),
                       adapter=_adapter_arg(a.adapter), modality=a.modality, region_from=a.region_from,
                       simulate_edits=a.simulate_edits, baseline=None if a.baseline == "none" else a.baseline,
                       split=a.split, max_cases=a.max_cases)
    if a.into_card:
        from .evaluate import record_in_card

        card = record_in_card(rep, Path(a.model), _adapter_arg(a.adapter))
        print(f"results recorded in {card}")
    print((Path(a.output) / "report.md").read_text(encoding="utf-8"))
    return 0


EPILOG_AVERAGE = """example:
  for s in 0 1 2; do progidiff train DATASET -o ft-$s --init-from Resources/Models/progidiff-ct-abdomen --stage2-steps 600 --seed $s; done
  progidiff average ft-0 ft-1 ft-2 -o my_model   # then: progidiff evaluate my_model DATASET -o eval/
  progidiff average Resources/Models/progidiff-ct-abdomen ft-0 -o my_model   # a model and its fine-tune (WiSE-FT)
"""


def _add_average(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("average", help="average the weights of fine-tunes of one model (a model soup)",
                       description="Write the mean of the weights of two or more fine-tunes of one model (train "
                                   "--init-from with the same options and held-out slab, other --seed): one model of "
                                   "the same size and speed that depends less on one training draw. The model they "
                                   "were fine-tuned from may be one of them (WiSE-FT): half-way between a model and "
                                   "its fine-tune, which often keeps most of the fine-tune's gain and loses less.",
                       epilog=EPILOG_AVERAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="model folders written by progidiff train --init-from (and, "
                                             "optionally, the model they were fine-tuned from)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("-o", "--output", required=True, help="model folder to write")


def _run_average(a: argparse.Namespace, argv: Sequence[str]) -> int:
    from .soup import average_models

    with cancel_on_signals():
        out = average_models(a.models, a.output, command="progidiff " + shlex.join(argv), overwrite=a.overwrite)
    print(f"model saved to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="progidiff", description="Prompt-guided diffusion segmentation proposals for CT/MR.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_segment(sub)
    _add_train(sub)
    _add_evaluate(sub)
    _add_refine(sub)
    _add_adapt(sub)
    _add_bench(sub)
    _add_average(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for stream in (sys.stdout, sys.stderr):
        # Summaries use "·" and "×": never crash on a terminal or log in the C/ASCII locale.
        if hasattr(stream, "reconfigure") and (stream.encoding or "").lower().replace("-", "") != "utf8":
            stream.reconfigure(errors="replace")
    parser = build_parser()
    a = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.debug else logging.INFO, format="%(levelname)s %(message)s")
    for noisy in ("matplotlib", "PIL", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    runners = {"train": _run_train, "segment": _run_segment, "evaluate": _run_evaluate, "refine": _run_refine, "adapt": _run_adapt, "bench": _run_bench,
               "average": _run_average}
    try:
        return runners[a.command](a, argv)
    except ProGiDiffError as exc:
        if a.debug:
            raise
        print(f"progidiff: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("progidiff: cancelled; nothing was written.", file=sys.stderr)
        return 130
    except OSError as exc:
        from .errors import OutputError
        from .outputs import WRITE_ERRNOS

        if a.debug or exc.errno not in WRITE_ERRNOS:
            raise
        # segment, refine, evaluate and adapt write through a staging folder, train its checkpoints
        # by atomic renames: what was there before is kept.
        again = "the same command with --resume" if a.command == "train" else "the command again"
        where = exc.filename or getattr(a, "output", None) or "an output file"  # PIL's errors name no file
        print(f"progidiff: error: {where}: {exc.strerror}; nothing was written over. "
              f"Free some space (or write elsewhere) and run {again}.", file=sys.stderr)
        return OutputError.exit_code


if __name__ == "__main__":
    sys.exit(main())
