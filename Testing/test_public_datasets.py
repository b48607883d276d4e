"""Public datasets as they are downloaded: MSD's layout (a "training" list, files not named CASE_0000),
the TotalSegmentator dataset's (a folder per case, one mask file per structure, meta.csv's split),
MONAI's BTCV and AMOS label names, one "kidney" for both sides (AbdomenCT-1K, KiTS) and lesions labelled
apart from their organ (MSD's liver and pancreas). train and evaluate read them as the nnU-Net copy of
the same data, or refuse them in one line."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from progidiff.datasets import read_dataset
from progidiff.errors import InputError
from progidiff.label_names import dataset_organs, lesions_counted, organ_label_values, organ_mask
from progidiff.prompts import Vocabulary


def _labels(ds) -> dict[str, int]:
    return read_dataset(ds).labels


def _msd_copy(src, dst, image_name="case_001.nii.gz", label_name="case_001.nii.gz", labels=None, label_array=None):
    """``src`` (nnU-Net, one case) laid out as MSD ships a task: no _0000, a "training" list with "./"
    paths, a "test" list, MSD's {value: name} labels and macOS's companion files beside the images."""
    (dst / "imagesTr").mkdir(parents=True)
    (dst / "labelsTr").mkdir()
    shutil.copy(src / "imagesTr" / "case_001_0000.nii.gz", dst / "imagesTr" / image_name)
    label = sitk.ReadImage(str(src / "labelsTr" / "case_001.nii.gz"))
    if label_array is not None:
        out = sitk.GetImageFromArray(label_array)
        out.CopyInformation(label)
        label = out
    sitk.WriteImage(label, str(dst / "labelsTr" / label_name))
    (dst / "imagesTr" / f"._{image_name}").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    meta = {"name": "Task00_Copy", "modality": {"0": "CT"},
            "labels": {str(v): n for n, v in (labels or _labels(src)).items()},
            "numTraining": 1, "numTest": 0,
            "training": [{"image": f"./imagesTr/{image_name}", "label": f"./labelsTr/{label_name}"}],
            "test": []}
    (dst / "dataset.json").write_text(json.dumps(meta), encoding="utf-8")
    return dst


def test_an_msd_task_is_read_from_its_training_list(tmp_path, tiny_dataset):
    ds = _msd_copy(tiny_dataset, tmp_path / "Task00", image_name="img0001.nii.gz", label_name="label0001.nii.gz")
    info = read_dataset(ds)
    assert [(c.name, c.image.name, c.label.name) for c in info.cases] == [("img0001", "img0001.nii.gz", "label0001.nii.gz")]
    assert info.modality == "CT" and info.labels == _labels(tiny_dataset)
    # MONAI's BTCV names its file dataset_0.json: the file itself is the dataset argument
    (ds / "dataset.json").rename(ds / "dataset_0.json")
    with pytest.raises(InputError, match="no dataset.json"):
        read_dataset(ds)
    assert read_dataset(ds / "dataset_0.json").cases == info.cases


def test_without_a_training_list_images_and_labels_pair_by_file_name(tmp_path, tiny_dataset):
    ds = _msd_copy(tiny_dataset, tmp_path / "Task00")
    meta = json.loads((ds / "dataset.json").read_text(encoding="utf-8"))
    del meta["training"]
    (ds / "dataset.json").write_text(json.dumps(meta), encoding="utf-8")
    shutil.copy(ds / "imagesTr" / "case_001.nii.gz", ds / "imagesTr" / "unlabelled.nii.gz")
    assert [(c.name, c.label and c.label.name) for c in read_dataset(ds).cases] == \
        [("case_001", "case_001.nii.gz"), ("unlabelled", None)]


def test_nnunet_s_channel_files_come_before_a_training_list(tmp_path, tiny_dataset, ct_path):
    """nnU-Net v1 lists "./imagesTr/CASE.nii.gz" for the file CASE_0000.nii.gz, and ../shared/data lists the
    file itself: either way the case is CASE, the name its held-out slab is recorded under in the model card."""
    ds = shutil.copytree(tiny_dataset, tmp_path / "ds")
    meta = json.loads((ds / "dataset.json").read_text(encoding="utf-8"))
    meta["training"] = [{"image": "./imagesTr/case_001.nii.gz", "label": "./labelsTr/case_001.nii.gz"}]
    (ds / "dataset.json").write_text(json.dumps(meta), encoding="utf-8")
    assert [(c.name, c.image.name) for c in read_dataset(ds).cases] == [("case_001", "case_001_0000.nii.gz")]
    assert [c.name for c in read_dataset(ct_path.parents[1]).cases] == ["tsct_001"]


@pytest.mark.parametrize("change,needle", [
    (lambda m: m["training"].append({"image": "./imagesTr/spleen_2.nii.gz", "label": "./labelsTr/spleen_2.nii.gz"}),
     "names imagesTr/spleen_2.nii.gz, which is not there"),
    (lambda m: m["training"].append({"label": "./labelsTr/case_001.nii.gz"}), 'each "training" entry is'),
    (lambda m: m["training"].append(dict(m["training"][0])), "two cases are named case_001"),
    (lambda m: m["labels"].update({"kidney": [1, 2, 3]}), 'label "kidney" is a region of several values'),
])
def test_a_broken_msd_dataset_json_is_refused_in_one_line(tmp_path, tiny_dataset, tiny_model, capsys, change, needle):
    from progidiff.cli import main

    ds = _msd_copy(tiny_dataset, tmp_path / "Task00")
    meta = json.loads((ds / "dataset.json").read_text(encoding="utf-8"))
    change(meta)
    (ds / "dataset.json").write_text(json.dumps(meta), encoding="utf-8")
    with pytest.raises(InputError, match="dataset.json"):
        read_dataset(ds)
    out = tmp_path / "report"
    assert main(["evaluate", str(tiny_model), str(ds), "-o", str(out), "--proposals", "1"]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and not out.exists()


@pytest.mark.parametrize("labels", [
    # MONAI's BTCV (dataset_0.json)
    {"0": "background", "1": "spleen", "2": "rkid", "3": "lkid", "4": "gall", "5": "eso", "6": "liver", "7": "sto",
     "8": "aorta", "9": "IVC", "10": "veins", "11": "pancreas", "12": "rad", "13": "lad"},
    # AMOS 2022
    {"0": "background", "1": "spleen", "2": "right kidney", "3": "left kidney", "4": "gall bladder", "5": "esophagus",
     "6": "liver", "7": "stomach", "8": "arota", "9": "postcava", "10": "pancreas", "11": "right adrenal gland"},
    # FLARE 2022
    {"0": "background", "1": "liver", "2": "right kidney", "3": "spleen", "4": "pancreas", "5": "aorta",
     "6": "inferior vena cava", "7": "right adrenal gland", "9": "gallbladder", "11": "stomach", "13": "left kidney"},
])
def test_public_abdominal_label_names_name_the_nine_organs(labels):
    vocab = Vocabulary.load()
    as_read = {n: int(v) for v, n in labels.items()}
    assert dataset_organs(as_read, vocab) == vocab.names()
    assert all(len(organ_label_values(as_read, vocab, o)) == 1 for o in vocab.names())
    assert organ_label_values(as_read, vocab, "kidney_left") != organ_label_values(as_read, vocab, "kidney_right")


def test_a_lesion_is_part_of_its_organ_only_where_the_organ_is_labelled():
    vocab = Vocabulary.load()
    msd_liver = {"background": 0, "liver": 1, "cancer": 2}
    assert organ_label_values(msd_liver, vocab, "liver") == [1, 2] and lesions_counted(msd_liver, vocab) == {"cancer": ("liver",)}
    qualified = {"background": 0, "pancreas": 1, "pancreatic tumour": 2, "liver": 3, "liver_tumor": 4}
    assert organ_label_values(qualified, vocab, "pancreas") == [1, 2] and organ_label_values(qualified, vocab, "liver") == [3, 4]
    # several organs: whose an unqualified lesion is, is not known; a lesion alone names no organ
    assert organ_label_values({"liver": 1, "spleen": 2, "tumor": 3}, vocab, "liver") == [1]
    assert dataset_organs({"background": 0, "liver tumor": 1}, vocab) == []
    # TotalSegmentator's kidney cysts stay apart, as the shipped model was trained and scored
    assert organ_label_values({"kidney_left": 3, "kidney_cyst_left": 23}, vocab, "kidney_left") == [3]


def test_one_kidney_label_for_both_sides_is_split_at_the_body_s_midline(ct_path, ct_label_path):
    """On the real scan (stored in RAS order: its x axis runs to the patient's right), the kidneys merged
    into one label come back as TotalSegmentator's left and right kidney, voxel for voxel."""
    labels = {n: int(v) for n, v in json.loads((ct_label_path.parents[1] / "dataset.json").read_text())["labels"].items()}
    image = sitk.ReadImage(str(ct_path))
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(ct_label_path)))
    merged = np.where(label == labels["kidney_left"], labels["kidney_right"], label)
    kits = {"background": 0, "kidney": labels["kidney_right"], "tumor": labels["liver"]}  # any other value will do
    vocab = Vocabulary.load()
    for organ in ("kidney_left", "kidney_right"):
        mask = organ_mask(merged, image, kits, vocab, organ, "CT")
        assert np.array_equal(mask & (merged == labels["kidney_right"]), label == labels[organ])
    # the lesion of a two-sided label is split with it
    left = organ_mask(merged, image, kits, vocab, "kidney_left", "CT") & (merged == labels["liver"])
    right = organ_mask(merged, image, kits, vocab, "kidney_right", "CT") & (merged == labels["liver"])
    assert left.any() and right.any() and not (left & right).any()


