"""`progidiff segment` end to end with the shipped model on real CT."""
import json
import re
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import nrrd
import numpy as np
import pytest
import SimpleITK as sitk

from conftest import dice, interrupt, write_dicom_series
from progidiff.cli import main
from progidiff.engine import SegmentOptions
from progidiff.outputs import REPORT_KEYS
from progidiff.proposals import engine_consensus
from progidiff.volume import find_inputs, read_scan

FAST = ["--proposals", "3", "--steps", "3"]


def test_output_contract(ct_crop, tmp_path, shipped_model):
    out = tmp_path / "out"
    assert main(["segment", str(ct_crop), "--prompt", "hepatic", *FAST, "--model", str(shipped_model), "-o", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["consensus.nii.gz", "overview.png", "proposal_01.nii.gz", "proposal_02.nii.gz",
                            "proposal_03.nii.gz", "proposals.seg.nrrd", "report.json", "uncertainty.nii.gz"])
    ref = sitk.ReadImage(str(ct_crop))
    for name in names:
        if name.endswith(".nii.gz"):
            img = sitk.ReadImage(str(out / name))
            assert img.GetSize() == ref.GetSize()
            assert np.allclose(img.GetOrigin(), ref.GetOrigin()) and np.allclose(img.GetDirection(), ref.GetDirection())
            assert np.allclose(img.GetSpacing(), ref.GetSpacing())
    p1 = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "proposal_01.nii.gz")))
    assert p1.dtype == np.uint8 and set(np.unique(p1)) <= {0, 1}
    unc = sitk.ReadImage(str(out / "uncertainty.nii.gz"))
    assert unc.GetPixelID() == sitk.sitkFloat32
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert set(REPORT_KEYS) <= set(report)
    assert report["organ"] == "liver" and report["modality"] == "CT"
    assert [p["rank"] for p in report["proposals"]] == [1, 2, 3]
    scores = [p["score"] for p in report["proposals"]]
    assert scores == sorted(scores, reverse=True)
    # a real liver: tens of mL at least in this upper-abdomen crop
    assert report["proposals"][0]["volume_ml"] > 100
    data, header = nrrd.read(str(out / "proposals.seg.nrrd"))
    assert data.shape == (3,) + ref.GetSize()
    assert header["Segment0_Name"].startswith("Liver") and "10200004" in header["Segment0_Tags"]
    np.testing.assert_array_equal(data[0].transpose(2, 1, 0), p1)
    # consensus.nii.gz is the engine's consensus of the written proposals, by the rule report.json names
    ranked = np.stack([sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"proposal_0{k}.nii.gz"))) > 0 for k in (1, 2, 3)])
    fused, rule = engine_consensus(ranked, report["agreement"])
    assert report["consensus_rule"] == rule
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "consensus.nii.gz"))) > 0, fused)


def _on(reference: sitk.Image, mask_path: Path) -> np.ndarray:
    m = sitk.ReadImage(str(mask_path))
    return sitk.GetArrayFromImage(sitk.Resample(m, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0)) > 0


def test_same_masks_from_dicom_and_reoriented_nifti(ct_crop, tmp_path, engine):
    """DICOM folder and NIfTI copies stored RAS, LPS, permuted and flipped give the same masks in world space."""
    from progidiff.segment import write_result

    original = sitk.ReadImage(str(ct_crop))
    inputs = {"dicom": write_dicom_series(original, tmp_path / "dicom")}
    for order in ("LPS", "RAS", "SAR", "PIL"):
        p = tmp_path / f"{order}.nii.gz"
        sitk.WriteImage(sitk.DICOMOrient(original, order), str(p))
        inputs[order] = p
    ref = sitk.ReadImage(str(inputs["LPS"]))
    masks = {}
    opts = SegmentOptions(proposals=2, steps=3, seed=5)
    for name, path in inputs.items():
        result = engine.segment(read_scan(path), "liver", opts)
        write_result(result, engine, tmp_path / f"out_{name}")
        masks[name] = _on(ref, tmp_path / f"out_{name}" / "proposal_01.nii.gz")
    assert masks["LPS"].sum() > 1000
    for name, m in masks.items():
        assert dice(m, masks["LPS"]) >= 0.99, name


