"""A researcher's own dataset, broken the ways real ones are: train and evaluate refuse it in one
line, before writing anything, instead of a traceback or a model that claims what it never saw; and
what is only stored differently (MSD labels, another axis order, macOS companions, a cohort) is read right."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from progidiff.data import read_dataset
from progidiff.errors import InputError


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _label(ds):
    return ds / "labelsTr" / "case_001.nii.gz"


@pytest.mark.parametrize("text,needle", [
    ("{labels: ", "not valid JSON"),
    (json.dumps({"labels": ["liver"]}), 'needs "labels"'),
    (json.dumps({"name": "no labels"}), 'needs "labels"'),
    (json.dumps({"labels": {"background": 0, "liver": "one"}}), 'label "liver" has the value "one"'),
    (json.dumps({"labels": {"background": 0, "liver": None}}), 'label "liver" has the value null'),
])
def test_a_broken_dataset_json_is_named(tmp_path, tiny_dataset, text, needle):
    ds = _copy(tiny_dataset, tmp_path / "ds")
    (ds / "dataset.json").write_text(text, encoding="utf-8")
    with pytest.raises(InputError, match="dataset.json") as exc:
        read_dataset(ds)
    assert needle in str(exc.value)


def test_msd_and_nnunet_labels_read_alike(tmp_path, tiny_dataset):
    ds = _copy(tiny_dataset, tmp_path / "ds")
    (ds / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "liver"}}), encoding="utf-8")
    msd = read_dataset(ds).labels
    (ds / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1}}), encoding="utf-8")
    assert read_dataset(ds).labels == msd == {"background": 0, "liver": 1}


def _cropped(path):
    return sitk.ReadImage(str(path))[:, :, :30]


def _shifted(path):
    img = sitk.ReadImage(str(path))
    img.SetOrigin(tuple(o + 0.5 * s for o, s in zip(img.GetOrigin(), img.GetSpacing())))
    return img


def _half_spacing(path):
    img = sitk.ReadImage(str(path))
    img.SetSpacing(tuple(s / 2 for s in img.GetSpacing()))
    return img


@pytest.mark.parametrize("command", ["train", "evaluate"])
@pytest.mark.parametrize("damage,needle", [
    (_cropped, "its size"),
    (_shifted, "its origin"),
    (_half_spacing, "its spacing"),
    (lambda p: None, "truncated or corrupt"),
])
def test_a_label_off_its_image_s_grid_is_refused_before_anything_is_written(tmp_path, tiny_dataset, tiny_model, capsys,
                                                                          command, damage, needle):
    """Resampled onto the model grid, a cropped label would teach background where the organ is; scored
    voxel by voxel, a shifted one would score the wrong voxels."""
    from progidiff.cli import main

    ds = _copy(tiny_dataset, tmp_path / "ds")
    img = damage(_label(ds))
    if img is None:
        _label(ds).write_bytes(b"not an image")
    else:
        sitk.WriteImage(img, str(_label(ds)))
    out = tmp_path / "out"
    args = (["train", str(ds), "-o", str(out), "--stage1-steps", "1", "--stage2-steps", "1"] if command == "train"
            else ["evaluate", str(tiny_model), str(ds), "-o", str(out), "--proposals", "1"])
    assert main(args) == 2
    err = capsys.readouterr().err
    line = next(ln for ln in err.splitlines() if ln.startswith("progidiff: error:"))
    assert needle in line and "case_001.nii.gz" in line and "Traceback" not in err
    assert not out.exists()


def test_a_label_stored_in_another_axis_order_is_reoriented_exactly(tmp_path, tiny_dataset):
    from progidiff.data import grid_mismatch, read_label
    from progidiff.volume import read_scan

    ds = _copy(tiny_dataset, tmp_path / "ds")
    original = sitk.ReadImage(str(_label(ds)))
    sitk.WriteImage(sitk.DICOMOrient(original, "LPI"), str(_label(ds)))  # the image stays in its own (RAS) order
    entry = read_dataset(ds).cases[0]
    assert grid_mismatch(sitk.ReadImage(str(_label(ds))), sitk.ReadImage(str(entry.image))) is not None
    label = read_label(entry, read_scan(entry.image).image)
    assert np.array_equal(sitk.GetArrayViewFromImage(label), sitk.GetArrayViewFromImage(original))


def test_a_label_within_header_rounding_of_its_image_is_accepted(tmp_path, tiny_dataset):
    from progidiff.data import grid_mismatch

    img = sitk.ReadImage(str(_label(tiny_dataset)))
    other = sitk.Image(img)
    other.SetOrigin(tuple(o + 1e-5 for o in img.GetOrigin()))  # float32 NIfTI header rounding
    other.SetSpacing(tuple(s * (1 + 1e-6) for s in img.GetSpacing()))
    assert grid_mismatch(other, img) is None
    other.SetDirection(tuple(np.array(img.GetDirection()) * [-1, 1, 1, -1, 1, 1, -1, 1, 1]))
    assert "direction" in grid_mismatch(other, img)


def _relabel(ds, labels):
    (ds / "dataset.json").write_text(json.dumps({"labels": labels, "channel_names": {"0": "CT"}}), encoding="utf-8")


def test_by_default_train_learns_the_organs_the_labels_name_and_refuses_others(tmp_path, tiny_dataset, capsys):
    from progidiff.cli import main
    from progidiff.prompts import Vocabulary
    from progidiff.train import TrainConfig, organs_to_train

    ds = _copy(tiny_dataset, tmp_path / "ds")
    # a liver dataset in MSD style (Task03: liver and tumour): the default is the liver alone, not nine organs
    labels = read_dataset(tiny_dataset).labels
    _relabel(ds, {"0": "background", str(labels["liver"]): "liver", "250": "tumour"})
    vocab = Vocabulary.load()
    info = read_dataset(ds)
    assert organs_to_train(TrainConfig(str(ds), ""), info.labels, vocab) == ("liver",)
    # asked for an organ the labels do not name: refused, naming the labels it has
    out = tmp_path / "out"
    assert main(["train", str(ds), "-o", str(out), "--organs", "liver", "spleen"]) == 2
    err = capsys.readouterr().err
    assert "no label for spleen" in err and "tumour" in err and not out.exists()
    # labels that name no organ at all
    _relabel(ds, {"background": 0, "tumour": 1})
    assert main(["train", str(ds), "-o", str(out)]) == 2
    assert "name none of the organs" in capsys.readouterr().err and not out.exists()


def test_an_organ_no_training_slice_holds_is_refused(tmp_path, tiny_dataset, capsys):
    """A label value with no voxel: the sampler would skip the organ and the card would still claim it."""
    from progidiff.cli import main

    ds = _copy(tiny_dataset, tmp_path / "ds")
    labels = read_dataset(tiny_dataset).labels
    _relabel(ds, {"background": 0, "liver": labels["liver"], "gallbladder": 250})
    out = tmp_path / "out"
    assert main(["train", str(ds), "-o", str(out), "--stage1-steps", "1", "--stage2-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "no training slice holds gallbladder" in err and "Traceback" not in err and not out.exists()


def test_evaluate_without_labels_refuses_instead_of_reporting_nothing(tmp_path, tiny_dataset, tiny_model, capsys):
    from progidiff.cli import main

    ds = _copy(tiny_dataset, tmp_path / "ds")
    _label(ds).unlink()
    out = tmp_path / "report"
    assert main(["evaluate", str(tiny_model), str(ds), "-o", str(out)]) == 2
    assert "no case has a label file" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("command", ["train", "adapt"])
def test_an_output_that_is_a_file_is_refused_before_the_data_is_read(tmp_path, tiny_dataset, tiny_model, capsys, command):
    from progidiff.cli import main

    out = tmp_path / "out"
    out.write_text("a file", encoding="utf-8")
    args = ["train", str(tiny_dataset), "-o", str(out)] if command == "train" else \
        ["adapt", str(tiny_dataset), "--from", str(tiny_model), "-o", str(out)]
    assert main(args) == 5  # OutputError, as segment's
    err = capsys.readouterr().err
    assert "not a folder" in err and "Traceback" not in err and out.read_text(encoding="utf-8") == "a file"


def test_hidden_and_other_files_in_images_tr_are_not_cases(tmp_path, tiny_dataset):
    """macOS's "._" companions and, with nnU-Net v2's file_ending, files of another kind are skipped."""
    ds = _copy(tiny_dataset, tmp_path / "ds")
    (ds / "imagesTr" / "._case_001_0000.nii.gz").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (ds / "imagesTr" / "case_001_0000.json").write_text("{}", encoding="utf-8")
    meta = json.loads((ds / "dataset.json").read_text(encoding="utf-8"))
    (ds / "dataset.json").write_text(json.dumps({**meta, "file_ending": ".nii.gz"}), encoding="utf-8")
    assert [c.image.name for c in read_dataset(ds).cases] == ["case_001_0000.nii.gz"]


def test_a_cohort_report_has_a_row_per_case_and_flags_the_scans_trained_on(tmp_path, tiny_dataset, tiny_model):
    """The tiny model was trained on case_001 whole; a second, unseen case beside it must not hide that.
    The report also repeats the dataset's description."""
    from progidiff.evaluate import evaluate

    ds = _copy(tiny_dataset, tmp_path / "ds")
    img = sitk.ReadImage(str(ds / "imagesTr" / "case_001_0000.nii.gz"))
    lab = sitk.ReadImage(str(_label(ds)))
    sitk.WriteImage(img[:, :, 5:45], str(ds / "imagesTr" / "other_0000.nii.gz"))  # another extent of the body
    sitk.WriteImage(lab[:, :, 5:45], str(ds / "labelsTr" / "other.nii.gz"))
    meta = json.loads((ds / "dataset.json").read_text(encoding="utf-8"))
    (ds / "dataset.json").write_text(json.dumps({**meta, "description": "Two crops,\n  one of them cut again"}), encoding="utf-8")
    rep = evaluate(str(tiny_model), str(ds), tmp_path / "eval", proposals=2, steps=1, device="cpu", baseline=None)
    md = (tmp_path / "eval" / "report.md").read_text(encoding="utf-8")
    # the report repeats what the dataset says it is (here, that it is not as acquired), on one line
    assert rep["dataset_description"] == "Two crops, one of them cut again"
    assert "The dataset, as its dataset.json describes it: Two crops, one of them cut again" in md
    assert "1 of 2 case(s) are whole scans the model was trained on (case_001)" in md
    rows = {ln.split("|")[1].strip(): ln for ln in md.splitlines() if ln.startswith(("| case_001 |", "| other |"))}
    assert set(rows) == {"case_001", "other"}
    per = {(c["case"], c["organ"]): c["ranked_first"]["dice"] for c in rep["cases"]}
    assert f"{per['other', 'liver']:.3f} (" in rows["other"]
    # the spread across cases: mean ± sample SD, median, and the lowest with its case
    livers = {c: per[c, "liver"] for c in ("case_001", "other")}
    low = min(livers, key=livers.get)
    spread = next(ln for ln in md.splitlines() if ln.startswith("| liver | 2 |"))
    assert spread.startswith(f"| liver | 2 | {np.mean(list(livers.values())):.3f} ± {np.std(list(livers.values()), ddof=1):.3f} | "
                             f"{np.median(list(livers.values())):.3f} | {livers[low]:.3f} ({low}) |")
    # and the figure gains a panel of the cases' points (one case's figure is 360 px high)
    from PIL import Image

    assert Image.open(tmp_path / "eval" / "report.png").size[1] > 500