def test_evaluate_scores_a_public_layout_as_it_scores_the_nnunet_copy(tmp_path, tiny_dataset, tiny_model):
    """The tiny model's two organs on the crop: once as nnU-Net, once as an MSD task with one "kidney" for
    both sides and a slice of the liver labelled "liver_tumor". Same scores, organ for organ (the tiny
    model's vocabulary knows no right kidney: the split must not need it)."""
    from progidiff.evaluate import evaluate

    labels = _labels(tiny_dataset)
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(tiny_dataset / "labelsTr" / "case_001.nii.gz")))
    liver = np.argwhere(arr == labels["liver"])
    changed = np.where(arr == labels["kidney_right"], labels["kidney_left"], arr)
    cancer = liver[liver[:, 0] == np.median(liver[:, 0]).astype(int)]  # one slice of the liver, as a tumour
    changed[tuple(cancer.T)] = 90
    public = {"background": 0, "liver": labels["liver"], "liver_tumor": 90, "kidney": labels["kidney_left"],
              "spleen": labels["spleen"]}
    ds = _msd_copy(tiny_dataset, tmp_path / "Task00", labels=public, label_array=changed.astype(arr.dtype))
    runs = [evaluate(str(tiny_model), str(d), tmp_path / name, proposals=2, steps=1, device="cpu", baseline=None)
            for d, name in ((tiny_dataset, "nnunet"), (ds, "msd"))]
    scores = [{c["organ"]: (c["ranked_first"]["dice"], c["consensus"]["dice"]) for c in r["cases"]} for r in runs]
    assert set(scores[0]) == {"liver", "kidney_left"} and scores[0] == scores[1]


