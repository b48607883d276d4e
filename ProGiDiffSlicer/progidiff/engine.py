"""The engine: a loaded model + text encoder that turns (scan, prompt) into proposals.

This is the API the CLI and the Slicer module share. Load once (``Engine(...)``), call
``segment`` many times; the model stays on its device between calls.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk
import torch

from .alerts import LIVER_TOP_MM, SIDED_BY_PROMPT, Alert, find_alerts, is_dark_liver, is_heart_suspect
from .card import training_metrics_name
from .errors import InputError, ModelError, PromptError
from .model import DEFAULT_TEXT_ENCODER, ProGiDiffModel
from .prompts import Organ, PromptResolver, TextEncoder, Vocabulary, default_text_encoder_dir
from .proposals import (ProposalSet, bounding_box, engine_consensus, kji_to_world, largest_diameter_mm, rank, uncertainty,
                        volumes_ml)
from .sampling import SCHEDULERS, sample_proposals
from .volume import (EMPTY_BOX, GridSpec, Scan, body_axis_coords, body_slices, context_slices, fitted_model_grid,
                     guess_modality, is_empty, largest_region, masks_from_model_grid, organ_box,
                     physical_bounds, stored_without_intercept)

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "progidiff-ct-abdomen"
MAX_PROPOSALS = 64
MAX_STEPS = 1000
#: Denoising steps by default, chosen from the measured quality-steps curve (docs/benchmarks.md):
#: the shipped model's liver Dice on the held-out slab is 0.879 at 4 DPM-Solver++ steps, 0.873 at 8
#: and 0.876 at 50 (ct-v3 before it: 0.868, 0.867, 0.862), so steps beyond 4 cost time and buy nothing.
DEFAULT_STEPS = 4
#: The least liver (mL) the kidney's side check reads a side from. A liver is 1-2 L (the sample CT's pass:
#: about 1,200 mL); the sample CT's lower half shows only its tip, where the pass found 3 mL, which could lie
#: on either side of the midline by chance.
LIVER_PROBE_MIN_ML = 100.0
ProgressFn = Callable[[str, int, int], None]


def default_model_dir() -> Path:
    """$PROGIDIFF_MODEL, else the model shipped in Resources/Models (source tree or Slicer module)."""
    env = os.environ.get("PROGIDIFF_MODEL")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent
    for root in (here.parent.parent, here.parent):
        cand = root / "Resources" / "Models" / DEFAULT_MODEL_NAME
        if cand.is_dir():
            return cand
    raise ModelError(f"The default model {DEFAULT_MODEL_NAME} was not found under Resources/Models; "
                     "give --model DIR or set PROGIDIFF_MODEL.")


def load_text_encoder(model: ProGiDiffModel, model_dir: Path) -> TextEncoder:
    """The model's prompt encoder: the packaged MiniLM, or the CLIP encoder saved beside an SD model."""
    te = model.config.text_encoder
    if te == DEFAULT_TEXT_ENCODER:
        return TextEncoder(default_text_encoder_dir(), max_length=model.config.text_max_length)
    root = model_dir if (model_dir / "text_encoder").is_dir() else Path(te)
    if not (root / "text_encoder").is_dir():
        raise ModelError(f"{model_dir}: the model's text encoder (text_encoder/, tokenizer/) is missing; copy the whole folder again.")
    return TextEncoder(root / "text_encoder", max_length=model.config.text_max_length, tokenizer_dir=root / "tokenizer")


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu.")
    if name == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise InputError("--device mps was asked for but Metal is not available; use --device cpu.")
    if name not in ("cpu", "cuda", "mps"):
        raise InputError(f"Unknown device {name!r}; use auto, cpu, cuda or mps.")
    return torch.device(name)


