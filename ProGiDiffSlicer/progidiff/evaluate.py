"""``progidiff evaluate``: per-organ Dice / HD95 of the ranked-first proposal, the
consensus, the best of N (oracle) and RandTop-3, and the generalised energy distance
of the proposal set, on slices the model did not train on (the held-out slab its model
card records) or on whole scans of other datasets."""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from tqdm.auto import tqdm

from .alerts import WEAK_ORGAN
from .card import format_mm, write_markdown
from .data import z_ranges
from .datasets import cases_in_split, read_dataset, read_label
from .engine import DEFAULT_STEPS, Engine, SegmentOptions
from .errors import InputError
from .label_names import log_lesions_counted, organ_label_values, organ_mask
from .model import FOLDER_CARDS
from .outputs import staging
from .proposals import BELOW_USUAL, CONSENSUS_MIN_AGREEMENT, REVIEW_AGREEMENT, pairwise_dice
from .volume import guess_modality, read_scan

log = logging.getLogger(__name__)

METHODS = ("ranked_first", "consensus", "best_of_n", "randtop3")


#: How a report names a case the model was trained on whole (no held-out slab): loud on purpose.
TRAINED_ON = "WHOLE SCAN, WHICH THE MODEL WAS TRAINED ON"


def world_z(image: sitk.Image) -> np.ndarray:
    """World (LPS) z of every voxel centre, in array order (Z, Y, X)."""
    size = image.GetSize()
    d = np.array(image.GetDirection()).reshape(3, 3)
    sp = np.array(image.GetSpacing())
    k, j, i = np.meshgrid(np.arange(size[2]), np.arange(size[1]), np.arange(size[0]), indexing="ij")
    return image.GetOrigin()[2] + d[2, 0] * sp[0] * i + d[2, 1] * sp[1] * j + d[2, 2] * sp[2] * k


def slab_mask(image: sitk.Image, slabs: list[tuple[float, float]]) -> np.ndarray:
    """Voxels (array order) whose world z lies in any of the (lo, hi) mm slabs."""
    z = world_z(image)
    keep = np.zeros(z.shape, bool)
    for lo, hi in slabs:
        keep |= (z >= lo) & (z <= hi)
    return keep


def dice_hd95(pred: np.ndarray, ref: np.ndarray, spacing_zyx: tuple[float, ...]) -> tuple[float, float]:
    """Dice and 95th-percentile Hausdorff distance (mm) with MONAI's metrics."""
    from monai.metrics import DiceMetric, HausdorffDistanceMetric

    p = torch.as_tensor(pred[None, None].astype(np.float32))
    r = torch.as_tensor(ref[None, None].astype(np.float32))
    d = DiceMetric(include_background=True, reduction="mean", ignore_empty=False)(p, r)
    dice = float(d.item())
    if not pred.any() or not ref.any():
        return dice, float("nan")
    h = HausdorffDistanceMetric(include_background=True, percentile=95)(p, r, spacing=list(spacing_zyx))
    return dice, float(h.item())


def energy_distance(masks: np.ndarray, ref: np.ndarray) -> float:
    """Generalised energy distance with d = 1 - IoU, one reference (so E[d(Y, Y')] = 0)."""
    def d(a, b):
        u = np.count_nonzero(a | b)
        return 0.0 if u == 0 else 1.0 - np.count_nonzero(a & b) / u

    n = len(masks)
    cross = np.mean([d(m, ref) for m in masks])
    within = np.mean([d(masks[i], masks[j]) for i in range(n) for j in range(n)]) if n > 1 else 0.0
    return float(2 * cross - within)


@dataclass
class OrganScore:
    case: str
    organ: str
    metrics: dict


def _training_record(folder: Path) -> dict:
    # each folder ProGiDiff writes holds one of these cards (model, adapter or baseline)
    for name in FOLDER_CARDS:
        if (folder / name).is_file():
            return json.loads((folder / name).read_text(encoding="utf-8")).get("training", {})
    raise InputError(f"{folder}: holds no model, adapter or baseline card ({', '.join(FOLDER_CARDS)}).")


def holdout_of(folder: Path) -> dict:
    """The held-out slabs recorded in a model card or an adapter card."""
    return _training_record(folder).get("holdout_z_mm", {})