def test_train_prepares_the_same_masks_from_the_public_layout(tmp_path, tiny_dataset):
    """What train learns from: both kidneys from one two-sided label, and the liver with its tumour."""
    from progidiff.data import prepare_case
    from progidiff.volume import GridSpec

    labels = _labels(tiny_dataset)
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(tiny_dataset / "labelsTr" / "case_001.nii.gz")))
    changed = np.where(arr == labels["kidney_right"], labels["kidney_left"], arr)
    changed[(arr == labels["liver"]) & (np.arange(arr.shape[0]) % 4 == 0)[:, None, None]] = 90
    public = {"background": 0, "liver": labels["liver"], "liver cancer": 90, "kidney": labels["kidney_left"]}
    ds = _msd_copy(tiny_dataset, tmp_path / "Task00", labels=public, label_array=changed.astype(arr.dtype))
    vocab, grid, organs = Vocabulary.load(), GridSpec((12.0, 12.0, 10.0), (32, 32)), ["liver", "kidney_left", "kidney_right"]
    nnunet, msd = (prepare_case(read_dataset(d).cases[0], read_dataset(d).labels, vocab, grid, organs, "CT")
                   for d in (tiny_dataset, ds))
    assert set(msd.masks) == set(organs)
    for organ in organs:
        assert msd.masks[organ].any() and np.array_equal(msd.masks[organ], nnunet.masks[organ])


def _totalsegmentator_copy(src, dst, cases: dict[str, str]) -> None:
    """``src``'s one case as the TotalSegmentator dataset lays a case out (ct.nii.gz, one mask file per
    structure, every structure's file even where it is empty), under each name of ``cases`` (name ->
    split in meta.csv); a case named "head" has the scan but no abdominal organ."""
    labels = _labels(src)
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(src / "labelsTr" / "case_001.nii.gz")))
    ref = sitk.ReadImage(str(src / "labelsTr" / "case_001.nii.gz"))
    dst.mkdir()
    for name in cases:
        (dst / name / "segmentations").mkdir(parents=True)
        shutil.copy(src / "imagesTr" / "case_001_0000.nii.gz", dst / name / "ct.nii.gz")
        for structure in ("liver", "spleen", "kidney_left", "kidney_right", "vertebrae_L1", "brain"):
            value = labels.get(structure, -1)
            mask = sitk.GetImageFromArray(((arr == value) & (name != "head")).astype(np.uint8))
            mask.CopyInformation(ref)
            sitk.WriteImage(mask, str(dst / name / "segmentations" / f"{structure}.nii.gz"))
    (dst / "meta.csv").write_text("image_id;age;gender;institute;study_type;split\n"
                                  + "".join(f"{n};60;m;A;ct abdomen;{s}\n" for n, s in cases.items()), encoding="utf-8")