def test_existing_results_are_refused_unless_overwrite(ct_crop, tmp_path, shipped_model, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("{}", encoding="utf-8")
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    rc = main(["segment", str(ct_crop), "--prompt", "liver", "--proposals", "1", "--steps", "1",
               "--model", str(shipped_model), "-o", str(out)])
    assert rc == 5 and "--overwrite" in capsys.readouterr().err
    assert (out / "report.json").read_text(encoding="utf-8") == "{}"
    rc = main(["segment", str(ct_crop), "--prompt", "liver", "--proposals", "1", "--steps", "1",
               "--model", str(shipped_model), "-o", str(out), "--overwrite"])
    assert rc == 0 and json.loads((out / "report.json").read_text(encoding="utf-8"))["organ"] == "liver"
    assert (out / "notes.txt").read_text(encoding="utf-8") == "mine"


def test_folder_of_inputs_gives_one_subfolder_per_case(ct_crop, tmp_path, shipped_model, capfd):
    cases = tmp_path / "cases"
    cases.mkdir()
    img = sitk.ReadImage(str(ct_crop))
    sitk.WriteImage(img, str(cases / "a.nii.gz"))
    sitk.WriteImage(sitk.DICOMOrient(img, "RAS"), str(cases / "b.nrrd"))
    (cases / "c.nii.gz").write_bytes((cases / "a.nii.gz").read_bytes()[:5000])  # a truncated download
    (cases / "._a.nii.gz").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS's companion of a copied file: no case
    assert [p.name for p in find_inputs([cases])] == ["a.nii.gz", "b.nrrd", "c.nii.gz"]
    out = tmp_path / "out"
    rc = main(["segment", str(cases), "--prompt", "liver", "--proposals", "1", "--steps", "2",
               "--model", str(shipped_model), "-o", str(out)])
    assert rc == 2  # the bad case is reported; the others are complete
    err = capfd.readouterr().err   # capfd: ITK writes on the file descriptor, not through sys.stderr
    # the bad case's error on a line of its own (not written into its progress bar), then the tally by name
    assert re.search(r"^progidiff: error: \S*c\.nii\.gz: the file is truncated", err, re.M)
    assert err.rstrip().endswith("progidiff: 1 of 3 cases failed (c: see above); the others are complete.")
    assert "No Series were found" not in err   # ITK's note on a folder of files that are not DICOM
    assert sorted(p.name for p in out.iterdir()) == ["a", "b"]
    assert (out / "b" / "proposals.seg.nrrd").is_file()


def test_inputs_of_one_file_name_get_a_subfolder_each(ct_crop, tmp_path, tiny_model, capsys):
    """A folder per patient, each scan called ct.nii.gz (the TotalSegmentator dataset's layout): one
    subfolder per patient, not one ct/ that the second case writes over (or is refused by)."""
    from progidiff.volume import case_names

    for patient in ("s0001", "s0002"):
        (tmp_path / "ts" / patient).mkdir(parents=True)
        shutil.copy(ct_crop, tmp_path / "ts" / patient / "ct.nii.gz")
    inputs = sorted((tmp_path / "ts").glob("*/ct.nii.gz"))
    assert case_names(inputs) == ["s0001", "s0002"]
    # the dataset's folder itself: each patient folder's one scan (its segmentations/ below it are no input);
    # a folder of several image files is skipped, not guessed at
    (tmp_path / "ts" / "s0001" / "segmentations").mkdir()
    shutil.copy(ct_crop, tmp_path / "ts" / "s0001" / "segmentations" / "liver.nii.gz")
    (tmp_path / "ts" / "results").mkdir()
    for name in ("proposal_01.nii.gz", "consensus.nii.gz"):
        shutil.copy(ct_crop, tmp_path / "ts" / "results" / name)
    assert find_inputs([tmp_path / "ts"]) == inputs
    assert case_names([Path("a/x/ct.nii.gz"), Path("b/x/ct.nii.gz"), Path("x.nii.gz")]) == ["a_x", "b_x", "x"]
    out = tmp_path / "out"
    assert main(["segment", *map(str, inputs), "--prompt", "liver", "--proposals", "1", "--steps", "1",
                 "--model", str(tiny_model), "-o", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["s0001", "s0002"]
    assert all((out / c / "proposals.seg.nrrd").is_file() for c in ("s0001", "s0002"))
    printed = capsys.readouterr().out
    assert "s0001: Liver" in printed and "s0002: Liver" in printed


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "progidiff.cli", *args], capture_output=True, text=True, encoding="utf-8", errors="replace", **kw)


@pytest.mark.parametrize("args,code,needle", [
    (["segment", "missing.nii.gz", "--prompt", "liver", "-o", "x"], 2, "no such file"),
    (["segment", "{ct}", "--prompt", "brain", "-o", "x"], 3, "closest"),
    (["segment", "{ct}", "--prompt", "liver", "--proposals", "0", "-o", "x"], 2, "proposals"),
    (["segment", "{ct}", "--prompt", "liver", "--steps", "-3", "-o", "x"], 2, "steps"),
    (["segment", "{ct}", "--prompt", "liver", "--model", "nowhere", "-o", "x"], 4, "model"),
])
def test_cli_errors_are_one_line(args, code, needle, ct_crop, tmp_path):
    args = [a.replace("{ct}", str(ct_crop)) for a in args]
    r = _cli(*args, cwd=tmp_path)
    assert r.returncode == code, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith(("INFO", "WARNING"))]
    assert len(lines) == 1 and "Traceback" not in r.stderr and needle in lines[0].lower(), r.stderr
    assert not (tmp_path / "x").exists()