@dataclass
class SegmentOptions:
    proposals: int = 8
    steps: int = DEFAULT_STEPS
    scheduler: str = "dpm++"
    seed: int = 0
    modality: str = "auto"
    batch_size: int | None = None
    keep_largest: bool = True
    #: Find the organ's slab first (1 proposal, 2 steps, every other slice) and sample the N
    #: proposals only there, with a margin. Falls back to every body slice if it finds nothing.
    prepass: bool = True
    prepass_margin_mm: float = 20.0

    def validate(self) -> None:
        if not 1 <= self.proposals <= MAX_PROPOSALS:
            raise InputError(f"--proposals must be between 1 and {MAX_PROPOSALS}, got {self.proposals}.")
        if not 1 <= self.steps <= MAX_STEPS:
            raise InputError(f"--steps must be between 1 and {MAX_STEPS}, got {self.steps}.")
        if self.scheduler not in SCHEDULERS:
            raise InputError(f"--scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}.")
        if self.modality not in ("auto", "CT", "MR"):
            raise InputError(f"--modality must be auto, CT or MR, got {self.modality!r}.")


@dataclass
class SegmentResult:
    organ: Organ
    prompt: str
    similarity: float
    modality: str
    modality_reason: str
    image: sitk.Image                      # the input scan (its grid is the output grid)
    masks: np.ndarray                      # (N, Z, Y, X) bool on the input grid, best-ranked first
    seeds: list[int]                       # seeds, in the same order
    ranking: ProposalSet                   # scores/agreement; order already applied to masks
    scores: list[float]                    # per output proposal (best first)
    volumes_ml: list[float]
    consensus: np.ndarray                  # ranked-first corrected by the vote, or uncorrected (consensus_rule)
    uncertainty: np.ndarray
    grid: sitk.Image                       # model grid (for the overview picture)
    grid_image: np.ndarray                 # scan on the model grid (Z, H, W) in [0, 1]
    grid_masks: np.ndarray                 # (N, Z, H, W) bool on the model grid, best first
    steps: int
    scheduler: str
    device: str
    seconds: float
    diameters_mm: list[float] = field(default_factory=list)
    adapter: str | None = None
    timings: dict = field(default_factory=dict)
    consensus_rule: str = "vote-corrected"  # or "ranked-first": the proposals agree too little to vote
    #: Ends of the organ ("superior", "inferior") that no training slice showed (the model card's
    #: training.unseen_organ_ends) and that this scan shows: the ranked-first proposal ends inside it.
    unseen_ends: list[str] = field(default_factory=list)
    #: Sides of the model's in-plane window ("right", "left", "anterior", "posterior", the patient's)
    #: that the ranked-first proposal reaches while the scan goes on beyond them: the organ may be cut there.
    window_cut: list[str] = field(default_factory=list)
    #: The scan's median value inside the ranked-first proposal: HU on CT (a liver's attenuation is read
    #: for steatosis), None on MR, where intensities have no fixed scale, or for an empty proposal.
    median_hu: float | None = None
    #: For a liver: the share of the ranked-first proposal's top alerts.LIVER_TOP_MM that lies left of the
    #: body's midline (``left_share_of_top``); None for other organs and for an empty proposal.
    top_left_share: float | None = None
    #: The organ's agreement on the training dataset of the model (or its adapter), as its card records it
    #: (``usual_agreement``); None where the card holds none. Review is asked for well below it.
    usual_agreement: float | None = None
    #: Where the ranked-first proposal's centre lies from the body's midline, in mm, + = the patient's left
    #: (``midline_offset_mm``); None for an empty proposal. A liver, gallbladder or spleen on the wrong side
    #: is flagged (alerts.is_wrong_side).
    midline_offset_mm: float | None = None
    #: For a left or right kidney: where the liver lies from the midline, by a cheap pass (``Engine._liver_side``).
    liver_offset_mm: float | None = None
    #: How far the trunk reaches from the body's centre, world x (``volume.body_reach_mm``): a narrow body
    #: (alerts.NARROW_BODY_REACH_MM) is flagged.
    body_reach_mm: float | None = None
    #: Whether the scan's field of view cuts the trunk's sides (``volume.body_fov_cut``): then the body is wider
    #: than its reach, and is neither called narrow nor zoomed.
    body_fov_cut: bool = False
    #: The organ's ranked-first Dice on the held-out part of that training dataset (``held_out_dice``); below
    #: alerts.WEAK_ORGAN_DICE every result of the organ is called a rough draft.
    held_out_dice: float | None = None

    @property
    def dark_liver(self) -> bool:
        """A CT liver proposal darker than a healthy liver (alerts.DARK_LIVER_HU): a fatty liver, which
        the model finds less well."""
        return is_dark_liver(self.organ.name, self.median_hu)

    @property
    def heart_suspect(self) -> bool:
        """A liver proposal whose top lies mostly left of the body's midline, where the heart sits on the
        liver dome (alerts.LIVER_TOP_LEFT_SHARE): it may hold the heart, which the model never saw."""
        return is_heart_suspect(self.organ.name, self.top_left_share)

    @property
    def alerts(self) -> list[Alert]:
        """segment's warnings, each as a code, a phrase for the overview's title and a sentence
        (alerts.find_alerts): the command line, report.json, the overview and Slicer all show these."""
        return find_alerts(self.organ.name, self.organ.display, review=bool(self.ranking.review),
                           agreement=self.ranking.agreement, unseen_ends=self.unseen_ends, window_cut=self.window_cut,
                           window_mm=self.window_mm, median_hu=self.median_hu, top_left_share=self.top_left_share,
                           usual_agreement=self.usual_agreement,
                           empty_of=0 if self.masks.any() else len(self.masks), held_out_dice=self.held_out_dice,
                           midline_offset_mm=self.midline_offset_mm, liver_offset_mm=self.liver_offset_mm,
                           body_reach_mm=None if self.body_fov_cut else self.body_reach_mm, modality=self.modality, modality_reason=self.modality_reason)

    @property
    def warnings(self) -> list[str]:
        """segment's warnings in short: "nothing found" (every proposal empty), "review" (the proposals
        disagree), "modality?", "narrow body", "unseen <end> end", "cut <side>" (the model's window), "dark liver", "wrong
        side?", "sides swapped?", "heart?", "weak organ" (the card's held-out Dice); empty where it says nothing. ``evaluate``
        lists them, the weak organ's aside, beside the Dice, so a cohort shows whether they fall on the poor
        segmentations."""
        return [code for a in self.alerts for code in a.codes]

    @property
    def window_mm(self) -> float:
        """The width of the in-plane window the model saw (its grid's extent: 64 px x 6 mm = 384 mm for the
        shipped model, wider for a wide body)."""
        return float(self.grid.GetSize()[0] * self.grid.GetSpacing()[0])


