"""The GPU code path, checked on the CPU: batch size from free memory, reduced precision,
and the benchmark report for a GPU run (no GPU is needed; the CUDA calls are stood in for);
and, where a CUDA GPU is visible, training and segmenting on it."""
from __future__ import annotations

import json

import pytest
import torch

from progidiff import sampling


def test_batch_from_free_memory_stays_within_the_8_gb_target(monkeypatch):
    gib = 1024 ** 3
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (70 * gib, 80 * gib))
    bs = sampling.auto_batch_size(torch.device("cuda"), 64 * 64)
    assert 512 <= bs <= 4096
    assert bs * 1.2e6 <= 8 * gib          # activations of one call stay under 8 GB
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 * gib, 80 * gib))
    small = sampling.auto_batch_size(torch.device("cuda"), 64 * 64)
    assert 1 <= small < bs                # a busy GPU gets a smaller batch, never zero
    assert sampling.auto_batch_size(torch.device("cpu"), 64 * 64) == 32


def test_cuda_runs_in_bf16():
    assert sampling.autocast_dtype(torch.device("cuda")) is torch.bfloat16


def test_oom_is_recognised_on_both_devices():
    assert sampling._is_oom(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert sampling._is_oom(torch.cuda.OutOfMemoryError("x"))
    assert not sampling._is_oom(RuntimeError("shape mismatch"))


def test_benchmark_report_of_a_gpu_run(tmp_path):
    from progidiff.bench import write_markdown

    rep = {"machine": "NVIDIA H100 80GB HBM3 (torch 2.13.0)", "model": "m", "input": "ct.nii.gz", "input_size": [122, 101, 112],
           "prompt": "liver",
           "denoiser": {"precision": "bfloat16", "evals_per_s": 9000.0, "gflops_per_eval": 2.0, "matmul_tflops": 700.0,
                        "fraction_of_matmul_peak": 0.026},
           "segment": [{"proposals": n, "seconds": 1.0 + n / 8, "denoiser_seconds": 0.5, "other_fraction": 0.5,
                        "sampled_slices": 37, "peak_rss_mb": 3000, "gpu_peak_mb": 2000} for n in (1, 4, 8, 16)],
           "naive": {"proposals": 8, "seconds": 400.0, "body_slices": 67, "steps": 50, "how": "x"},
           "speedup_vs_naive_n8": 200.0,
           "volume_size": [{"size": [512, 512, 200], "voxels": 52428800, "proposals": 8, "seconds": 4.2, "denoiser_seconds": 0.6,
                            "other_fraction": 0.86, "peak_rss_mb": 5000, "gpu_peak_mb": 2100}],
           "peak_rss_mb": 5000}
    out = tmp_path / "bench.md"
    write_markdown(rep, out)
    md = out.read_text(encoding="utf-8")
    assert "--device cuda" in md and "| 512×512×200 | 4.2 |" in md and "| 2100 |" in md
    assert "--out docs/bench.md" in md and "](bench.png)" in md  # its own plot, and the command that writes it
    assert out.with_suffix(".png").stat().st_size > 1000 and "first segmentation" not in md
    write_markdown({**rep, "first_call_seconds": 2.9}, out)
    assert "The first segmentation after loading the model (1 proposal, written out) took 2.9 s" in out.read_text(encoding="utf-8")
    json.dumps(rep)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run where one is lent)")
def test_training_and_segmenting_on_a_gpu(tmp_path, tiny_dataset):
    """On a real GPU: both trainers in bf16 (accelerate hands their batches over on the GPU) and
    segment with the result. Training on CUDA once failed on its first step: the prompt table
    lives on the CPU. CI has no GPU and skips this; it ran on an H100 lent to a session."""
    from progidiff.engine import Engine, SegmentOptions
    from progidiff.train import TrainConfig, train
    from progidiff.volume import read_scan

    tiny = dict(organs=("liver", "kidney_left"), stage1_steps=2, stage2_steps=3, batch_size=4, grid_size=32,
                grid_spacing=(12.0, 12.0, 10.0), channels=(8, 16, 16, 16), encoder_channels=(8, 8, 8), workers=0,
                mixed_precision="bf16")
    for kind in (None, "unet"):
        out = tmp_path / f"m-{kind}"
        train(TrainConfig(dataset=str(tiny_dataset), output=str(out), baseline=kind, **tiny), progress=False)
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(True)  # the next Accelerator may have other settings
    card = json.loads((tmp_path / "m-None" / "model_card.json").read_text(encoding="utf-8"))
    assert card["training"]["device"].startswith("cuda") and card["training"]["config"]["mixed_precision"] == "bf16"
    scan = read_scan(tiny_dataset / "imagesTr" / "case_001_0000.nii.gz")
    result = Engine(tmp_path / "m-None", device="cuda").segment(scan, "liver", SegmentOptions(proposals=2))
    assert result.masks.shape[0] == 2