def held_out_cases_of(folder: Path) -> list[str]:
    """The whole cases a model card says were held out from training (``train --holdout-cases``)."""
    return list(_training_record(folder).get("holdout_cases", []))


def evaluate(model_dir: str, dataset: str, outdir: Path, proposals: int = 8, steps: int = DEFAULT_STEPS, seed: int = 0,
             device: str = "auto", overwrite: bool = False, region: str = "auto", command: str = "",
             adapter: str | None = "auto", modality: str = "auto", region_from: str | None = None,
             simulate_edits: bool = False, baseline: str | None = "auto", split: str | None = None,
             max_cases: int | None = None) -> dict:
    """baseline: a baseline folder, "auto" (``<model>-baseline-unet`` beside the model, if any) or None.
    split: only the cases of this split, where the dataset records one (TotalSegmentator's meta.csv).
    max_cases: stop after this many cases that hold one of the model's organs (a cohort's first few)."""
    from .baseline import Baseline, find_baseline

    engine = Engine(model_dir, device=device, adapter=adapter)
    base_dir = find_baseline(engine.model_dir) if baseline == "auto" else (Path(baseline) if baseline else None)
    base_net = Baseline(base_dir, engine.device) if base_dir else None
    info = read_dataset(dataset)
    card = engine.card
    modality = modality if modality != "auto" else (info.modality or "auto")
    trained_on = set(card.get("training", {}).get("cases", []))
    if region_from:
        holdout, held_cases = holdout_of(Path(region_from)), set(held_out_cases_of(Path(region_from)))
    elif adapter not in (None, "auto"):
        holdout, held_cases = holdout_of(Path(adapter)), set()
        trained_on |= set(holdout)
    else:
        holdout = card.get("training", {}).get("holdout_z_mm", {})
        held_cases = set(card.get("training", {}).get("holdout_cases", []))
    organs = [o for o in card.get("organs", []) if organ_label_values(info.labels, engine.vocabulary, o)]
    if not organs:
        raise InputError(f"{dataset}: its labels name none of the model's organs ({', '.join(card.get('organs', []))}).")
    needed = {v for o in organs for v in organ_label_values(info.labels, engine.vocabulary, o)}  # read no other mask
    log_lesions_counted(info.labels, engine.vocabulary)
    rows: list[OrganScore] = []
    regions: dict[str, str] = {}
    unusable: dict[str, str] = {}  # case -> why it could not be scored
    worst: dict[str, tuple] = {}  # organ -> (ranked-first Dice, consensus Dice, case, slice panel), lowest case
    rng = np.random.default_rng(seed)
    t0 = time.time()
    cases = [c for c in info.cases if c.label is not None]
    if not cases:
        raise InputError(f"{dataset}: no case has a label file in labelsTr/; evaluate compares with the labels.")
    cases = cases_in_split(cases, split, dataset)
    # With whole cases held out of training (train --holdout-cases) the cases it trained on whole say
    # nothing of scans it has not seen: score the held-out ones (and any held-out slab) only.
    skipped: list[str] = []
    if held_cases & {c.name for c in cases}:
        skipped = [c.name for c in cases if c.name in trained_on and c.name not in holdout]
        cases = [c for c in cases if c.name not in skipped]
    with staging(outdir, overwrite) as tmp:
        with tqdm(total=len(cases) * len(organs), desc="evaluate", dynamic_ncols=True) as bar:
            for entry in cases:
                if max_cases is not None and len({r.case for r in rows}) >= max_cases:
                    break
                try:
                    scan = read_scan(entry.image)
                    label = sitk.GetArrayFromImage(read_label(entry, scan.image, info.labels, needed))
                except InputError as exc:
                    # In a cohort one unreadable case, or one whose label is off its scan's grid, must not stop
                    # the others (as segment on a cohort): listed in the report, not scored.
                    unusable[entry.name] = str(exc)
                    log.warning("%s: not scored: %s", entry.name, exc)
                    bar.update(len(organs))
                    continue
                keep = np.ones(label.shape, bool)
                if entry.name in holdout and region in ("auto", "holdout"):
                    slabs = z_ranges(holdout[entry.name])
                    keep = slab_mask(scan.image, slabs)
                    regions[entry.name] = ("held-out slab(s) " + ", ".join(f"z in [{lo:.1f}, {hi:.1f}] mm" for lo, hi in slabs)
                                           + f" ({keep.mean():.0%} of the scan; not used in training)")
                elif entry.name in held_cases:
                    regions[entry.name] = "whole scan, a case held out from training"
                elif entry.name in trained_on:
                    regions[entry.name] = TRAINED_ON + " (no held-out slab recorded)"
                else:
                    regions[entry.name] = "whole scan (not used in training)"
                sp = tuple(scan.image.GetSpacing()[::-1])
                scan_modality = modality if modality in ("CT", "MR") else guess_modality(scan)[0]
                for organ_name in organs:
                    organ = engine.vocabulary[organ_name]
                    ref = organ_mask(label, scan.image, info.labels, engine.vocabulary, organ_name, scan_modality) & keep
                    if not ref.any():
                        bar.update(1)
                        continue
                    res = engine.segment(scan, organ.display, SegmentOptions(proposals=proposals, steps=steps, seed=seed,
                                                                             modality=modality))
                    used_adapter = res.adapter
                    masks = res.masks & keep[None]
                    per = [dice_hd95(m, ref, sp) for m in masks]
                    cons = dice_hd95(res.consensus & keep, ref, sp)
                    best = int(np.argmax([p[0] for p in per]))
                    top = per[: min(3, len(per))]
                    pick = int(rng.integers(len(top)))
                    metrics = {
                        "ranked_first": {"dice": per[0][0], "hd95": per[0][1]},
                        "consensus": {"dice": cons[0], "hd95": cons[1]},
                        "best_of_n": {"dice": per[best][0], "hd95": per[best][1]},
                        # RandTop-3: a random pick among the 3 best-ranked (the paper's expert simulation)
                        "randtop3": {"dice": top[pick][0], "hd95": top[pick][1],
                                     "expected_dice": float(np.mean([t[0] for t in top]))},
                        "ged": energy_distance(masks, ref),
                        "agreement": res.ranking.agreement,
                        "reference_ml": float(ref.sum()) * scan.voxel_volume_ml,
                        "seconds": res.seconds,
                        # wider than the model's own for a wide body, narrower for a narrow one (volume.body_window)
                        "window_mm": res.window_mm,
                        # the scan's warnings: the standing caveat on a weak organ comes from the model card
                        # (the same on every case, and only once the card holds an evaluation), so it would
                        # only blur whether the warnings fall on the failures
                        "warnings": [w for w in res.warnings if w != WEAK_ORGAN],
                        # the model card's agreement for the organ, which segment's review compares with
                        "usual_agreement": res.usual_agreement,
                    }
                    base_mask = None
                    if base_net is not None and organ_name in base_net.organs:
                        base_mask = base_net.segment(scan, organ_name, modality)
                        b = dice_hd95(base_mask & keep, ref, sp)
                        metrics["baseline"] = {"dice": b[0], "hd95": b[1]}
                        # how far the deterministic baseline agrees with the ranked-first proposal, over the scan
                        # (as segment would see it) and where it is scored. Measured as a second opinion on the
                        # failures the proposals agree on, it caught none (docs/evaluation/baseline-second-opinion)
                        metrics["baseline_agreement"] = {
                            "scan": float(pairwise_dice(np.stack([res.masks[0], base_mask]))[0, 1]),
                            "scored": float(pairwise_dice(np.stack([res.masks[0] & keep, base_mask & keep]))[0, 1])}
                    if organ_name not in worst or per[0][0] < worst[organ_name][0]:
                        worst[organ_name] = (per[0][0], cons[0], entry.name, _panel(scan, res, ref, keep, base_mask))
                    if simulate_edits:
                        metrics["edit"] = simulate_edit(engine, scan, organ.display, res, ref, keep, sp, proposals, steps, seed,
                                                        modality)
                    rows.append(OrganScore(entry.name, organ_name, metrics))
                    bar.update(1)
        scored = {r.case for r in rows}
        if not scored and unusable:
            raise InputError(next(iter(unusable.values())) if len(unusable) == 1 else
                             f"{dataset}: no case could be scored; {len(unusable)} could not be read, the first: "
                             f"{next(iter(unusable.values()))}")
        if not scored:
            raise InputError(f"{dataset}: no labelled case holds any of the model's organs ({', '.join(organs)}) "
                             "where it is scored; nothing to report.")
        # A whole-body cohort (TotalSegmentator's) has head and leg scans: listed apart, not as evaluated.
        without = [c for c in regions if c not in scored]
        regions = {c: v for c, v in regions.items() if c in scored}
        report = _summarise(rows, regions, engine, dataset, proposals, steps, time.time() - t0, command, info.description)
        report["skipped_training_cases"] = skipped
        report["cases_without_organs"] = without
        report["unusable_cases"] = unusable
        report["selection"] = ", ".join(([f"split {split!r}"] if split else [])
                                        + ([f"the first {max_cases} case(s) holding one of its organs"] if max_cases else []))
        report["adapter"] = locals().get("used_adapter")
        report["baseline"] = str(base_dir) if base_net is not None else None
        report["modality"] = modality
        (tmp / "report.json").write_text(json.dumps(strict_json(report), indent=2, allow_nan=False), encoding="utf-8")
        (tmp / "report.md").write_text(_markdown(report), encoding="utf-8")
        _figure(report, tmp / "report.png")
        if worst:
            from .overview import render_slices

            render_slices([(f"{o.replace('_', ' ')} · {case} · z {z:.0f} mm\nDice {d:.3f} (consensus {c:.3f})", panel)
                           for o, (d, c, case, (z, panel)) in worst.items()], tmp / "report-slices.png",
                          f"{Path(report['model']).name}: each organ's slice where the ranked-first proposal is most "
                          "wrong" + (", in its lowest-scoring case" if len(regions) > 1 else ""))
    return report