class Engine:
    """A loaded model with its prompt resolver. Thread-safe for one caller at a time."""

    def __init__(self, model_dir: str | os.PathLike | None = None, device: str = "auto",
                 adapter: str | os.PathLike | None = "auto") -> None:
        """adapter: "auto" (an adapter for the input's modality found beside the model),
        a folder (always used for its modality), or None (never)."""
        t0 = time.time()
        self.model_dir = Path(model_dir) if model_dir else default_model_dir()
        self.model = ProGiDiffModel.from_pretrained(self.model_dir)
        self.card = self.model.card
        self.adapter = adapter
        self._adapted: dict[str, tuple[ProGiDiffModel, str]] = {}
        self.device = pick_device(device)
        self.model.to(self.device)
        if adapter not in (None, "auto"):
            from .adapt import read_adapter_card

            read_adapter_card(Path(adapter))  # refuse a broken adapter now, not mid-run
        self.vocabulary = Vocabulary.from_dict(self.card["vocabulary"]) if "vocabulary" in self.card else Vocabulary.load()
        self.encoder = load_text_encoder(self.model, self.model_dir)
        self.resolver = PromptResolver(self.vocabulary, self.encoder)
        self._states: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.lock = threading.Lock()
        self.load_seconds = time.time() - t0
        log.info("model %s loaded on %s in %.1fs", self.model_dir.name, self.device, self.load_seconds)

    @property
    def grid(self) -> GridSpec:
        c = self.model.config
        return GridSpec(tuple(c.grid_spacing), tuple(c.grid_size))

    def model_for(self, modality: str) -> tuple[ProGiDiffModel, str | None]:
        """The base model, or the base with the adapter for ``modality`` (cached)."""
        from .adapt import apply_adapter, find_adapter, read_adapter_card

        base_modality = self.card.get("modality", "CT")
        if self.adapter is None or (modality == base_modality and self.adapter == "auto"):
            return self.model, None
        if modality in self._adapted:
            return self._adapted[modality]
        if self.adapter == "auto":
            found = find_adapter(self.model_dir, modality, self.card.get("sha256", {}).get("diffusion_pytorch_model.safetensors"))
            if found is None:
                log.warning("no %s adapter found for %s: using the %s model as it is (expect lower accuracy)",
                            modality, self.model_dir.name, base_modality)
                return self.model, None
        else:
            found = Path(self.adapter)
            if read_adapter_card(found).get("modality") != modality:
                return self.model, None
        adapted = apply_adapter(self.model, found).to(self.device)
        self._adapted[modality] = (adapted, found.name)
        log.info("using adapter %s for %s", found.name, modality)
        return self._adapted[modality]

    def text_states(self, organ: Organ) -> tuple[torch.Tensor, torch.Tensor]:
        """The conditioning for an organ: token states (1, L, D) and pooled embedding (1, D)."""
        if organ.name not in self._states:
            self._states[organ.name] = self.encoder.conditioning([organ.display])
        return self._states[organ.name]

    def resolve(self, prompt: str):
        res = self.resolver.resolve(prompt)
        if res.organ.name not in self.card.get("organs", self.vocabulary.names()):
            raise PromptError(f"This model was not trained for {res.organ.display}; it knows "
                              f"{', '.join(self.vocabulary[o].display for o in self.card['organs'])}.")
        return res

    def _cheap_pass(self, model: ProGiDiffModel, stack: np.ndarray, idx: np.ndarray, states, coords: np.ndarray,
                    seed: int, opts: SegmentOptions, stage: str, progress: ProgressFn | None,
                    cancel: threading.Event | None) -> tuple[np.ndarray, np.ndarray]:
        """(every other slice of ``idx``, the organ's mask there) from one proposal of 2 steps: about 3 % of
        the cost of 8 proposals x 4 steps. The slab pre-pass and the kidneys' side check use it."""
        coarse = idx[::2]
        probs = sample_proposals(model, stack[coarse], states, [seed], steps=2, scheduler="dpm++", device=self.device,
                                 batch_size=opts.batch_size, coords=coords[coarse], cancel=cancel,
                                 progress=(lambda d, t: progress(stage, d, t)) if progress else None)
        return coarse, probs[0] > 0.5

    def _organ_slab(self, model: ProGiDiffModel, stack: np.ndarray, idx: np.ndarray, states: torch.Tensor, opts: SegmentOptions,
                    progress: ProgressFn | None, cancel: threading.Event | None, coords: np.ndarray) -> np.ndarray:
        """Body slices within the organ's slab found by a cheap pass (``_cheap_pass``), widened by the margin
        on each side."""
        coarse, found = self._cheap_pass(model, stack, idx, states, coords, opts.seed + 10_000, opts, "locating",
                                         progress, cancel)
        hit = coarse[found.reshape(len(coarse), -1).sum(1) >= 4]
        if len(hit) == 0:
            log.info("pre-pass found no %s; sampling every body slice", "organ")
            return idx
        margin = int(np.ceil(opts.prepass_margin_mm / self.model.config.grid_spacing[2]))
        lo, hi = hit.min() - margin, hit.max() + margin
        return idx[(idx >= lo) & (idx <= hi)]

    def _prepare(self, scan: Scan, prompt: str, opts: SegmentOptions) -> dict:
        """Prompt, modality, model grid, 2.5D stack and the body's slices."""
        opts.validate()
        res = self.resolve(prompt)
        if opts.modality == "auto":
            modality, reason = guess_modality(scan)
            if reason != "DICOM Modality tag":
                log.warning("modality assumed %s from the %s; pass --modality to override", modality, reason)
        else:
            modality, reason = opts.modality, "given"
            looks, why = guess_modality(scan)
            if looks != modality and not (modality == "CT" and stored_without_intercept(scan.image)):
                # said, not refused: the user may know better than the heuristic (or the DICOM tag)
                reason = f"given, though the scan looks like {looks}: {why}"
        ref, vol, reach, fov_cut = fitted_model_grid(scan.image, self.grid, modality, self.model.window_multiple())
        stack = context_slices(vol, self.model.config.context)
        # Slices with no body (air only) are not sampled: they cost time and can only add false positives.
        idx = body_slices(vol)
        if len(idx) == 0:
            raise InputError(f"{scan.path}: no body found in the scan (all voxels look like air/background).")
        model, adapter = self.model_for(modality)
        return dict(res=res, modality=modality, reason=reason, ref=ref, vol=vol, stack=stack, idx=idx, reach=reach, fov_cut=fov_cut,
                    coords=body_axis_coords(vol), states=self.text_states(res.organ), model=model, adapter=adapter)

    def segment(self, scan: Scan, prompt: str, options: SegmentOptions | None = None,
                progress: ProgressFn | None = None, cancel: threading.Event | None = None) -> SegmentResult:
        """N proposals of the prompted organ on the scan's grid, best-ranked first."""
        opts = options or SegmentOptions()
        t0 = time.time()
        with self.lock:
            p = self._prepare(scan, prompt, opts)
            timings = {"preprocess": time.time() - t0}
            seeds = [opts.seed + k for k in range(opts.proposals)]
            idx = p["idx"]
            t1 = time.time()
            if opts.prepass and len(idx) > 8:
                idx = self._organ_slab(p["model"], p["stack"], idx, p["states"], opts, progress, cancel, p["coords"])
            timings["prepass"] = time.time() - t1
            t1 = time.time()
            p["liver_offset_mm"] = self._liver_side(p, opts, progress, cancel)
            timings["side_check"] = time.time() - t1
            t1 = time.time()
            probs_body = sample_proposals(
                p["model"], p["stack"][idx], p["states"], seeds, steps=opts.steps,
                scheduler=opts.scheduler, device=self.device, batch_size=opts.batch_size, coords=p["coords"][idx],
                progress=(lambda d, t: progress("sampling", d, t)) if progress else None, cancel=cancel)
            timings["sampling"] = time.time() - t1
            timings["sampled_slices"] = float(len(idx))
        return self._finish(scan, prompt, p, opts, seeds, idx, probs_body, t0, timings)

    def _liver_side(self, p: dict, opts: SegmentOptions, progress: ProgressFn | None,
                    cancel: threading.Event | None) -> float | None:
        """For a kidney prompt, where the liver lies from the body's midline (mm, + = the patient's left), from
        a pass as cheap as the slab pre-pass (``_cheap_pass``). The model puts a
        "left kidney" on the scan's left whatever its header says, so only another organ can tell that the
        header swaps left and right; the liver, the largest and surest, is that organ. None for other prompts
        or where the model has no liver."""
        if p["res"].organ.name not in SIDED_BY_PROMPT or "liver" not in self.card.get("organs", []):
            return None
        _, found = self._cheap_pass(p["model"], p["stack"], p["idx"], self.text_states(self.vocabulary["liver"]),
                                    p["coords"], opts.seed + 20_000, opts, "checking sides", progress, cancel)
        # its largest region: on the sample CT mirrored in its header, +42 mm against +25 for the whole pass
        # mask, whose scattered false positives pull the centre toward the midline (-67 either way as acquired)
        liver = largest_region(found)
        sx, sy, sz = p["ref"].GetSpacing()
        if liver.sum() * sx * sy * sz * 2 / 1000 < LIVER_PROBE_MIN_ML:   # every other slice: each stands for two
            return None
        return midline_offset_mm(liver, p["ref"])

    def refine(self, scan: Scan, prompt: str, edited: np.ndarray, keep: np.ndarray, options: SegmentOptions | None = None,
               strength: float = 0.6, progress: ProgressFn | None = None,
               cancel: threading.Event | None = None) -> SegmentResult:
        """Re-sample around the expert's edits: proposals start from the edited mask noised by
        ``strength`` and match it exactly inside ``keep`` (both KJI arrays on the scan's grid)."""
        from .volume import array_to_image, label_to_model_grid

        opts = options or SegmentOptions()
        shape = sitk.GetArrayViewFromImage(scan.image).shape
        if edited.shape != shape or keep.shape != shape:
            raise InputError(f"The edited mask {edited.shape} and keep mask {keep.shape} must lie on the scan's grid {shape}; "
                             "save them from the same volume.")
        if not keep.any():
            raise InputError("The keep mask is empty: mark the voxels you corrected (or use segment for a fresh start).")
        t0 = time.time()
        with self.lock:
            p = self._prepare(scan, prompt, opts)
            timings = {"preprocess": time.time() - t0}
            e_grid = label_to_model_grid(array_to_image(edited.astype(np.uint8), scan.image), p["ref"]).astype(np.float32)
            k_grid = label_to_model_grid(array_to_image(keep.astype(np.uint8), scan.image), p["ref"])
            idx = p["idx"]
            near = np.nonzero((e_grid > 0).reshape(len(e_grid), -1).any(1) | k_grid.reshape(len(k_grid), -1).any(1))[0]
            if len(near):
                margin = int(np.ceil(opts.prepass_margin_mm / self.model.config.grid_spacing[2]))
                idx = idx[(idx >= near.min() - margin) & (idx <= near.max() + margin)]
            seeds = [opts.seed + k for k in range(opts.proposals)]
            t1 = time.time()
            probs_body = sample_proposals(
                p["model"], p["stack"][idx], p["states"], seeds, steps=opts.steps, scheduler=opts.scheduler,
                device=self.device, batch_size=opts.batch_size, init_mask=e_grid[idx], strength=strength,
                coords=p["coords"][idx],
                keep_mask=k_grid[idx], progress=(lambda d, t: progress("sampling", d, t)) if progress else None,
                cancel=cancel)
            timings["sampling"] = time.time() - t1
        return self._finish(scan, prompt, p, opts, seeds, idx, probs_body, t0, timings,
                            force=(keep.astype(bool), edited.astype(bool)))

    def _finish(self, scan: Scan, prompt: str, p: dict, opts: SegmentOptions, seeds: list[int], idx: np.ndarray,
                probs_body: np.ndarray, t0: float, timings: dict,
                force: tuple[np.ndarray, np.ndarray] | None = None) -> SegmentResult:
        """Back to the scan's grid, rank, consensus, uncertainty, measurements."""
        t2 = time.time()
        vol, ref = p["vol"], p["ref"]
        probs = np.zeros((opts.proposals,) + vol.shape, np.float32)
        probs[:, idx] = probs_body
        grid_masks = probs > 0.5
        if opts.keep_largest:
            probs, grid_masks = _keep_largest(probs, grid_masks)
        # Everything below works inside the box that can hold an organ voxel, then embeds it in the
        # scan's grid: on a 512x512x200 scan, whole-grid work was 8 of the 18 s on 2 CPU cores.
        box = organ_box(probs, ref, scan.image)
        if force is not None:
            keep, edited = force
            box = _union_box(box, bounding_box(keep & edited))
        block, box = masks_from_model_grid(probs, ref, scan.image, box)
        if force is not None:
            block[:, keep[box]] = edited[box][keep[box]]  # the expert's kept voxels, exactly
        usual = usual_agreement(p["model"].card, p["res"].organ.name)
        ranking = rank(block, usual)
        order = ranking.order
        block = block[order]
        fused, rule = engine_consensus(block, ranking.agreement)
        to_world = kji_to_world(scan.image)
        to_world[:3, 3] += to_world[:3, :3] @ np.array([s.start for s in box], float)
        masks = _embed(block, box, scan.image)
        timings["postprocess"] = time.time() - t2
        return SegmentResult(
            organ=p["res"].organ, prompt=prompt, similarity=p["res"].similarity, modality=p["modality"],
            modality_reason=p["reason"], image=scan.image, masks=masks, seeds=[seeds[i] for i in order],
            ranking=ranking, scores=[ranking.scores[i] for i in order],
            volumes_ml=volumes_ml(block, scan.voxel_volume_ml), consensus=_embed(fused, box, scan.image),
            uncertainty=_embed(uncertainty(block), box, scan.image), grid=ref, grid_image=vol,
            grid_masks=grid_masks[order], steps=opts.steps, scheduler=opts.scheduler, device=str(self.device),
            seconds=time.time() - t0, diameters_mm=[largest_diameter_mm(m, to_world) for m in block],
            adapter=p["adapter"], timings=timings, consensus_rule=rule,
            unseen_ends=ends_shown(grid_masks[order[0]], p["idx"],
                                   self.card.get("training", {}).get("unseen_organ_ends", {}).get(p["res"].organ.name, [])),
            window_cut=window_sides_cut(grid_masks[order[0]], ref, scan.image),
            median_hu=median_inside(scan.image, box, block[0]) if p["modality"] == "CT" else None,
            top_left_share=left_share_of_top(grid_masks[order[0]], ref) if p["res"].organ.name == "liver" else None,
            usual_agreement=usual, held_out_dice=held_out_dice(p["model"].card, p["res"].organ.name),
            midline_offset_mm=midline_offset_mm(grid_masks[order[0]], ref), liver_offset_mm=p.get("liver_offset_mm"),
            body_reach_mm=float(p["reach"][0]), body_fov_cut=bool(p["fov_cut"]))


