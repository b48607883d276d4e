"""``progidiff bench``: speed and memory, measured side by side on the shipped sample CT.

(a) the denoiser alone: slice-evaluations/s, FLOPs per evaluation, the device's measured
    matmul rate, and the fraction of it reached; (b) end-to-end ``segment`` seconds for
    N = 1, 4, 8, 16; (c) the naive way (one slice, one proposal at a time, 50 DDIM steps,
    every body slice); (d) peak memory; optionally (e) ranked-first Dice against steps.
"""
from __future__ import annotations

import json
import logging
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .engine import Engine, SegmentOptions, SegmentResult
from .errors import InputError
from .sampling import autocast_dtype
from .volume import body_axis_coords, body_slices, context_slices, guess_modality, read_scan

log = logging.getLogger(__name__)

SAMPLE_CT = Path(__file__).resolve().parents[2] / "Resources" / "SampleData" / "sample-ct-abdomen.nii.gz"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def matmul_rate(device: torch.device) -> float:
    """Measured FLOP/s of a large matrix product in the precision the denoiser runs in (autocast_dtype):
    bf16 on CUDA and on CPUs that compute it natively, else fp32. Against fp32 the bf16 denoiser on a
    2-core EPYC with AMX read 116 % of the peak: that CPU multiplies bf16 at 1,014 GFLOP/s, fp32 at 228."""
    n = 2048 if device.type == "cpu" else 8192
    dtype = autocast_dtype(device) or torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    reps = 5 if device.type == "cpu" else 20
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def denoiser_throughput(engine: Engine, batch: int, seconds: float = 8.0) -> tuple[float, float]:
    """(slice-evaluations per second at ``batch``, FLOPs per evaluation)."""
    from torch.utils.flop_counter import FlopCounterMode

    m = engine.model
    dev = engine.device
    h, w = m.latent_size()
    c = m.config.image_channels
    states = engine.text_states(engine.vocabulary.organs[0])
    x = torch.randn(batch, m.latent_channels, h, w, device=dev)
    img = torch.rand(batch, c, h * m.latent_factor, w * m.latent_factor, device=dev)
    t = torch.full((batch,), 500, device=dev)
    s = (states[0].to(dev).expand(batch, -1, -1), states[1].to(dev).expand(batch, -1))
    dtype = autocast_dtype(dev)
    amp = dict(device_type=dev.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)
    with torch.inference_mode(), torch.autocast(**amp):
        with FlopCounterMode(display=False) as fc:
            m(x[:1], t[:1], (s[0][:1], s[1][:1]), img[:1])
        flops = float(fc.get_total_flops())
        for _ in range(2):
            m(x, t, s, img)
        _sync(dev)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            m(x, t, s, img)
            n += batch
        _sync(dev)
        rate = n / (time.perf_counter() - t0)
    return rate, flops


def naive_seconds(engine: Engine, scan, prompt: str, proposals: int) -> tuple[float, int]:
    """The naive way, measured for one proposal over every body slice (50 DDIM steps, batch 1);
    proposals are independent runs in that scheme, so N proposals take N times as long."""
    from .sampling import sample_proposals
    from .volume import on_model_grid

    t0 = time.perf_counter()
    res = engine.resolve(prompt)
    ref, vol = on_model_grid(scan.image, engine.grid, "CT")
    stack = context_slices(vol, engine.model.config.context)
    idx = body_slices(vol)
    coords = body_axis_coords(vol)
    states = engine.text_states(res.organ)
    for z in idx:
        sample_proposals(engine.model, stack[z:z + 1], states, [0], steps=50, scheduler="ddim",
                         device=engine.device, batch_size=1, coords=coords[z:z + 1])
    one = time.perf_counter() - t0
    return one * proposals, len(idx)


def _segment_written(engine: Engine, path: Path, prompt: str, opts: SegmentOptions) -> tuple[SegmentResult, float]:
    """Read ``path``, segment it and write every output to a temporary folder (removed again):
    the result and the seconds all of that took."""
    from .segment import write_result

    t0 = time.perf_counter()
    res = engine.segment(read_scan(path), prompt, opts)
    with tempfile.TemporaryDirectory() as tmp:
        write_result(res, engine, Path(tmp) / "out")
    return res, time.perf_counter() - t0


