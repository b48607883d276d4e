"""Bad input and faults: one clear error each, nothing half-written (docs/reliability.md)."""
import re
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import write_dicom_series
from progidiff import volume as volume_mod
from progidiff.cli import main
from progidiff.engine import MAX_PROPOSALS, SegmentOptions
from progidiff.errors import InputError, OutputError, ProGiDiffError
from progidiff.outputs import check_output_dir
from progidiff.sampling import sample_proposals
from progidiff.volume import read_scan, validate_image


def test_folder_without_dicom(tmp_path):
    (tmp_path / "notes.txt").write_text("x", encoding="utf-8")
    with pytest.raises(InputError, match="no DICOM"):
        read_scan(tmp_path)


def test_folder_with_several_series_lists_them(tmp_path, ct_crop, mr_path):
    write_dicom_series(sitk.ReadImage(str(ct_crop)), tmp_path / "mixed", "CT")
    import time

    time.sleep(0.01)  # a different series UID
    write_dicom_series(sitk.ReadImage(str(mr_path)), tmp_path / "mixed2", "MR")
    for f in (tmp_path / "mixed2").iterdir():
        f.rename(tmp_path / "mixed" / ("b_" + f.name))
    with pytest.raises(InputError, match="--series") as e:
        read_scan(tmp_path / "mixed")
    uid = str(e.value).split("(")[1].split(",")[0].strip()
    assert read_scan(tmp_path / "mixed", series=uid).image.GetDimension() == 3


def test_corrupt_dicom_file(tmp_path, ct_crop):
    folder = write_dicom_series(sitk.ReadImage(str(ct_crop))[:, :, :20], tmp_path / "dcm", "CT")
    victim = sorted(folder.iterdir())[5]
    victim.write_bytes(victim.read_bytes()[:400])
    with pytest.raises(InputError):
        read_scan(folder)


def _shift_slice(folder: Path, index: int, dz: float) -> None:
    """Move one slice of a written series along z by ``dz`` mm (its ImagePositionPatient tag)."""
    f = sorted(folder.iterdir())[index]
    sl = sitk.ReadImage(str(f))
    x, y, z = (float(v) for v in sl.GetMetaData("0020|0032").split("\\"))
    sl.SetMetaData("0020|0032", f"{x:.6f}\\{y:.6f}\\{z + dz:.6f}")
    w = sitk.ImageFileWriter()
    w.KeepOriginalImageUIDOn()
    w.SetFileName(str(f))
    w.Execute(sl)


def test_dicom_slices_unevenly_spaced_or_stacked_are_said_in_one_line(tmp_path, ct_crop, caplog, capfd):
    """ITK reads uneven slices as evenly spaced with a warning on stderr that names its C++ source; ProGiDiff says
    by how much the masks may be off, and refuses a series whose slices share a position (acquisitions mixed)."""
    import logging

    crop = sitk.ReadImage(str(ct_crop))[:, :, :20]
    uneven = write_dicom_series(crop, tmp_path / "uneven", "CT")
    _shift_slice(uneven, 10, 0.3 * crop.GetSpacing()[2])   # one slice 30 % of a slice nearer the next
    with caplog.at_level(logging.WARNING, logger="progidiff"):
        scan = read_scan(uneven)
    assert scan.image.GetSize()[2] == 20
    (msg,) = [r.getMessage() for r in caplog.records]
    assert re.search(r"the slices are 2\.\d\d to 3\.\d\d mm apart and are read \d\.\d\d mm apart: masks may lie up "
                     r"to \d\.\d mm off along the body", msg), msg
    assert "nonuniformity" not in capfd.readouterr().err
    stacked = write_dicom_series(crop, tmp_path / "stacked", "CT")
    _shift_slice(stacked, 10, -crop.GetSpacing()[2])   # slice 11 on slice 10
    with pytest.raises(InputError, match="two slices of the DICOM series lie at the same position"):
        read_scan(stacked)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="progidiff"):
        read_scan(write_dicom_series(crop, tmp_path / "even", "CT"))
    assert not caplog.records