def _training_metric(card: dict, organ: str, key: str) -> float | None:
    """The organ's ``key`` in the card's metrics of the dataset the model, or the adapter applied to it
    (``card["adapter"]``), was trained on, as ``evaluate --into-card`` recorded it; None where the card
    records none (a model never evaluated so, or an older card)."""
    c = card.get("adapter", card)
    value = c.get("metrics", {}).get(training_metrics_name(c), {}).get("organs", {}).get(organ, {}).get(key)
    return None if value is None else float(value)


def usual_agreement(card: dict, organ: str) -> float | None:
    """The organ's agreement (mean pairwise Dice of the proposals) on the model's (or adapter's) training
    dataset, recorded beside the Dice of its held-out part. It is over each whole scan, as segment's own
    agreement is: for the shipped model, the training scan, of which the held-out slab was scored."""
    return _training_metric(card, organ, "agreement")


def held_out_dice(card: dict, organ: str) -> float | None:
    """The organ's ranked-first Dice on the held-out part of the model's (or adapter's) training dataset."""
    return _training_metric(card, organ, "ranked_first_dice")


def median_inside(image: sitk.Image, box: tuple[slice, ...], mask: np.ndarray) -> float | None:
    """The image's median value where ``mask`` (the shape of ``box`` in the image's array) holds;
    None where it holds nothing. Read inside the box alone (a view, no copy of the scan): 0.06 s for a
    7 M-voxel proposal in a 512x512x300 scan on 2 CPU cores, against tens of seconds of sampling."""
    if is_empty(box) or not mask.any():
        return None
    return float(np.median(sitk.GetArrayViewFromImage(image)[box][mask]))