def run_bench(device: str = "auto", model: str | None = None, out_md: Path | None = None, json_path: Path | None = None,
              quality_dataset: str | None = None, prompt: str = "liver") -> dict:
    engine = Engine(model, device=device)
    dev = engine.device
    scan = read_scan(SAMPLE_CT)
    rep: dict = {"machine": _machine(dev), "model": engine.model_dir.name, "input": SAMPLE_CT.name,
                 "input_size": list(scan.image.GetSize()), "prompt": prompt}
    rate, flops = denoiser_throughput(engine, batch=32 if dev.type == "cpu" else 512)
    peak = matmul_rate(dev)
    rep["denoiser"] = {"precision": str(autocast_dtype(dev) or torch.float32).replace("torch.", ""), "evals_per_s": rate, "gflops_per_eval": flops / 1e9, "matmul_tflops": peak / 1e12,
                       "fraction_of_matmul_peak": rate * flops / peak}
    # The first call after loading pays one-off costs (memory pools, kernel choice; on the H100 its N=1
    # took 2.9 s against 1.2 s for N=4 after it): timed apart, so that the rows compare like with like.
    rep["first_call_seconds"] = _segment_written(engine, SAMPLE_CT, prompt, SegmentOptions(proposals=1))[1]
    runs = []
    for n in (1, 4, 8, 16):
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        res, total = _segment_written(engine, SAMPLE_CT, prompt, SegmentOptions(proposals=n))
        denoise = res.timings.get("sampling", 0) + res.timings.get("prepass", 0)
        runs.append({"proposals": n, "seconds": total, "denoiser_seconds": denoise,
                     "other_fraction": 1 - denoise / total, "sampled_slices": res.timings.get("sampled_slices"),
                     "peak_rss_mb": peak_rss_mb(),
                     "gpu_peak_mb": torch.cuda.max_memory_allocated() / 2 ** 20 if dev.type == "cuda" else None})
        log.info("N=%d: %.1fs", n, total)
    rep["segment"] = runs
    naive8, slices = naive_seconds(engine, scan, prompt, 8)
    rep["naive"] = {"proposals": 8, "seconds": naive8, "body_slices": slices, "steps": 50,
                    "how": "one proposal measured over every body slice at batch 1, times 8"}
    fast8 = next(r for r in runs if r["proposals"] == 8)["seconds"]
    rep["speedup_vs_naive_n8"] = naive8 / fast8
    rep["volume_size"] = size_sweep(engine, prompt, proposals=8)
    if quality_dataset:
        rep["quality_vs_steps"] = quality_curve(engine, quality_dataset, prompt)
    rep["peak_rss_mb"] = peak_rss_mb()
    if json_path:
        Path(json_path).write_text(json.dumps(rep, indent=2), encoding="utf-8")
    if out_md:
        write_markdown(rep, Path(out_md))
    return rep


#: Input grids for the size sweep: the sample CT resampled over its own physical extent, so the
#: model-grid work is the same and the growth is what reading, resampling back and writing cost.
SWEEP_SIZES = ((256, 256, 150), (512, 512, 200))


def resampled_sample(size: tuple[int, int, int], path: Path) -> Path:
    """The sample CT resampled (linear) to ``size`` voxels over the same physical extent, written to ``path``."""
    import SimpleITK as sitk

    img = sitk.ReadImage(str(SAMPLE_CT))
    extent = [n * s for n, s in zip(img.GetSize(), img.GetSpacing())]
    spacing = [e / n for e, n in zip(extent, size)]
    origin = img.TransformContinuousIndexToPhysicalPoint([-0.5 + 0.5 * sp / s for sp, s in zip(spacing, img.GetSpacing())])
    out = sitk.Resample(img, list(size), sitk.Transform(), sitk.sitkLinear, origin, spacing, img.GetDirection(), -1024.0,
                        sitk.sitkInt16)
    sitk.WriteImage(out, str(path))
    return path


def size_sweep(engine: Engine, prompt: str, proposals: int = 8, sizes=SWEEP_SIZES) -> list[dict]:
    """End-to-end seconds (read the file, segment, write every output) against the input's voxel count."""
    from .segment import write_result

    dev = engine.device
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        files = [(tuple(read_scan(SAMPLE_CT).image.GetSize()), SAMPLE_CT)]
        files += [(s, resampled_sample(s, Path(tmp) / f"ct_{'x'.join(map(str, s))}.nii.gz")) for s in sizes]
        for size, path in files:
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            res = engine.segment(read_scan(path), prompt, SegmentOptions(proposals=proposals))
            write_result(res, engine, Path(tmp) / f"out_{'x'.join(map(str, size))}")
            total = time.perf_counter() - t0
            denoise = res.timings.get("sampling", 0) + res.timings.get("prepass", 0)
            out.append({"size": list(size), "voxels": int(np.prod(size)), "proposals": proposals, "seconds": total,
                        "denoiser_seconds": denoise, "other_fraction": 1 - denoise / total, "peak_rss_mb": peak_rss_mb(),
                        "gpu_peak_mb": torch.cuda.max_memory_allocated() / 2 ** 20 if dev.type == "cuda" else None})
            log.info("size %s: %.1fs", size, total)
    return out