def test_volume_too_large_is_refused_with_the_limit(monkeypatch):
    monkeypatch.setattr(volume_mod, "MAX_VOXELS", 1000)
    img = sitk.Image(20, 20, 20, sitk.sitkFloat32)
    with pytest.raises(InputError, match="more than the 1,000"):
        validate_image(img, "big")


def test_very_anisotropic_and_oblique_volume_is_accepted():
    arr = np.random.default_rng(0).normal(0, 200, (12, 64, 64)).astype(np.float32)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.5, 0.5, 10.0))
    img.SetDirection(sitk.VersorTransform((1.0, 0.0, 0.0), 0.4).GetMatrix())
    assert validate_image(img, "aniso").GetSize() == (64, 64, 12)


def test_output_path_that_is_a_file(tmp_path):
    f = tmp_path / "out"
    f.write_text("x", encoding="utf-8")
    with pytest.raises(OutputError, match="not a folder"):
        check_output_dir(f, overwrite=False)


class OomModel(torch.nn.Module):
    """Wraps a model and fails like a GPU out of memory above 4 items per call."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config
        self.latent_channels = inner.latent_channels
        self.latent_factor = inner.latent_factor
        self.calls = []

    def latent_size(self):
        return self.inner.latent_size()

    def encode_mask(self, m):
        return self.inner.encode_mask(m)

    def decode_mask(self, x):
        return self.inner.decode_mask(x)

    def forward(self, x, *a):
        self.calls.append(len(x))
        if len(x) > 4:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner(x, *a)


def test_out_of_memory_halves_the_batch(tiny_engine, monkeypatch):
    monkeypatch.setenv("PROGIDIFF_CPU_BF16", "0")  # exact comparison across batch sizes: fp32
    stack = np.random.default_rng(0).random((6, 3, 32, 32)).astype(np.float32)
    states = tiny_engine.text_states(tiny_engine.vocabulary["liver"])
    wrapped = OomModel(tiny_engine.model)
    a = sample_proposals(wrapped, stack, states, seeds=[0, 1], steps=2, batch_size=12)
    assert wrapped.calls[:3] == [12, 6, 3] and max(wrapped.calls[3:]) <= 3  # halved until it fits, then kept
    b = sample_proposals(tiny_engine.model, stack, states, seeds=[0, 1], steps=2, batch_size=4)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_out_of_memory_at_batch_one_gives_advice(tiny_engine):
    class AlwaysOom(OomModel):
        def forward(self, x, *a):
            raise RuntimeError("CUDA out of memory")

    states = tiny_engine.text_states(tiny_engine.vocabulary["liver"])
    with pytest.raises(ProGiDiffError, match="--device cpu"):
        sample_proposals(AlwaysOom(tiny_engine.model), np.zeros((2, 3, 32, 32), np.float32), states, [0], steps=1,
                         batch_size=2)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(-5, 200), steps=st.integers(-5, 2000), sched=st.sampled_from(["dpm++", "ddim", "euler", ""]),
       modality=st.sampled_from(["auto", "CT", "MR", "PET", ""]))
def test_option_validation_property(n, steps, sched, modality):
    opts = SegmentOptions(proposals=n, steps=steps, scheduler=sched, modality=modality)
    ok = 1 <= n <= MAX_PROPOSALS and 1 <= steps <= 1000 and sched in ("dpm++", "ddim") and modality in ("auto", "CT", "MR")
    if ok:
        opts.validate()
    else:
        with pytest.raises(InputError):
            opts.validate()


@settings(max_examples=40, deadline=None)
@given(args=st.lists(st.sampled_from(["--proposals", "--steps", "--seed", "x", "-3", "0", "abc", "--overwrite",
                                      "--device", "tpu", "--prompt"]), max_size=6))
def test_cli_never_tracebacks_on_odd_arguments(args):
    """Argument errors exit with argparse's code 2 or a ProGiDiffError code, never an exception."""
    try:
        rc = main(["segment", "missing.nii.gz", "-o", "/nonexistent-dir/out", *args])
    except SystemExit as e:
        rc = e.code
    assert rc in (2, 3, 4, 5)