def test_a_prepared_case_keeps_nothing_at_the_scan_s_resolution(tmp_path, tiny_dataset):
    """train prepares every case of a cohort before it starts: a case held at its scan's resolution
    (a 512x512x200 CT and its labels: 254 MB) would make 100 cases not fit in memory."""
    from progidiff.data import prepare_case
    from progidiff.prompts import Vocabulary
    from progidiff.volume import GridSpec

    ds = _copy(tiny_dataset, tmp_path / "ds")
    info = read_dataset(ds)
    entry = info.cases[0]
    # the crop upsampled 3x in-plane and in z: 27x the voxels of the model-grid work
    for path, interp in ((entry.image, sitk.sitkLinear), (entry.label, sitk.sitkNearestNeighbor)):
        img = sitk.ReadImage(str(path))
        ref = sitk.Image([s * 3 for s in img.GetSize()], img.GetPixelID())
        ref.SetSpacing([s / 3 for s in img.GetSpacing()])
        ref.SetOrigin(img.GetOrigin())
        ref.SetDirection(img.GetDirection())
        sitk.WriteImage(sitk.Resample(img, ref, sitk.Transform(), interp), str(path))
    scan_bytes = sitk.ReadImage(str(entry.image)).GetNumberOfPixels() * 4
    case = prepare_case(entry, info.labels, Vocabulary.load(), GridSpec((12.0, 12.0, 10.0), (32, 32)), ["liver"], "CT")
    held = 0
    for value in vars(case).values():
        if isinstance(value, np.ndarray):
            held += value.nbytes
        elif isinstance(value, dict):
            held += sum(v.nbytes for v in value.values())
        elif isinstance(value, sitk.Image):
            held += value.GetNumberOfPixels() * value.GetSizeOfPixelComponent()
    assert held < scan_bytes / 100
    assert len(case.scan_z_mm) == sitk.ReadImage(str(entry.image)).GetSize()[2]