def simulate_edit(engine: Engine, scan, prompt: str, res, ref: np.ndarray, keep: np.ndarray, sp, proposals: int,
                  steps: int, seed: int, modality: str) -> dict:
    """A simulated expert corrects the ranked-first proposal on its single worst axial slice
    (world-z, within the evaluated region) with the reference; refine re-samples the rest."""
    first = res.masks[0]
    d = np.array(scan.image.GetDirection()).reshape(3, 3)
    axis_ijk = int(np.argmax(np.abs(d[2, :])))          # image axis closest to world z
    axis = 2 - axis_ijk                                   # numpy axis (k, j, i order)
    other = tuple(a for a in range(3) if a != axis)
    err = ((first ^ ref) & keep).sum(axis=other)
    worst = int(np.argmax(err))
    sl = [slice(None)] * 3
    sl[axis] = worst
    edited = first.copy()
    edited[tuple(sl)] = ref[tuple(sl)]
    kept = np.zeros_like(first)
    kept[tuple(sl)] = True
    before = dice_hd95(first & keep, ref, sp)[0]
    out = engine.refine(scan, prompt, edited, kept, SegmentOptions(proposals=proposals, steps=steps, seed=seed + 1,
                                                                   modality=modality), strength=0.6)
    after = dice_hd95(out.masks[0] & keep, ref, sp)[0]
    unchanged = bool(all((m[kept] == edited[kept]).all() for m in out.masks))
    return {"dice_before": before, "dice_after": after, "edited_slice": worst, "edited_voxels_wrong": int(err[worst]),
            "kept_voxels_unchanged": unchanged}