def _under_file_size_limit(args: list[str], limit: int, cwd) -> subprocess.CompletedProcess:
    """``python ARGS`` with every file it writes limited to ``limit`` bytes (RLIMIT_FSIZE; Python
    ignores SIGXFSZ, so a write past it fails with EFBIG), as a full disk or a quota fails a write."""
    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, *args], capture_output=True, text=True, encoding="utf-8", errors="replace",
                          cwd=cwd, preexec_fn=limited, timeout=300)


def test_a_write_that_finds_no_room_is_one_line_and_leaves_nothing(tmp_path, tiny_model, ct_crop):
    """segment under a 100 kB file-size limit (its overview is larger): one line, exit 5, no output
    folder and no staging folder. Before, a traceback (PIL's OSError, exit 1)."""
    run = _under_file_size_limit(["-m", "progidiff.cli", "segment", str(ct_crop), "--prompt", "liver", "-n", "2",
                                  "--steps", "2", "--model", str(tiny_model), "-o", "out"], 100_000, tmp_path)
    assert run.returncode == 5, run.stderr[-1500:]
    assert "Traceback" not in run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("progidiff: error: out: File too large; nothing was written over."), last
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_mask_written_only_in_part_is_an_error_not_a_result(tmp_path):
    """SimpleITK's NIfTI writer prints "wrote only 0 of N bytes" and returns when the disk is full:
    write_mask must raise, or the truncated mask would be renamed into OUTDIR as a result."""
    from progidiff.outputs import nifti_gz_whole, write_mask

    rng = np.random.default_rng(0)
    mask = (rng.random((20, 64, 64)) > 0.5).astype(np.uint8)  # random: ~10 kB compressed
    like = sitk.GetImageFromArray(mask)
    write_mask(mask, like, tmp_path / "whole.nii.gz")
    data = (tmp_path / "whole.nii.gz").read_bytes()
    assert nifti_gz_whole(tmp_path / "whole.nii.gz", mask.nbytes)
    assert not nifti_gz_whole(tmp_path / "whole.nii.gz", mask.nbytes + 1)
    for cut in (10, 400, len(data) // 2, len(data) - 1):
        (tmp_path / "cut.nii.gz").write_bytes(data[:cut])
        assert not nifti_gz_whole(tmp_path / "cut.nii.gz", mask.nbytes), cut

    script = ("import sys, numpy as np, SimpleITK as sitk; from pathlib import Path; from progidiff.outputs import write_mask;"
              "m = np.load(sys.argv[1]); write_mask(m, sitk.GetImageFromArray(m), Path(sys.argv[2]))")
    np.save(tmp_path / "mask.npy", mask)
    # 8 kB: under the whole file's size (asserted), so the write is cut short
    assert len(data) > 8192
    run = _under_file_size_limit(["-c", script, str(tmp_path / "mask.npy"), str(tmp_path / "limited.nii.gz")], 8192,
                                 tmp_path)
    assert run.returncode != 0 and "written only in part" in run.stderr, run.stderr[-1500:]


def test_a_checkpoint_that_finds_no_room_keeps_the_last_and_says_resume(tmp_path, tiny_dataset):
    """torch.save under a file-size limit raises "unexpected pos 704 vs 598"; train says in one line
    to free space and --resume, and leaves no half-written checkpoint file."""
    run = _under_file_size_limit(["-m", "progidiff.cli", "train", str(tiny_dataset), "-o", "m", "--organs", "liver",
                                  "--stage1-steps", "3", "--stage2-steps", "2", "--batch-size", "2", "--workers", "0",
                                  "--checkpoint-every", "2"], 30_000, tmp_path)
    assert run.returncode == 5, run.stderr[-1500:]
    assert "Traceback" not in run.stderr
    assert "run the same command with --resume." in run.stderr.strip().splitlines()[-1]
    assert not list((tmp_path / "m" / "checkpoints").glob("*.tmp"))


def test_a_series_given_for_a_file_is_said_to_be_ignored(ct_crop, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="progidiff"):
        assert read_scan(ct_crop, series="1.2.3").image.GetDimension() == 3
    assert any("--series 1.2.3 is for a DICOM folder; this is a file" in r.getMessage() for r in caplog.records)