def _interrupt_segment(launcher: list[str], ct_path, model, out, cwd, sig, when: str) -> tuple[int, str, str]:
    """Run ``python LAUNCHER segment`` (16 proposals, 50 steps: long enough to interrupt), send ``sig``
    once its stderr matches ``when``: (exit code, stderr up to the signal, stderr after it)."""
    return interrupt([*launcher, "segment", str(ct_path), "--prompt", "liver", "--proposals", "16", "--steps", "50",
                       "--model", str(model), "-o", str(out)], cwd, sig, when)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_leaves_output_folder_unchanged(ct_path, tmp_path, shipped_model, sig):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("untouched", encoding="utf-8")
    before = sorted(os.listdir(out))
    # once the bar has counted model evaluations: mid-sampling
    rc, seen, rest = _interrupt_segment(["-m", "progidiff.cli"], ct_path, shipped_model, out, tmp_path, sig,
                                        r"\b[1-9]\d*/\d+ \[")
    assert rc == 130, (seen + rest)[-500:]
    assert sorted(os.listdir(out)) == before
    assert (out / "keep.txt").read_text(encoding="utf-8") == "untouched"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]


@pytest.mark.parametrize("command", ["evaluate", "refine"])
def test_sigterm_leaves_no_staging_folder_behind(command, tiny_model, tiny_dataset, tmp_path):
    """A job scheduler's or `timeout`'s SIGTERM, mid-run, ends evaluate and refine as Ctrl-C does:
    exit 130, the output folder not made and no hidden staging folder beside it (before, Python died
    at once, and evaluate left `.out.tmp-*` behind)."""
    out = tmp_path / "out"
    if command == "evaluate":  # the bar appears once the staging folder exists
        args, when = ["evaluate", str(tiny_model), str(tiny_dataset), "--baseline", "none"], r"evaluate:"
    else:  # refine samples before it stages its files: interrupted while sampling, it must still say so and exit 130
        image = next((tiny_dataset / "imagesTr").iterdir())
        mask = tmp_path / "mask.nii.gz"
        label = next((tiny_dataset / "labelsTr").iterdir())
        lab = sitk.ReadImage(str(label))
        sitk.WriteImage(sitk.Cast(lab == 5, sitk.sitkUInt8), str(mask))
        args, when = ["refine", str(image), "--prompt", "liver", "--mask", str(mask), "--keep", str(mask),
                      "--model", str(tiny_model)], r"INFO model"
    rc, seen, rest = interrupt(["-m", "progidiff.cli", *args, "-n", "16", "--steps", "400", "-o", str(out)],
                                tmp_path, signal.SIGTERM, when)
    assert rc == 130, (seen + rest)[-800:]
    assert "cancelled" in rest.lower() and "Traceback" not in rest, rest[-800:]
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]