def _nanmean(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.mean(xs)) if xs else float("nan")


def _panel(scan, res, ref: np.ndarray, keep: np.ndarray, base_mask: np.ndarray | None) -> tuple[float, dict]:
    """The slice figure's panel for one organ, on the model grid the segmentation ran on (axis-aligned,
    radiological convention), within the scored region ``keep`` (a held-out slab: elsewhere there is no
    reference to be wrong against), and the world z of its slice."""
    from .overview import slice_panel
    from .volume import array_to_image, label_to_model_grid

    def on_grid(mask: np.ndarray) -> np.ndarray:
        return label_to_model_grid(array_to_image(mask.astype(np.uint8), scan.image), res.grid)

    masks = {"reference": on_grid(ref), "ranked_first": on_grid(res.masks[0] & keep), "consensus": on_grid(res.consensus & keep)}
    if base_mask is not None:
        masks["baseline"] = on_grid(base_mask & keep)
    sx, sy = res.grid.GetSpacing()[:2]
    k, panel = slice_panel(res.grid_image, masks, sy / sx)
    return res.grid.TransformIndexToPhysicalPoint((0, 0, k))[2], panel  # the slice's world z (mm)


def _usual(value: float | None) -> str:
    """The model card's agreement for the organ beside the cohort's: where the cohort's lies more than
    proposals.BELOW_USUAL below it, segment asks for review (the model is less sure than on its training data)."""
    return "" if value is None else f" (model card {value:.3f})"