def test_in_a_cohort_a_case_off_its_grid_is_listed_and_the_others_scored(tmp_path, tiny_dataset, tiny_model):
    """As segment on a cohort: one bad case of many must not stop the evaluation; the report names it and why."""
    from progidiff.evaluate import evaluate

    ds = _copy(tiny_dataset, tmp_path / "ds")
    shutil.copy(ds / "imagesTr" / "case_001_0000.nii.gz", ds / "imagesTr" / "shifted_0000.nii.gz")
    sitk.WriteImage(_shifted(_label(ds)), str(ds / "labelsTr" / "shifted.nii.gz"))
    rep = evaluate(str(tiny_model), str(ds), tmp_path / "eval", proposals=2, steps=1, device="cpu", baseline=None)
    assert {c["case"] for c in rep["cases"]} == {"case_001"} and list(rep["unusable_cases"]) == ["shifted"]
    assert "its origin" in rep["unusable_cases"]["shifted"]
    md = (tmp_path / "eval" / "report.md").read_text(encoding="utf-8")
    assert "not scored: 1 case(s) that could not be read or whose label is off its scan's grid" in md
    assert "- `shifted`: " in md and "its origin" in md


@pytest.mark.parametrize("args,says", [
    (["--stage2-steps", "-5"], "count steps, 0 or more"),                  # was trained and saved
    (["--stage2-steps", "0"], "never learned to read the scan"),           # was saved untrained
    (["--holdout-fraction", "1.5"], "0 to under 1; got 1.5"),              # was 'no training slice holds ...'
    (["--base-model", "no/such/folder"], "--base-model no/such/folder: no such folder"),   # was a hub message
    (["--baseline", "unet", "--stage1-steps", "0", "--stage2-steps", "0"], "both are 0"),
    (["--organs", "brain"], "Unknown organ(s) brain"),
])
def test_train_settings_that_cannot_train_are_refused_before_any_work(tmp_path, tiny_dataset, capsys, args, says):
    from progidiff.cli import main

    out = tmp_path / "out"
    assert main(["train", str(tiny_dataset), "-o", str(out)] + args) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1 and not list(out.glob("*"))