DROP_INTERRUPTS = """
import signal, sys
real = signal.signal
def install(sig, handler):
    if callable(handler):
        def dropped(*args):
            try:
                handler(*args)
            except KeyboardInterrupt:
                pass  # as CPython drops one raised while a finaliser runs
        return real(sig, dropped)
    return real(sig, handler)
signal.signal = install
from progidiff.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_segment_s_signal_handlers_cancel_and_then_come_back():
    from progidiff.interrupts import cancel_on_signals

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with cancel_on_signals() as cancel:
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGTERM)
        assert cancel.is_set()
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_an_interrupt_python_drops_still_cancels(ct_path, tmp_path, shipped_model):
    """A KeyboardInterrupt raised while Python runs a finaliser is printed and dropped; the
    handler's cancel event stops the sampling anyway, and the output folder stays as it was."""
    out = tmp_path / "out"
    rc, seen, rest = _interrupt_segment(["-c", DROP_INTERRUPTS], ct_path, shipped_model, out, tmp_path, signal.SIGINT,
                                        r"sampling: .*\b[1-9]\d*/\d+ \[")
    assert rc == 130, (seen + rest)[-500:]
    assert "cancelled" in rest.lower() and not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]


@pytest.mark.parametrize("kind", ["scattered", "empty"])
def test_seg_nrrd_holds_every_proposal_on_its_own_layer(tmp_path, kind):
    """Each proposal comes back from the Slicer file as written, the list axis first, with the scan's
    geometry (the file is streamed slice by slice and interleaved only over the box that holds a
    voxel; an empty set writes an empty file)."""
    from progidiff.outputs import write_seg_nrrd

    like = sitk.Image(9, 7, 5, sitk.sitkInt16)
    like.SetSpacing((0.7, 0.8, 2.5))
    like.SetDirection((0, 1, 0, -1, 0, 0, 0, 0, 1))  # stored with permuted, flipped axes
    like.SetOrigin((-10.5, 3.25, 100.0))
    masks = np.random.default_rng(0).random((4, 5, 7, 9)) > 0.8 if kind == "scattered" else np.zeros((4, 5, 7, 9), bool)
    write_seg_nrrd(masks, like, tmp_path / "p.seg.nrrd", [f"p{i}" for i in range(4)], (10, 20, 30), "t")
    data, header = nrrd.read(str(tmp_path / "p.seg.nrrd"))
    assert data.shape == (4, 9, 7, 5) and list(header["sizes"]) == [4, 9, 7, 5]
    assert header["kinds"] == ["list", "domain", "domain", "domain"] and header["encoding"] == "gzip"
    assert np.isnan(header["space directions"][0]).all()
    np.testing.assert_allclose(header["space directions"][1:], [[0, -0.7, 0], [0.8, 0, 0], [0, 0, 2.5]])
    np.testing.assert_allclose(header["space origin"], [-10.5, 3.25, 100.0])
    assert header["Segment3_Extent"] == "0 8 0 6 0 4" and header["Segment3_Name"] == "p3"
    for i in range(4):
        np.testing.assert_array_equal(data[i].transpose(2, 1, 0), masks[i])
        assert header[f"Segment{i}_Layer"] == str(i)


@pytest.mark.slow
def test_segment_says_so_when_every_proposal_is_empty(tmp_path, ct_crop, caplog, monkeypatch):
    """Empty proposals agree perfectly (Dice of two empty masks: 1), so before this the command line, the
    overview and Slicer showed an empty result without a word: e.g. a scan with a wrong 10 mm slice spacing
    in its header, on which the shipped model found no liver."""
    import logging

    from progidiff import cli, engine, segment
    from progidiff.alerts import nothing_found_warning

    real = engine.sample_proposals
    monkeypatch.setattr(engine, "sample_proposals", lambda *a, **k: real(*a, **k) * 0.0)
    titles = []
    drawn = segment.render_overview
    monkeypatch.setattr(segment, "render_overview", lambda *a: titles.append(a[-1]) or drawn(*a))
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="progidiff"):
        assert cli.main(["segment", str(ct_crop), "--prompt", "spleen", "-n", "2", "--steps", "1", "--device", "cpu",
                         "--modality", "CT", "-o", str(out)]) == 0
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["volume_ml"]["max"] == 0.0 and report["agreement"] == 1.0 and report["review"] is False
    assert report["warnings"][0] == {"codes": ["nothing found"], "text": nothing_found_warning("spleen", 2)}
    assert nothing_found_warning("spleen", 2) in [r.getMessage() for r in caplog.records]
    assert " · NOTHING FOUND" in titles[-1]