def _summarise(rows, regions, engine, dataset, n, steps, seconds, command, description: str = "") -> dict:
    organs: dict[str, dict] = {}
    for name in dict.fromkeys(r.organ for r in rows):
        rs = [r.metrics for r in rows if r.organ == name]
        organs[name] = {m: {"dice": _nanmean([r[m]["dice"] for r in rs]), "hd95": _nanmean([r[m]["hd95"] for r in rs])}
                        for m in METHODS}
        if all("baseline" in r for r in rs):
            organs[name]["baseline"] = {"dice": _nanmean([r["baseline"]["dice"] for r in rs]),
                                        "hd95": _nanmean([r["baseline"]["hd95"] for r in rs])}
        organs[name]["ged"] = _nanmean([r["ged"] for r in rs])
        organs[name]["agreement"] = _nanmean([r["agreement"] for r in rs])
        usual = [r["usual_agreement"] for r in rs if r.get("usual_agreement") is not None]
        organs[name]["usual_agreement"] = usual[0] if usual else None
        organs[name]["cases"] = len(rs)
        if all("edit" in r for r in rs):
            organs[name]["edit"] = {"dice_before": _nanmean([r["edit"]["dice_before"] for r in rs]),
                                    "dice_after": _nanmean([r["edit"]["dice_after"] for r in rs]),
                                    "kept_voxels_unchanged": all(r["edit"]["kept_voxels_unchanged"] for r in rs)}
    mean = {m: _nanmean([o[m]["dice"] for o in organs.values()]) for m in METHODS}
    if organs and all("baseline" in o for o in organs.values()):
        mean["baseline"] = _nanmean([o["baseline"]["dice"] for o in organs.values()])
    return {"model": str(engine.model_dir), "dataset": str(dataset), "dataset_description": description,
            "proposals": n, "steps": steps,
            "device": str(engine.device), "seconds": round(seconds, 1), "command": command,
            "model_window_mm": float(engine.grid.size[0] * engine.grid.spacing[0]),
            "evaluated_on": regions, "organs": organs, "mean_dice": mean,
            "cases": [{"case": r.case, "organ": r.organ, **r.metrics} for r in rows]}