def test_the_totalsegmentator_dataset_is_read_as_it_is_downloaded(tmp_path, tiny_dataset):
    ds = tmp_path / "Totalsegmentator_dataset_v201"
    _totalsegmentator_copy(tiny_dataset, ds, {"s0001": "train", "s0002": "test"})
    (ds / "s0003").mkdir()  # a folder without a scan is no case
    info = read_dataset(ds)
    assert [(c.name, c.image.name, c.label.name, c.split) for c in info.cases] == \
        [("s0001", "ct.nii.gz", "segmentations", "train"), ("s0002", "ct.nii.gz", "segmentations", "test")]
    assert info.modality == "CT" and dataset_organs(info.labels, Vocabulary.load()) == \
        ["liver", "spleen", "kidney_left", "kidney_right"]
    # the masks painted into a label map: the same voxels as the nnU-Net copy's, only the values asked for read
    from progidiff.datasets import read_label

    image = sitk.ReadImage(str(info.cases[0].image))
    liver, kidney = info.labels["liver"], info.labels["kidney_left"]
    painted = sitk.GetArrayFromImage(read_label(info.cases[0], image, info.labels, [liver]))
    original = sitk.GetArrayFromImage(sitk.ReadImage(str(tiny_dataset / "labelsTr" / "case_001.nii.gz")))
    assert np.array_equal(painted == liver, original == _labels(tiny_dataset)["liver"]) and not (painted == kidney).any()


def test_evaluate_scores_a_totalsegmentator_split_as_the_nnunet_copy(tmp_path, tiny_dataset, tiny_model, capsys):
    from progidiff.cli import main
    from progidiff.evaluate import evaluate

    ds = tmp_path / "ts"
    _totalsegmentator_copy(tiny_dataset, ds, {"head": "test", "s0001": "train", "s0002": "test", "s0003": "test"})
    nnunet = evaluate(str(tiny_model), str(tiny_dataset), tmp_path / "nnunet", proposals=2, steps=1, device="cpu", baseline=None)
    ts = evaluate(str(tiny_model), str(ds), tmp_path / "ts-report", proposals=2, steps=1, device="cpu", baseline=None,
                  split="test", max_cases=1)
    # the test split's first case with an organ: not the head scan, not the train case, and no more
    assert {c["case"] for c in ts["cases"]} == {"s0002"} and ts["cases_without_organs"] == ["head"]
    assert {c["organ"]: c["ranked_first"]["dice"] for c in ts["cases"]} == \
        {c["organ"]: c["ranked_first"]["dice"] for c in nnunet["cases"]}
    md = (tmp_path / "ts-report" / "report.md").read_text(encoding="utf-8")
    assert "Evaluated on (split 'test', the first 1 case(s) holding one of its organs):" in md
    assert "not scored: 1 case(s) holding none of the model's organs (head)" in md
    # a split the dataset does not record, and a dataset that records none: one line each, nothing written
    assert main(["evaluate", str(tiny_model), str(ds), "--split", "validation", "-o", str(tmp_path / "a")]) == 2
    assert "no labelled case is in split 'validation'; its splits: test, train" in capsys.readouterr().err
    assert main(["evaluate", str(tiny_model), str(tiny_dataset), "--split", "test", "-o", str(tmp_path / "b")]) == 2
    assert "records no split" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_train_keeps_to_the_split_it_is_given(tmp_path, tiny_dataset, capsys):
    from progidiff.cli import main

    ds = tmp_path / "ts"
    _totalsegmentator_copy(tiny_dataset, ds, {"s0001": "train", "s0002": "test"})
    out = tmp_path / "model"
    tiny = ["--organs", "liver", "--stage1-steps", "1", "--stage2-steps", "1", "--batch-size", "2", "--workers", "0"]
    assert main(["train", str(ds), "-o", str(out), "--split", "train", *tiny]) == 0
    card = json.loads((out / "model_card.json").read_text(encoding="utf-8"))
    assert card["training"]["cases"] == ["s0001"] and card["training"]["config"]["split"] == "train"
    assert main(["train", str(ds), "-o", str(tmp_path / "other"), "--split", "validation", *tiny]) == 2
    assert "no labelled case is in split 'validation'" in capsys.readouterr().err and not (tmp_path / "other").exists()
