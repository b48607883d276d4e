"""Shared fixtures: real data from ../shared/data and Resources/, small crops of it,
and a tiny model trained on a real crop (so no test runs on random weights)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SAMPLE_CT = REPO / "Resources" / "SampleData" / "sample-ct-abdomen.nii.gz"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def shared(*parts: str) -> Path:
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.fail(f"{p} is missing: the tests need ../shared/data beside the checkout (see README)")
    return p


@pytest.fixture(scope="session")
def ct_path() -> Path:
    return shared("ct-abdomen", "imagesTr", "tsct_001_0000.nii.gz")


@pytest.fixture(scope="session")
def ct_label_path() -> Path:
    return shared("ct-abdomen", "labelsTr", "tsct_001.nii.gz")


@pytest.fixture(scope="session")
def mr_path() -> Path:
    return shared("mr-abdomen", "imagesTr", "tsmr_001_0000.nii.gz")


def upper_abdomen(image: sitk.Image) -> sitk.Image:
    """The liver/kidney part of the sample CT (slices 62..111 of 112), a quick real test volume."""
    return image[:, :, 62:112]


@pytest.fixture(scope="session")
def ct_crop(tmp_path_factory, ct_path) -> Path:
    out = tmp_path_factory.mktemp("data") / "ct_crop.nii.gz"
    sitk.WriteImage(upper_abdomen(sitk.ReadImage(str(ct_path))), str(out))
    return out


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory, ct_path, ct_label_path) -> Path:
    """An nnU-Net-style dataset of one real, cropped CT with its labels."""
    import json

    root = tmp_path_factory.mktemp("tiny_ds")
    (root / "imagesTr").mkdir()
    (root / "labelsTr").mkdir()
    sitk.WriteImage(upper_abdomen(sitk.ReadImage(str(ct_path))), str(root / "imagesTr" / "case_001_0000.nii.gz"))
    sitk.WriteImage(upper_abdomen(sitk.ReadImage(str(ct_label_path))), str(root / "labelsTr" / "case_001.nii.gz"))
    meta = json.loads(shared("ct-abdomen", "dataset.json").read_text(encoding="utf-8"))
    (root / "dataset.json").write_text(json.dumps({"labels": meta["labels"], "channel_names": {"0": "CT"}}), encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tiny_dataset) -> Path:
    """A tiny model trained for a few steps on the real crop (CPU, ~20 s)."""
    from progidiff.train import TrainConfig, train

    out = tmp_path_factory.mktemp("models") / "tiny"
    cfg = TrainConfig(dataset=str(tiny_dataset), output=str(out), organs=("liver", "kidney_left"),
                      stage1_steps=4, stage2_steps=6, batch_size=4, grid_size=32, grid_spacing=(12.0, 12.0, 10.0),
                      channels=(8, 16, 16, 16), encoder_channels=(8, 8, 8), workers=0, checkpoint_every=3)
    train(cfg, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_engine(tiny_model):
    from progidiff.engine import Engine

    return Engine(tiny_model, device="cpu")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else 2.0 * float((a & b).sum()) / float(s)


def quick_segment(scan: Path, prompt: str, out: Path, model: Path | None = None) -> dict:
    """``progidiff segment`` with 2 proposals of 1 step on the CPU, as CT; its report.json."""
    import json

    from progidiff import cli

    args = ["segment", str(scan), "--prompt", prompt, "-n", "2", "--steps", "1", "--device", "cpu", "--modality", "CT"]
    assert cli.main(args + (["--model", str(model)] if model else []) + ["-o", str(out)]) == 0
    return json.loads((out / "report.json").read_text(encoding="utf-8"))


def write_dicom_series(image: sitk.Image, folder: Path, modality: str = "CT") -> Path:
    """Write a 3D image as a DICOM series (int16 slices with position/orientation tags)."""
    import time

    folder.mkdir(parents=True, exist_ok=True)
    img = sitk.Cast(image, sitk.sitkInt16)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    d = img.GetDirection()
    uid = "1.2.826.0.1.3680043.2.1125." + str(int(time.time() * 1000))
    tags = [("0008|0060", modality), ("0020|000e", uid + ".1"), ("0020|000d", uid), ("0008|0008", "ORIGINAL\\PRIMARY\\AXIAL"),
            ("0020|0037", "\\".join(f"{v:.6f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))),
            ("0008|103e", "test series"), ("0010|0010", "Test^Patient")]
    for i in range(img.GetDepth()):
        sl = img[:, :, i]
        for k, v in tags:
            sl.SetMetaData(k, v)
        pos = img.TransformIndexToPhysicalPoint((0, 0, i))
        sl.SetMetaData("0020|0032", "\\".join(f"{v:.6f}" for v in pos))
        sl.SetMetaData("0020|0013", str(i + 1))
        sl.SetMetaData("0018|0050", f"{img.GetSpacing()[2]:.6f}")
        writer.SetFileName(str(folder / f"slice_{i:04d}.dcm"))
        writer.Execute(sl)
    return folder


@pytest.fixture(scope="session")
def shipped_model() -> Path:
    from progidiff.engine import default_model_dir

    return default_model_dir()


@pytest.fixture(scope="session")
def engine(shipped_model):
    from progidiff.engine import Engine

    return Engine(shipped_model, device="cpu")


# The Slicer module's helper package (ProGiDiffSlicerLib) sits beside the engine.
import sys as _sys  # noqa: E402

_sys.path.insert(0, str(REPO / "ProGiDiffSlicer"))


@pytest.fixture(scope="session")
def tiny_mr_dataset(tmp_path_factory, mr_path) -> Path:
    import json
    import shutil

    root = tmp_path_factory.mktemp("tiny_mr")
    (root / "imagesTr").mkdir()
    (root / "labelsTr").mkdir()
    shutil.copy(mr_path, root / "imagesTr" / "mr_001_0000.nii.gz")
    shutil.copy(shared("mr-abdomen", "labelsTr", "tsmr_001.nii.gz"), root / "labelsTr" / "mr_001.nii.gz")
    meta = json.loads(shared("mr-abdomen", "dataset.json").read_text(encoding="utf-8"))
    (root / "dataset.json").write_text(json.dumps({"labels": meta["labels"], "channel_names": {"0": "MR"}}), encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def tiny_adapter(tmp_path_factory, tiny_model, tiny_mr_dataset) -> Path:
    from progidiff.adapt import AdaptConfig, adapt

    out = tmp_path_factory.mktemp("adapters") / "tiny-mr-lora"
    adapt(AdaptConfig(dataset=str(tiny_mr_dataset), base=str(tiny_model), output=str(out), shots=10, rank=2,
                      steps=4, batch_size=4), progress=False)
    return out


def interrupt(args: list[str], cwd, sig, when: str, group: bool = False) -> tuple[int, str, str]:
    """Run ``python ARGS``, send ``sig`` once its stderr matches ``when``: (exit code, stderr up to the
    signal, stderr after it). ``group``: to its whole process group, as a terminal's Ctrl-C reaches a
    command and the worker processes it started."""
    proc = subprocess.Popen([sys.executable, *args], stderr=subprocess.PIPE, text=True, encoding="utf-8",
                            errors="replace", cwd=cwd, start_new_session=group)
    seen = ""
    deadline = time.time() + 240
    while time.time() < deadline:
        c = proc.stderr.read(1)
        seen += c
        if not c or re.search(when, seen):
            break
    if group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    # communicate, not wait: it drains stderr, so a full pipe cannot block the child's exit
    # (subprocess's documented deadlock with wait() and PIPE).
    rest = proc.communicate(timeout=120)[1]
    return proc.returncode, seen, rest