def strict_json(value):
    """``value`` with every NaN or infinity replaced by None: an HD95 is undefined where nothing was
    predicted, and json.dumps would write it as NaN, which strict JSON readers (jq, browsers) refuse."""
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _markdown(rep: dict) -> str:
    lines = [f"# Evaluation of `{Path(rep['model']).name}`", "",
             f"Dataset `{rep['dataset']}`, {rep['proposals']} proposals, {rep['steps']} steps, device {rep['device']}, "
             f"{rep['seconds']:.0f} s.", ""]
    if rep.get("dataset_description"):
        lines += [f"The dataset, as its dataset.json describes it: {rep['dataset_description']}", ""]
    lines += ["Evaluated on" + (f" ({rep['selection']})" if rep.get("selection") else "") + ":"]
    lines += [f"- `{k}`: {v}" for k, v in rep["evaluated_on"].items()]
    widened = {c["case"]: c["window_mm"] for c in rep["cases"] if c.get("window_mm", 0) > rep.get("model_window_mm", math.inf)}
    if widened:
        lines += [f"- the model's {rep['model_window_mm']:.0f} mm window widened for a wide body: "
                  + ", ".join(f"`{c}` {w:.0f} mm" for c, w in widened.items())]
    zoomed = {c["case"]: c["window_mm"] for c in rep["cases"] if c.get("window_mm", math.inf) < rep.get("model_window_mm", 0)}
    if zoomed:
        lines += [f"- the model's {rep['model_window_mm']:.0f} mm window zoomed for a narrow body (finer pixels): "
                  + ", ".join(f"`{c}` {w:.0f} mm" for c, w in zoomed.items())]
    if rep.get("skipped_training_cases"):
        n = len(rep["skipped_training_cases"])
        lines += [f"- not scored: {n} case(s) the model was trained on whole "
                  f"({', '.join(rep['skipped_training_cases'])})"]
    if rep.get("unusable_cases"):
        bad = rep["unusable_cases"]
        lines += [f"- **not scored: {len(bad)} case(s) that could not be read or whose label is off its scan's grid**:"]
        lines += [f"  - `{c}`: {why}" for c, why in list(bad.items())[:10]] + (["  - ..."] if len(bad) > 10 else [])
    if rep.get("cases_without_organs"):
        n = len(rep["cases_without_organs"])
        shown = ", ".join(rep["cases_without_organs"][:10]) + (", ..." if n > 10 else "")
        lines += [f"- not scored: {n} case(s) holding none of the model's organs ({shown})"]
    has_base = "baseline" in rep["mean_dice"]
    if has_base:
        lines += [f"- baseline: deterministic MONAI UNet `{Path(rep['baseline']).name}` (same data, transforms and budget)"]
    head = "| organ | ranked-first Dice | HD95 mm | consensus Dice | HD95 mm | best-of-N Dice | RandTop-3 Dice | GED | agreement |"
    lines += ["", head + (" baseline UNet Dice | HD95 mm |" if has_base else ""),
              "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if has_base else "")]
    for name, o in rep["organs"].items():
        row = (f"| {name} | {o['ranked_first']['dice']:.3f} | {format_mm(o['ranked_first']['hd95'])} | {o['consensus']['dice']:.3f} | "
               f"{format_mm(o['consensus']['hd95'])} | {o['best_of_n']['dice']:.3f} | {o['randtop3']['dice']:.3f} | "
               f"{o['ged']:.3f} | {o['agreement']:.3f}{_usual(o.get('usual_agreement'))} |")
        if has_base:
            row += f" {o['baseline']['dice']:.3f} | {format_mm(o['baseline']['hd95'])} |"
        lines.append(row)
    m = rep["mean_dice"]
    lines.append(f"| **mean** | **{m['ranked_first']:.3f}** | | **{m['consensus']:.3f}** | | **{m['best_of_n']:.3f}** | "
                 f"**{m['randtop3']:.3f}** | | |" + (f" **{m['baseline']:.3f}** | |" if has_base else ""))
    lines += _per_case(rep)
    lines += _warnings(rep)
    lines += ["", "Consensus: the engine's, the ranked-first proposal corrected by the vote (without the voxels fewer than "
              "a quarter of the proposals hold, with those at least three quarters hold), uncorrected where their "
              f"agreement (mean pairwise Dice) is below {CONSENSUS_MIN_AGREEMENT:g}."]
    if any(o.get("usual_agreement") is not None for o in rep["organs"].values()):
        lines += ["", "Agreement (model card): the organ's agreement on the model's training data, as its card records it. "
                  f"`segment` asks for review where a scan's proposals agree more than {BELOW_USUAL:.2f} below it, or "
                  f"below {REVIEW_AGREEMENT:.2f}: the model is less sure of such a scan than of its training data."]
    if any("edit" in o for o in rep["organs"].values()):
        lines += ["", "Simulated expert edit (the ranked-first proposal corrected on its worst slice, then `refine`):", "",
                  "| organ | Dice before | Dice after refine | kept voxels unchanged |", "|---|---|---|---|"]
        for name, o in rep["organs"].items():
            if "edit" in o:
                e = o["edit"]
                lines.append(f"| {name} | {e['dice_before']:.3f} | {e['dice_after']:.3f} | {'yes' if e['kept_voxels_unchanged'] else 'NO'} |")
    if rep["organs"]:
        lines += ["", "![Dice per organ and method](report.png)", "",
                  "Each organ's slice where the ranked-first proposal is most wrong (voxels missed plus taken in)"
                  + (", in its lowest-scoring case" if len(rep["evaluated_on"]) > 1 else "")
                  + ", on the model's grid: the reference and the ranked-first, consensus and baseline outlines.", "",
                  "![Each organ's slice where the ranked-first proposal is most wrong](report-slices.png)"]
    lines += ["", f"Command: `{rep['command']}`" if rep["command"] else "", ""]
    return "\n".join(lines)


def _per_case(rep: dict) -> list[str]:
    """A cohort's table, case by case (the table above is their mean), and a warning when some of the
    cases are whole scans the model was trained on: their numbers would flatter the mean."""
    lines: list[str] = []
    trained = [c for c, region in rep["evaluated_on"].items() if region.startswith(TRAINED_ON)]
    if trained:
        lines += ["", f"**{len(trained)} of {len(rep['evaluated_on'])} case(s) are whole scans the model was trained on "
                      f"({', '.join(trained)}): their numbers, and the means above, say nothing of scans it has not seen.**"]
    if len(rep["evaluated_on"]) < 2:
        return lines
    organs = list(rep["organs"])
    by = {(c["case"], c["organ"]): c for c in rep["cases"]}
    has_base = "baseline" in rep["mean_dice"]
    lines += ["", "Across cases, ranked-first Dice" + (" (baseline UNet's beside it)" if has_base else "") + ":", "",
              "| organ | cases | mean ± SD | median | lowest (case) |" + (" baseline mean ± SD |" if has_base else ""),
              "|---|---|---|---|---|" + ("---|" if has_base else "")]
    for o in organs:
        spread = _spread([(c, by[c, o]["ranked_first"]["dice"]) for c in rep["evaluated_on"] if (c, o) in by])
        row = (f"| {o} | {spread['cases']} | {spread['mean']:.3f} ± {spread['sd']:.3f} | {spread['median']:.3f} | "
               f"{spread['lowest']:.3f} ({spread['lowest_case']}) |")
        if has_base:
            b = _spread([(c, by[c, o]["baseline"]["dice"]) for c in rep["evaluated_on"] if (c, o) in by])
            row += f" {b['mean']:.3f} ± {b['sd']:.3f} |"
        lines.append(row)
    lines += ["", "Per case, ranked-first Dice (consensus):", "", "| case | " + " | ".join(organs) + " |",
              "|---|" + "---|" * len(organs)]
    for case in rep["evaluated_on"]:
        cells = [f"{by[case, o]['ranked_first']['dice']:.3f} ({by[case, o]['consensus']['dice']:.3f})" if (case, o) in by
                 else "–" for o in organs]
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    return lines


def _warnings(rep: dict) -> list[str]:
    """The warnings `segment` gave (``SegmentResult.warnings``) beside the ranked-first Dice, and the mean Dice
    with and without one: whether they fall on the poor segmentations, which is what they are for."""
    cases = [c for c in rep["cases"] if "warnings" in c]      # reports written before 2026-12-07 lack them
    flagged = [c for c in cases if c["warnings"]]
    if not flagged:
        return ["", f"`segment` gave no warning on any of the {len(cases)} organ × case pairs."] if cases else []
    lines = ["", "Warnings `segment` gave (on the whole scan), beside the ranked-first Dice:", "",
             "| organ | case | warnings | ranked-first Dice |", "|---|---|---|---|"]
    # organ first: the case x organ table above has a row per case that starts with its name
    lines += [f"| {c['organ']} | {c['case']} | {', '.join(c['warnings'])} | {c['ranked_first']['dice']:.3f} |"
              for c in flagged]
    calm = [c for c in cases if not c["warnings"]]
    mean = lambda cs: _nanmean([c["ranked_first"]["dice"] for c in cs])
    lines += ["", f"Mean ranked-first Dice: {mean(flagged):.3f} over the {len(flagged)} pair(s) with a warning"
              + (f", {mean(calm):.3f} over the {len(calm)} without." if calm else "; every pair had one.")]
    return lines


def _spread(scores: list[tuple[str, float]]) -> dict:
    """Mean, sample SD, median and lowest (with its case) of per-case Dice; NaN (no reference) left out."""
    kept = [(c, d) for c, d in scores if d is not None and not math.isnan(d)]
    ds = np.array([d for _, d in kept], float)
    if not len(ds):
        return {"cases": 0, "mean": math.nan, "sd": math.nan, "median": math.nan, "lowest": math.nan, "lowest_case": "–"}
    low = int(np.argmin(ds))
    return {"cases": len(ds), "mean": float(ds.mean()), "sd": float(ds.std(ddof=1)) if len(ds) > 1 else 0.0,
            "median": float(np.median(ds)), "lowest": float(ds[low]), "lowest_case": kept[low][0]}


def _figure(rep: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rep["organs"])
    x = np.arange(len(names))
    # A cohort gets a second panel: each organ's per-case ranked-first Dice, a box and its points, since
    # a mean hides the case that failed.
    cohort = len(rep["evaluated_on"]) > 1
    fig, axes = plt.subplots(1 + cohort, 1, figsize=(max(6, 1.1 * len(names)), 3.6 * (1 + cohort)), squeeze=False)
    ax = axes[0, 0]
    methods = list(METHODS) + (["baseline"] if "baseline" in rep["mean_dice"] else [])
    w = 0.8 / len(methods)
    for i, m in enumerate(methods):
        ax.bar(x + (i - (len(methods) - 1) / 2) * w, [rep["organs"][n][m]["dice"] for n in names], w,
               label=m.replace("_", " ") + (" UNet" if m == "baseline" else ""))
    ax.set_xticks(x, [n.replace("_", " ") for n in names], rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("Dice")
    ax.legend(fontsize=7, ncol=len(methods), loc="lower left")
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(f"{Path(rep['model']).name}: Dice per organ ({rep['proposals']} proposals)", fontsize=9)
    if cohort:
        ax = axes[1, 0]
        per = [[c["ranked_first"]["dice"] for c in rep["cases"] if c["organ"] == n
                and not math.isnan(c["ranked_first"]["dice"])] for n in names]
        ax.boxplot(per, positions=x, widths=0.5, showfliers=False)
        jitter = np.random.default_rng(0)
        for i, ds in enumerate(per):
            ax.scatter(i + jitter.uniform(-0.15, 0.15, len(ds)), ds, s=8, alpha=0.6, color="tab:blue")
        ax.set_xticks(x, [n.replace("_", " ") for n in names], rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_ylabel("ranked-first Dice")
        ax.grid(axis="y", alpha=0.3)
        ax.set_title(f"per case ({len(rep['evaluated_on'])} cases)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _card_mm(value: float | None) -> float | None:
    """A distance for the card: None (JSON null) where it is undefined, whether the report held NaN or null;
    unrounded, as the Dice values are (the card displays 1 decimal, as report.md does)."""
    value = strict_json(value)
    return None if value is None else float(value)


def record_in_card(rep: dict, model_dir: Path, adapter: str | None) -> Path:
    """Store the measured numbers in the model card (or adapter card); weights are untouched,
    so their sha256 stays valid."""
    card_path = Path(adapter) / "adapter_card.json" if adapter not in (None, "auto") else model_dir / "model_card.json"
    card = json.loads(card_path.read_text(encoding="utf-8"))
    card.setdefault("metrics", {})[Path(rep["dataset"]).name] = {
        **({"dataset_description": rep["dataset_description"]} if rep.get("dataset_description") else {}),
        "evaluated_on": rep["evaluated_on"], "proposals": rep["proposals"], "steps": rep["steps"],
        "device": rep["device"], "command": rep["command"], "mean_dice": rep["mean_dice"],
        # The measured values, unrounded: rounding before the card's 3-decimal display rounds twice,
        # which printed 0.61349... as 0.614 (rounded to 4 first) and 0.26249998... as 0.263 (to 6
        # first) in the card, against 0.613 and 0.262 in report.md.
        "organs": {k: {"ranked_first_dice": float(v["ranked_first"]["dice"]),
                       # null, not NaN (which strict JSON readers refuse), where nothing was predicted
                       "ranked_first_hd95_mm": _card_mm(v["ranked_first"]["hd95"]),
                       "consensus_dice": float(v["consensus"]["dice"]), "best_of_n_dice": float(v["best_of_n"]["dice"]),
                       "randtop3_dice": float(v["randtop3"]["dice"]), "ged": float(v["ged"]),
                       # segment asks for review where the proposals agree well below this (proposals.BELOW_USUAL)
                       **({"agreement": float(v["agreement"])} if "agreement" in v else {}),
                       **({"baseline_unet_dice": float(v["baseline"]["dice"])} if "baseline" in v else {})}
                   for k, v in rep["organs"].items()},
    }
    card_path.write_text(json.dumps(strict_json(card), indent=2, allow_nan=False), encoding="utf-8")
    write_markdown(card_path.parent)
    return card_path