def left_share_of_top(mask: np.ndarray, ref: sitk.Image, top_mm: float = LIVER_TOP_MM) -> float | None:
    """The share of ``mask``'s voxels (Z, H, W on the model grid ``ref``, slices inferior -> superior) in its
    top ``top_mm`` that lie left of the body's midline: ``ref``'s centre column, since the grid is centred on
    the body's centre of mass (``volume.model_grid``) and its x grows to the patient's left (LPS). None
    for an empty mask."""
    rows = np.nonzero(mask.reshape(mask.shape[0], -1).any(1))[0]
    if not len(rows):
        return None
    n = max(1, int(round(top_mm / ref.GetSpacing()[2])))
    top = mask[max(rows[-1] - n + 1, 0):rows[-1] + 1]
    width = top.shape[-1]                                   # even (a multiple of 8): no column on the midline
    return float(top[..., width // 2:].sum() / top.sum())


def midline_offset_mm(mask: np.ndarray, ref: sitk.Image) -> float | None:
    """How far the centre of ``mask`` (Z, H, W on the model grid ``ref``) lies from the body's midline, in mm,
    + to the patient's left: from ``ref``'s centre column, as ``left_share_of_top`` reads it. None for an
    empty mask."""
    if not mask.any():
        return None
    cols = mask.sum(axis=(0, 1))
    x = float((np.arange(len(cols)) * cols).sum() / cols.sum())
    return (x - (len(cols) - 1) / 2) * ref.GetSpacing()[0]


#: The model grid's in-plane axes are world x and y (LPS): x grows to the patient's left, y to the back.
_WINDOW_SIDES = (("right", 0, 0), ("left", 0, -1), ("anterior", 1, 0), ("posterior", 1, -1))


def window_sides_cut(mask: np.ndarray, ref: sitk.Image, image: sitk.Image) -> list[str]:
    """The sides of the model's in-plane window (``ref``: a square centred on the body, 384 mm for the
    shipped model, widened for a wide body by ``volume.body_window``) where the organ ``mask`` (Z, H, W
    on ``ref``) reaches the window's edge while the scan goes on beyond it. The model sees nothing past
    that edge, so the proposals stop there whatever the organ does. With the window widened this is left
    for a body wider than the widest window, or one within the tolerance of the edge."""
    if not mask.any():
        return []
    lo, hi = physical_bounds(image)
    origin, spacing, size = np.array(ref.GetOrigin()), np.array(ref.GetSpacing()), np.array(ref.GetSize())
    far = origin + spacing * (size - 1)
    touches = {0: mask.any(axis=(0, 1)), 1: mask.any(axis=(0, 2))}  # per column (x), per row (y)
    out = []
    for side, axis, end in _WINDOW_SIDES:
        beyond = lo[axis] < origin[axis] - spacing[axis] / 2 if end == 0 else hi[axis] > far[axis] + spacing[axis] / 2
        if touches[axis][end] and beyond:
            out.append(side)
    return out


def ends_shown(mask: np.ndarray, body: np.ndarray, ends: list[str]) -> list[str]:
    """Those of ``ends`` ("inferior", "superior") where the organ ``mask`` (Z, H, W on the model grid,
    which runs inferior -> superior) stops inside the scan: the scan still holds body (``body``: the
    indices of the slices that do, ``volume.body_slices``) beyond its last slice on that side. Where
    the organ runs to the scan's edge, the scan cuts it off there, as the training scans did, and
    that end is not shown."""
    rows = np.nonzero(mask.reshape(mask.shape[0], -1).any(1))[0]
    if not len(rows) or not len(body):
        return []
    inside = {"inferior": rows[0] > body[0], "superior": rows[-1] < body[-1]}
    return [e for e in ends if inside.get(e, False)]


def _embed(block: np.ndarray, box: tuple[slice, ...], image: sitk.Image) -> np.ndarray:
    """``block`` (..., K, J, I) placed at ``box`` in zeros of the image's array shape."""
    out = np.zeros(block.shape[:-3] + tuple(image.GetSize()[::-1]), block.dtype)
    out[(Ellipsis,) + box] = block
    return out


def _union_box(a: tuple[slice, ...], b: tuple[slice, ...]) -> tuple[slice, ...]:
    """The smallest box holding both (an empty box holds nothing)."""
    boxes = [x for x in (a, b) if not is_empty(x)]
    if not boxes:
        return EMPTY_BOX
    return tuple(slice(min(x[d].start for x in boxes), max(x[d].stop for x in boxes)) for d in range(3))


def _keep_largest(probs: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keep each proposal's largest 3D connected component (26-connected): the vocabulary's organs
    are single connected structures, and stray islands only hurt."""
    out_m = np.zeros_like(masks)
    for i, m in enumerate(masks):
        if m.any():
            out_m[i] = largest_region(m, np.ones((3, 3, 3), bool))
    return probs * out_m, out_m