def quality_curve(engine: Engine, dataset: str, prompt: str, proposals: int = 4,
                  steps_list=(1, 2, 4, 8, 16, 50)) -> list[dict]:
    """Ranked-first Dice on the held-out slab against the number of DPM-Solver++ steps."""
    import SimpleITK as sitk

    from .data import z_ranges
    from .datasets import read_dataset, read_label
    from .label_names import organ_label_values, organ_mask
    from .evaluate import dice_hd95, slab_mask

    info = read_dataset(dataset)
    entry = next((c for c in info.cases if c.label is not None), None)
    if entry is None:
        raise InputError(f"{dataset}: no case has a label file in labelsTr/; --quality scores against the labels.")
    scan = read_scan(entry.image)
    organ = engine.resolve(prompt).organ
    label = sitk.GetArrayFromImage(read_label(entry, scan.image, info.labels,
                                              organ_label_values(info.labels, engine.vocabulary, organ.name)))
    slabs = z_ranges(engine.card.get("training", {}).get("holdout_z_mm", {}).get(entry.name, []))
    keep = slab_mask(scan.image, slabs) if slabs else np.ones(label.shape, bool)
    ref = organ_mask(label, scan.image, info.labels, engine.vocabulary, organ.name, guess_modality(scan)[0]) & keep
    engine.segment(scan, prompt, SegmentOptions(proposals=proposals, steps=1))  # untimed: this scan's first call
    out = []
    for steps in steps_list:
        t0 = time.perf_counter()
        res = engine.segment(scan, prompt, SegmentOptions(proposals=proposals, steps=steps))
        d, _ = dice_hd95(res.masks[0] & keep, ref, tuple(scan.image.GetSpacing()[::-1]))
        out.append({"steps": steps, "dice_ranked_first": d, "seconds": time.perf_counter() - t0})
        log.info("steps=%d dice=%.3f", steps, d)
    return out


def _machine(dev: torch.device) -> str:
    import os

    if dev.type == "cuda":
        return f"{torch.cuda.get_device_name(dev)} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8", errors="replace"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def _timing_row(first, r: dict, *middle: str) -> str:
    """One table row: first cell, seconds, denoiser seconds, non-denoiser share, [middle cells], RSS, GPU peak."""
    gpu = f"{r['gpu_peak_mb']:.0f}" if r.get("gpu_peak_mb") else "–"
    cells = [str(first), f"{r['seconds']:.1f}", f"{r['denoiser_seconds']:.1f}", f"{r['other_fraction']:.0%}", *middle,
             f"{r['peak_rss_mb']:.0f}", gpu]
    return "| " + " | ".join(cells) + " |"