@pytest.mark.parametrize("command", ["train", "adapt"])
def test_a_learning_rate_not_above_0_is_a_usage_error_not_a_traceback(tmp_path, tiny_dataset, capsys, command):
    from progidiff.cli import main
    from progidiff.prompts import Vocabulary
    from progidiff.train import TrainConfig, check_config

    extra = ["--from", str(tmp_path)] if command == "adapt" else []
    with pytest.raises(SystemExit) as e:
        main([command, str(tiny_dataset), "-o", str(tmp_path / "out"), "--lr", "-1"] + extra)
    assert e.value.code == 2 and "argument --lr: must be above 0, got -1" in capsys.readouterr().err
    with pytest.raises(InputError, match="--lr must be above 0; got 0"):   # the API, without the command line
        check_config(TrainConfig(str(tiny_dataset), "", lr=0.0), Vocabulary.load())


def test_organs_are_named_as_the_vocabulary_names_them_each_once(tiny_dataset):
    from progidiff.prompts import Vocabulary
    from progidiff.train import TrainConfig, check_config

    cfg = TrainConfig(str(tiny_dataset), "", organs=("left kidney", "hepatic", "liver", "Kidney_Left"))
    check_config(cfg, Vocabulary.load())
    assert cfg.organs == ("kidney_left", "liver")