def write_markdown(rep: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    d = rep["denoiser"]
    lines = [f"# Benchmarks — {rep['machine']}", "",
             f"Model `{rep['model']}`, input `{rep['input']}` ({'×'.join(map(str, rep['input_size']))} voxels), "
             f"prompt `{rep['prompt']}`. Measured by `progidiff bench --device {'cuda' if 'cuda' in rep['machine'].lower() or 'nvidia' in rep['machine'].lower() else 'cpu'}"
             f" --quality ../shared/data/ct-abdomen"
             + ("" if path.as_posix().endswith("docs/benchmarks.md") else f" --out docs/{path.name}") + "`.", "",
             "## Denoiser alone", "",
             "| precision | slice-evaluations/s | GFLOP per evaluation | measured matmul rate in that precision | fraction of it |",
             "|---|---|---|---|---|",
             f"| {d.get('precision', 'float32')} | {d['evals_per_s']:.1f} | {d['gflops_per_eval']:.3f} | "
             f"{d['matmul_tflops'] * 1000:.1f} GFLOP/s | {d['fraction_of_matmul_peak']:.0%} |", "",
             "## End to end (`segment`: read, locate, sample, resample, rank, write every output)", "",
             "| proposals N | seconds | denoiser seconds | non-denoiser share | slices sampled | peak RSS MB | GPU peak MB |",
             "|---|---|---|---|---|---|---|"]
    lines += [_timing_row(r["proposals"], r, f"{r['sampled_slices']:.0f}") for r in rep["segment"]]
    if "first_call_seconds" in rep:
        lines += ["", f"These rows are later calls. The first segmentation after loading the model (1 proposal, written "
                      f"out) took {rep['first_call_seconds']:.1f} s: one-off costs such as memory pools and kernel choice."]
    n8 = next((r for r in rep["segment"] if r["proposals"] == 8), None)
    if n8 is not None:
        gpu = "cuda" in rep["machine"].lower() or "nvidia" in rep["machine"].lower()
        big = next((r for r in rep.get("volume_size", []) if r["size"] == [512, 512, 200]), None)
        lines += ["", "Against the targets (issue #6): "
                  + (f"8 proposals on 512×512×200 in **{big['seconds']:.1f} s** (target ≤ 5 s) with "
                     f"**{big['gpu_peak_mb'] / 1024:.1f} GB** GPU memory (≤ 8 GB); " if gpu and big else
                     f"8 proposals in **{n8['seconds']:.1f} s** (target ≤ 60 s), peak RSS **{n8['peak_rss_mb'] / 1024:.2f} GB** "
                     f"(≤ 4 GB), non-denoiser share **{n8['other_fraction']:.0%}** (≤ 25 %); ")
                  + f"**{rep['speedup_vs_naive_n8']:.1f}×** faster than the naive way (≥ 10×)."]
    nv = rep["naive"]
    lines += ["", f"Naive way (one slice, one proposal at a time, 50 DDIM steps, all {nv['body_slices']} body slices): "
              f"**{nv['seconds']:.0f} s** for 8 proposals ({nv['how']}); ProGiDiff's default path is "
              f"**{rep['speedup_vs_naive_n8']:.1f}×** faster.", ""]
    if rep.get("volume_size"):
        lines += [f"## Against input size ({rep['volume_size'][0]['proposals']} proposals; the sample CT resampled over "
                  "its own extent, so the model-grid work is the same)", "",
                  "| input voxels | seconds | denoiser seconds | non-denoiser share | peak RSS MB (process so far) | GPU peak MB |",
                  "|---|---|---|---|---|---|"]
        lines += [_timing_row("×".join(map(str, r["size"])), r) for r in rep["volume_size"]]
        lines.append("")
    if rep.get("quality_vs_steps"):
        lines += ["## Quality against steps (ranked-first Dice, liver, held-out slab, 4 proposals, DPM-Solver++)", "",
                  "| steps | Dice | seconds |", "|---|---|---|"]
        lines += [f"| {q['steps']} | {q['dice_ranked_first']:.3f} | {q['seconds']:.1f} |" for q in rep["quality_vs_steps"]]
    lines += ["", f"Peak RSS of the whole benchmark process: {rep['peak_rss_mb']:.0f} MB.", "",
              f"![time against N, input size and steps]({path.with_suffix('.png').name})", ""]
    path.write_text("\n".join(lines), encoding="utf-8")
    ncol = 1 + bool(rep.get("quality_vs_steps")) + bool(rep.get("volume_size"))
    fig, axes = plt.subplots(1, ncol, figsize=(4.5 * ncol, 3.4), squeeze=False)
    ax = axes[0, 0]
    ns = [r["proposals"] for r in rep["segment"]]
    ax.plot(ns, [r["seconds"] for r in rep["segment"]], "o-", label="ProGiDiff segment")
    ax.plot([8], [nv["seconds"]], "x", color="C3", label="naive (8 proposals)")
    ax.set_xlabel("proposals N")
    ax.set_ylabel("seconds, end to end")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    col = 1
    if rep.get("volume_size"):
        ax3 = axes[0, col]
        col += 1
        vs = rep["volume_size"]
        ax3.plot([r["voxels"] / 1e6 for r in vs], [r["seconds"] for r in vs], "o-", label="end to end")
        ax3.plot([r["voxels"] / 1e6 for r in vs], [r["denoiser_seconds"] for r in vs], "s--", label="denoiser")
        ax3.set_xlabel(f"input voxels (millions), N = {vs[0]['proposals']}")
        ax3.set_ylabel("seconds")
        ax3.grid(alpha=0.3)
        ax3.legend(fontsize=8)
    if rep.get("quality_vs_steps"):
        ax2 = axes[0, col]
        q = rep["quality_vs_steps"]
        ax2.plot([x["steps"] for x in q], [x["dice_ranked_first"] for x in q], "o-")
        ax2.set_xscale("log")
        ax2.set_xlabel("steps")
        ax2.set_ylabel("ranked-first Dice (liver)")
        ax2.grid(alpha=0.3)
    fig.suptitle(rep["machine"], fontsize=8)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=100)
    plt.close(fig)
