"""The training levers of the ablation (unlabelled stage 1, anatomical guidance) and the
deterministic UNet baseline: each trains for a few steps on the real crop, saves, reloads
and segments; evaluate reports the baseline beside the proposals."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from progidiff.train import TrainConfig, train
from progidiff.volume import body_axis_coords, read_scan

TINY = dict(stage1_steps=3, stage2_steps=3, batch_size=4, grid_size=32, grid_spacing=(12.0, 12.0, 10.0),
            channels=(8, 16, 16, 16), encoder_channels=(8, 8, 8), workers=0)


def test_body_axis_coords_run_from_the_lowest_to_the_highest_body_slice():
    vol = np.zeros((10, 8, 8), np.float32)
    vol[2:8, 3:5, 3:5] = 0.6            # body in slices 2..7, air elsewhere
    c = body_axis_coords(vol)
    assert c[2] == 0.0 and c[7] == 1.0
    assert np.all(np.diff(c[2:8]) > 0)
    assert c[0] == 0.0 and c[9] == 1.0  # clipped outside the body
    assert np.all(body_axis_coords(np.zeros((4, 8, 8), np.float32)) == 0.5)


def test_guided_model_needs_and_uses_the_coordinate(tmp_path, tiny_dataset, tiny_mr_dataset):
    out = tmp_path / "guided"
    train(TrainConfig(dataset=str(tiny_dataset), output=str(out), organs=("liver",), anatomical_guidance=True,
                      stage1_data="images", **TINY), progress=False)
    from progidiff.engine import Engine
    from progidiff.engine import SegmentOptions

    engine = Engine(out, device="cpu")
    m = engine.model
    assert m.config.anatomical_guidance
    assert m.controlnet.controlnet_cond_embedding.conv_in.in_channels == m.config.image_channels + 1
    states = engine.text_states(engine.vocabulary["liver"])
    x = torch.randn(2, 1, 32, 32)
    img = torch.rand(2, 3, 32, 32)
    t = torch.tensor([500, 500])
    s = (states[0].expand(2, -1, -1), states[1].expand(2, -1))
    with pytest.raises(ValueError, match="anatomical guidance"):
        m(x, t, s, img)
    # After a few steps the zero-initialised encoder output is no longer zero, so the coordinate matters.
    with torch.no_grad():
        a = m(x, t, s, img, torch.tensor([0.0, 0.0]))
        b = m(x, t, s, img, torch.tensor([1.0, 1.0]))
    assert not torch.allclose(a, b)
    scan = read_scan(tiny_dataset / "imagesTr" / "case_001_0000.nii.gz")
    res = engine.segment(scan, "liver", SegmentOptions(proposals=2, steps=2))
    assert res.masks.shape[1:] == sitk.GetArrayViewFromImage(scan.image).shape
    card = json.loads((out / "model_card.json").read_text(encoding="utf-8"))
    assert card["training"]["config"]["stage1_data"] == "images"
    # A guided model can be adapted to MR too (the adapter's training passes the coordinate).
    from progidiff.adapt import AdaptConfig, adapt, apply_adapter

    lora = adapt(AdaptConfig(dataset=str(tiny_mr_dataset), base=str(out), output=str(tmp_path / "lora"), shots=10, rank=2,
                             steps=2, batch_size=2), progress=False)
    adapted = apply_adapter(m, lora)
    with torch.no_grad():
        adapted(x, t, s, img, torch.tensor([0.5, 0.5]))


def test_unlabelled_stage1_never_reads_labels(tmp_path, tiny_dataset, monkeypatch):
    """Stage 1 on images denoises the scan slices: with every label emptied, its loss is the same."""
    import csv

    def stage1_losses(folder):
        with open(folder / "train_log.csv", encoding="utf-8") as f:
            return [float(r["loss"]) for r in csv.DictReader(f) if r["stage"] == "1"]

    a = tmp_path / "a"
    train(TrainConfig(dataset=str(tiny_dataset), output=str(a), organs=("liver",), stage1_data="images",
                      **{**TINY, "stage2_steps": 1}), progress=False)
    import progidiff.data as data

    real = data.prepare_case

    def no_labels(*args, **kw):
        case = real(*args, **kw)
        # Keep one voxel per organ so the dataset still has the organ, but nothing else of the label.
        for k, m in case.masks.items():
            z = int(np.nonzero(m.reshape(len(m), -1).any(1))[0][0])
            keep = np.zeros_like(m)
            keep[z] = m[z]
            case.masks[k] = keep
        return case

    monkeypatch.setattr("progidiff.train.prepare_case", no_labels)
    b = tmp_path / "b"
    train(TrainConfig(dataset=str(tiny_dataset), output=str(b), organs=("liver",), stage1_data="images",
                      **{**TINY, "stage2_steps": 1}), progress=False)
    assert stage1_losses(a) == pytest.approx(stage1_losses(b))


def test_baseline_unet_trains_saves_reloads_and_segments(tmp_path, tiny_dataset, tiny_model):
    from progidiff.baseline import BASELINE_CARD, Baseline, find_baseline

    out = tiny_model.parent / f"{tiny_model.name}-baseline-unet"
    train(TrainConfig(dataset=str(tiny_dataset), output=str(out), organs=("liver", "kidney_left"), baseline="unet",
                      lr=3e-3, **{**TINY, "stage2_steps": 20}), progress=False)
    card = json.loads((out / BASELINE_CARD).read_text(encoding="utf-8"))
    assert card["kind"] == "baseline-unet" and card["training"]["steps"] == 23
    assert find_baseline(tiny_model) == out
    base = Baseline(out)
    scan = read_scan(tiny_dataset / "imagesTr" / "case_001_0000.nii.gz")
    mask = base.segment(scan, "liver", "CT")
    assert mask.shape == sitk.GetArrayViewFromImage(scan.image).shape and mask.dtype == bool
    with pytest.raises(Exception, match="not trained for"):
        base.segment(scan, "spleen", "CT")
    # A corrupted weight file is refused with the card's checksum.
    (out / "baseline.safetensors").write_bytes((out / "baseline.safetensors").read_bytes()[:-8] + b"\0" * 8)
    from progidiff.errors import ModelError

    with pytest.raises(ModelError, match="sha256"):
        Baseline(out)
    import shutil

    shutil.rmtree(out)


def test_evaluate_reports_the_baseline_beside_the_proposals(tmp_path, tiny_dataset, tiny_model):
    from progidiff.evaluate import evaluate

    base = tmp_path / "base"
    train(TrainConfig(dataset=str(tiny_dataset), output=str(base), organs=("liver", "kidney_left"), baseline="unet",
                      **{**TINY, "stage2_steps": 2}), progress=False)
    rep = evaluate(str(tiny_model), str(tiny_dataset), tmp_path / "eval", proposals=2, steps=2, device="cpu",
                   baseline=str(base))
    for organ in rep["organs"].values():
        assert 0.0 <= organ["baseline"]["dice"] <= 1.0
    assert "baseline" in rep["mean_dice"]
    for case in rep["cases"]:   # how far it agrees with the ranked-first proposal, over the scan and where scored
        assert 0.0 <= case["baseline_agreement"]["scan"] <= 1.0 and 0.0 <= case["baseline_agreement"]["scored"] <= 1.0
    md = (tmp_path / "eval" / "report.md").read_text(encoding="utf-8")
    assert "baseline UNet Dice" in md
    assert (tmp_path / "eval" / "report.png").stat().st_size > 1000
    # the slice figure: every organ's worst slice, with the baseline's outline too
    assert "](report-slices.png)" in md
    assert (tmp_path / "eval" / "report-slices.png").stat().st_size > 5000


def test_the_slice_figure_shows_where_the_ranked_first_proposal_is_most_wrong(tmp_path):
    from progidiff.overview import render_slices, slice_panel

    image = np.zeros((5, 20, 20), np.float32)
    ref = np.zeros((5, 20, 20), bool)
    ref[:, 5:15, 5:15] = True                     # largest on every slice alike
    first = ref.copy()
    first[3, 5:15, 15:19] = True                  # slice 3: 40 voxels taken in
    first[1, 5:8, 5:15] = False                   # slice 1: 30 voxels missed
    z, panel = slice_panel(image, {"reference": ref, "ranked_first": first, "consensus": ref}, 1.0)
    assert z == 3 and panel["ranked_first"].sum() == 140 and panel["reference"].sum() == 100
    # a proposal that is right everywhere: the reference's largest slice
    ref2 = ref.copy()
    ref2[2, 2:18, 2:18] = True
    assert slice_panel(image, {"reference": ref2, "ranked_first": ref2}, 1.0)[0] == 2
    render_slices([("liver", panel)], tmp_path / "s.png", "t")
    assert (tmp_path / "s.png").stat().st_size > 1000


def test_per_slice_dice_weighs_a_missed_small_organ_like_a_missed_large_one():
    from progidiff.train import mask_dice_loss

    label = torch.zeros(2, 1, 64, 64)
    label[0, 0, 10:40, 10:40] = 1      # a large organ (900 px), predicted exactly
    label[1, 0, 30:33, 30:33] = 1      # a 9-px vessel, missed entirely
    pred = label.clone()
    pred[1] = 0
    per_slice = float(mask_dice_loss("sample")(pred, label))
    per_batch = float(mask_dice_loss("batch")(pred, label))
    assert per_slice > 0.44            # (0 + 0.9) / 2: with smoothing 1 a missed 9-px organ costs 1 - 1/10
    assert per_batch < 0.01            # the batch Dice hardly sees it: why the aorta was never learned
    empty = torch.zeros(1, 1, 64, 64)
    assert float(mask_dice_loss("sample")(empty, empty)) == 0.0
    stray = empty.clone()
    stray[0, 0, :2, :5] = 1            # 10 false pixels on an organ-free slice
    assert float(mask_dice_loss("sample")(stray, empty)) > 0.9
    both = float(mask_dice_loss("both")(pred, label))
    assert abs(both - (per_slice + per_batch)) < 1e-6


def test_init_from_fine_tunes_a_trained_model_on_its_own_grid(tmp_path, tiny_dataset, tiny_model, capsys):
    from safetensors.torch import load_file

    from progidiff.cli import main
    from progidiff.engine import Engine, SegmentOptions
    from progidiff.model import WEIGHTS_NAME

    # No step: the saved model is the one it started from, weight for weight.
    same = tmp_path / "same"
    assert main(["train", str(tiny_dataset), "-o", str(same), "--init-from", str(tiny_model), "--organs", "liver",
                 "--stage2-steps", "0", "--workers", "0"]) == 0
    a, b = load_file(tiny_model / WEIGHTS_NAME), load_file(same / WEIGHTS_NAME)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # A few steps on an organ the tiny model never learned: stage 1 is skipped, the default
    # 64 px / 6 mm grid is replaced by the model's own, and the card counts the first training.
    tuned = tmp_path / "tuned"
    assert main(["train", str(tiny_dataset), "-o", str(tuned), "--init-from", str(tiny_model), "--organs", "liver", "spleen",
                 "--stage2-steps", "3", "--batch-size", "4", "--workers", "0"]) == 0
    b = load_file(tuned / WEIGHTS_NAME)
    assert any(not torch.equal(a[k], b[k]) for k in a)
    stages = {line.split(",")[0] for line in (tuned / "train_log.csv").read_text(encoding="utf-8").splitlines()[1:]}
    assert stages == {"2"}
    config = json.loads((tuned / "config.json").read_text(encoding="utf-8"))
    assert config["grid_size"] == [32, 32] and config["grid_spacing"] == [12.0, 12.0, 10.0]
    card = json.loads((tuned / "model_card.json").read_text(encoding="utf-8"))
    assert card["organs"] == ["liver", "spleen"] and card["training"]["init_from"]["model"] == tiny_model.name
    assert card["training"]["init_from"]["seconds"] > 0 and card["training"]["init_from"]["steps"] == 4 + 6
    assert card["training"]["config"]["stage1_steps"] == 0     # skipped, so not claimed
    assert "Fine-tuned from" in (tuned / "README.md").read_text(encoding="utf-8")
    result = Engine(tuned, device="cpu").segment(read_scan(tiny_dataset / "imagesTr" / "case_001_0000.nii.gz"), "spleen",
                                                 SegmentOptions(proposals=1, steps=1))
    assert result.masks.shape[0] == 1

    capsys.readouterr()
    assert main(["train", str(tiny_dataset), "-o", str(tmp_path / "x"), "--init-from", str(tiny_model), "--baseline", "unet"]) != 0
    assert "--init-from" in capsys.readouterr().err
    assert main(["train", str(tiny_dataset), "-o", str(tmp_path / "y"), "--init-from", str(tmp_path / "nope")]) != 0
    assert "error" in capsys.readouterr().err and not (tmp_path / "y").exists()

    # A second link in the chain counts both before it: seconds, steps and commands in order.
    again = tmp_path / "again"
    assert main(["train", str(tiny_dataset), "-o", str(again), "--init-from", str(tuned), "--organs", "liver", "spleen",
                 "--stage2-steps", "0", "--workers", "0"]) == 0
    chain = json.loads((again / "model_card.json").read_text(encoding="utf-8"))["training"]["init_from"]
    first = json.loads((tiny_model / "model_card.json").read_text(encoding="utf-8"))["training"]
    assert chain["steps"] == 4 + 6 + 3
    assert chain["seconds"] == pytest.approx(card["training"]["seconds"] + first["seconds"])
    assert chain["commands"] == [first["command"], card["training"]["command"]]
    assert "in 2 runs" in (again / "README.md").read_text(encoding="utf-8")


def test_body_scale_out_of_range_is_one_line_error(tmp_path, tiny_dataset, capsys):
    from progidiff.cli import main

    assert main(["train", str(tiny_dataset), "-o", str(tmp_path / "m"), "--body-scale", "1.3", "0.6"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--body-scale" in err and "\n" not in err and not (tmp_path / "m").exists()


@pytest.mark.parametrize("body_scale", [(1.5, 1.5), (0.6, 0.6)])
def test_body_scale_augmentation_draws_the_content_that_many_times_as_large(body_scale):
    """--body-scale is the content's size: MONAI's RandAffine scale factor is its inverse."""
    from progidiff.data import augmentation

    img = np.zeros((1, 64, 64), np.float32)
    img[0, 22:42, 22:42] = 1.0
    t = augmentation(body_scale=body_scale)
    t.set_random_state(seed=0)
    spatial = t.transforms[0]  # the affine alone: scale, rotation and shift; area depends on scale only
    spatial.prob = 1.0
    spatial.rand_affine.rand_affine_grid.rotate_range = (0.0,)
    out = np.asarray(spatial({"image": img, "label": img.copy()})["label"])
    assert (out > 0.5).sum() / 400.0 == pytest.approx(body_scale[0] ** 2, rel=0.1)


def test_contrast_gain_enhances_the_table_s_organs_only_within_its_phases():
    from progidiff.data import ARTERIAL_FACTOR, CONTRAST_GAIN_HU, contrast_gain

    masks = {o: np.zeros((3, 8, 8), np.float32) for o in ("aorta", "liver", "gallbladder")}
    masks["aorta"][:, 1, 1] = masks["liver"][:, 4:, 4:] = masks["gallbladder"][:, 0, 5] = 1
    for seed in range(20):
        gain = contrast_gain(masks, np.random.default_rng(seed))
        assert np.all(gain[masks["gallbladder"] > 0] == 0)             # bile never enhances
        assert np.all(gain[sum(masks.values()) == 0] == 0)              # nor anything unlabelled
        aorta, liver = gain[:, 1, 1], gain[masks["liver"] > 0]
        assert np.all(CONTRAST_GAIN_HU["aorta"] * 0.2 * 0.8 <= aorta)
        assert np.all(aorta <= CONTRAST_GAIN_HU["aorta"] * 1.3 * ARTERIAL_FACTOR["aorta"] * 1.2)
        assert np.all(liver <= CONTRAST_GAIN_HU["liver"] * 1.3 * 1.2)
    assert contrast_gain({"gallbladder": masks["gallbladder"]}, np.random.default_rng(0)) is None


def test_contrast_phase_brightens_enhancing_organs_and_leaves_labels_and_other_draws_alone(tiny_dataset):
    """--contrast-phase 1: every CT slice in a random phase. The slice draws and their spatial
    augmentation are the run's without it (its own random stream), so labels are identical."""
    from progidiff.data import SliceDataset, prepare_case, read_dataset
    from progidiff.prompts import Vocabulary
    from progidiff.volume import GridSpec

    info, organs = read_dataset(tiny_dataset), ("liver", "kidney_left", "gallbladder")
    cases = [prepare_case(e, info.labels, Vocabulary.load(), GridSpec((6.0, 6.0, 5.0), (64, 64)), organs, "CT")
             for e in info.cases]
    plain = SliceDataset(cases, organs, 1, length=24, seed=5)
    phased = SliceDataset(cases, organs, 1, length=24, seed=5, contrast_phase=1.0)
    gains = []
    for i in range(24):
        a, b = plain[i], phased[i]
        assert torch.equal(a["label"], b["label"]) and a["organ"] == b["organ"] and a["phrase"] == b["phrase"]
        if organs[a["organ"]] in ("liver", "kidney_left") and a["label"].sum() > 20:
            inside = a["label"][0] > 0
            gains.append(float((b["image"][1][inside] - a["image"][1][inside]).mean()))
    # brighter inside the enhancing organ on every such slice, by 15 HU or more on average (a weak
    # arterial phase gives the liver a few HU only)
    assert gains and min(gains) > 0 and np.mean(gains) > 15 / 500
    assert SliceDataset(cases, organs, 1, length=4, seed=5, contrast_phase=1.0, augment=False).contrast_phase == 0.0


def test_fatty_liver_darkens_the_liver_alone_and_leaves_labels_and_other_draws_alone(tiny_dataset):
    """--fatty-liver 1: every CT slice's liver 10 to 60 HU darker, nothing else changed (apart from the
    in-plane border blur of a voxel or so); the draws, labels and the contrast phase's own stream are the
    run's without it."""
    from progidiff.data import FATTY_LIVER_HU, SliceDataset, prepare_case, read_dataset
    from progidiff.prompts import Vocabulary
    from progidiff.volume import GridSpec

    info, organs = read_dataset(tiny_dataset), ("liver", "kidney_left", "gallbladder")
    cases = [prepare_case(e, info.labels, Vocabulary.load(), GridSpec((6.0, 6.0, 5.0), (64, 64)), organs, "CT")
             for e in info.cases]
    plain = SliceDataset(cases, organs, 1, length=24, seed=5, augment=True)
    fatty = SliceDataset(cases, organs, 1, length=24, seed=5, fatty_liver=1.0)
    phased = SliceDataset(cases, organs, 1, length=24, seed=5, contrast_phase=1.0)
    both = SliceDataset(cases, organs, 1, length=24, seed=5, contrast_phase=1.0, fatty_liver=1.0)
    drops, far_changes = [], []
    for i in range(24):
        a, b, c, d = plain[i], fatty[i], phased[i], both[i]
        assert torch.equal(a["label"], b["label"]) and a["organ"] == b["organ"] and a["phrase"] == b["phrase"]
        if organs[a["organ"]] == "liver" and a["label"].sum() > 20:
            inside = a["label"][0] > 0
            drops.append(float((a["image"][1][inside] - b["image"][1][inside]).mean()))
            # the fatty liver adds to the contrast phase's own draw: darker than the phase alone
            assert float((c["image"][1][inside] - d["image"][1][inside]).mean()) > 0
        if organs[a["organ"]] == "kidney_left" and a["label"].sum() > 5:
            inside = a["label"][0] > 0
            far_changes.append(float((a["image"][1][inside] - b["image"][1][inside]).abs().max()))
    lo, hi = FATTY_LIVER_HU
    # darker on every liver slice, within the drawn range (the CT window is 500 HU wide; the blur
    # and the window's clipping take a little off, never more than the range's top)
    assert drops and min(drops) > 0.5 * lo / 500 and max(drops) <= hi / 500 + 1e-6
    # the kidney sits far from the liver in the tiny scan: at most the blur's far tail (under 0.5 HU)
    assert far_changes and max(far_changes) < 1e-3
    assert SliceDataset(cases, organs, 1, length=4, seed=5, fatty_liver=1.0, augment=False).fatty_liver == 0.0


def test_liver_lesions_are_darker_balls_inside_the_liver_only():
    """liver_lesion_gain: 1 to 6 balls, each of one density in the drawn range, nowhere outside the liver,
    none wider than the largest diameter; no liver in the stack, no gain."""
    from progidiff.data import LESION_COUNT, LESION_DIAMETER_MM, LESION_HU, liver_lesion_gain
    from scipy import ndimage

    liver = np.zeros((3, 64, 64), bool)
    liver[:, 8:56, 6:46] = True
    for seed in range(20):
        g = liver_lesion_gain({"liver": liver, "kidney_left": ~liver}, np.random.default_rng(seed), (6.0, 6.0, 5.0))
        assert np.all(g[~liver] == 0) and g.min() >= LESION_HU[0] and g.max() <= 0
        values = set(np.unique(g[g < 0]).tolist())
        assert 1 <= len(values) <= LESION_COUNT[1]
        parts, n = ndimage.label(g < 0)
        for k in range(1, n + 1):
            _, yy, xx = np.nonzero(parts == k)
            # a ball 40 mm across at most; two touching balls, 80 mm
            assert (yy.max() - yy.min() + 1) * 6.0 <= 2 * LESION_DIAMETER_MM[1] + 6
    assert liver_lesion_gain({"kidney_left": liver}, np.random.default_rng(0), (6.0, 6.0, 5.0)) is None


def test_liver_lesions_darken_only_the_liver_and_leave_labels_and_draws_alone(tiny_dataset):
    """--liver-lesions 1: every CT liver slice holds darker spots inside the liver (the labels unchanged:
    a lesion is liver), the draws are the run's without it, and the kidney far from the liver keeps its grey."""
    from progidiff.data import SliceDataset, prepare_case, read_dataset
    from progidiff.prompts import Vocabulary
    from progidiff.volume import GridSpec

    info, organs = read_dataset(tiny_dataset), ("liver", "kidney_left")
    cases = [prepare_case(e, info.labels, Vocabulary.load(), GridSpec((6.0, 6.0, 5.0), (64, 64)), organs, "CT")
             for e in info.cases]
    plain = SliceDataset(cases, organs, 1, length=24, seed=5, augment=True)
    spotted = SliceDataset(cases, organs, 1, length=24, seed=5, liver_lesions=1.0)
    darker = 0
    for i in range(24):
        a, b = plain[i], spotted[i]
        assert torch.equal(a["label"], b["label"]) and a["organ"] == b["organ"] and a["phrase"] == b["phrase"]
        if organs[a["organ"]] == "liver" and a["label"].sum() > 20:
            diff = a["image"][1] - b["image"][1]
            darker += int(diff.max() > 10 / 500)
            assert diff.min() > -1e-3                       # nothing made brighter
        if organs[a["organ"]] == "kidney_left" and a["label"].sum() > 5:
            inside = a["label"][0] > 0
            assert float((a["image"][1][inside] - b["image"][1][inside]).abs().max()) < 1e-3
    assert darker >= 3
    assert SliceDataset(cases, organs, 1, length=4, seed=5, liver_lesions=1.0, augment=False).liver_lesions == 0.0


def test_contrast_phase_and_fatty_liver_out_of_range_are_one_line_errors(tmp_path, tiny_dataset, capsys):
    from progidiff.cli import main

    for flag in ("--contrast-phase", "--fatty-liver", "--liver-lesions"):
        rc = main(["train", str(tiny_dataset), "-o", str(tmp_path / "m"), flag, "1.5"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.count("\n") == 0 and flag in err


def test_a_partly_labelled_cohort_draws_each_organ_as_often():
    """Liver labelled in both cases, spleen in one (two datasets merged): each organ half the items,
    and the liver from both cases alike (drawing (case, organ) pairs gave the liver 2/3)."""
    from progidiff.data import PreparedCase, SliceDataset

    def case(name, organs, grey):
        image = np.full((6, 16, 16), grey, np.float32)   # the case's grey level tells its items apart
        masks = {}
        for o in organs:
            m = np.zeros((6, 16, 16), bool)
            m[1:5, 4:10, 4:10] = True
            masks[o] = m
        return PreparedCase(name, "CT", image, masks, 5.0 * np.arange(6), sitk.Image(), 5.0 * np.arange(6))

    ds = SliceDataset([case("a", ["liver"], 0.3), case("b", ["liver", "spleen"], 0.7)], ["liver", "spleen"], context=1,
                      length=2000, augment=False)
    items = [ds[i] for i in range(2000)]
    organs = np.array([it["organ"] for it in items])
    from_a = np.array([float(it["image"].mean()) < 0.5 for it in items])
    assert abs((organs == 0).mean() - 0.5) < 0.04
    assert abs(from_a[organs == 0].mean() - 0.5) < 0.06
    assert not from_a[organs == 1].any()


def test_the_slice_figure_looks_only_inside_the_scored_region():
    """On a held-out slab, a proposal 'wrong' outside it (where there is no reference) must not be shown."""
    from types import SimpleNamespace

    from progidiff.evaluate import _panel

    grid = sitk.Image(20, 20, 6, sitk.sitkFloat32)
    grid.SetSpacing((6.0, 6.0, 5.0))
    keep = np.zeros((6, 20, 20), bool)
    keep[1:3] = True                                   # the slab: slices 1-2
    ref = np.zeros((6, 20, 20), bool)
    ref[1:3, 5:15, 5:15] = True
    first = ref.copy()
    first[2, 5:15, 15:18] = True                       # in the slab: 30 voxels taken in on slice 2
    first[4:6, 0:20, 0:20] = True                      # outside it: whole slices, no reference there
    res = SimpleNamespace(grid=grid, masks=first[None], consensus=first, grid_image=np.zeros((6, 20, 20), np.float32))
    z, panel = _panel(SimpleNamespace(image=grid), res, ref, keep, None)
    assert z == 10.0                                   # slice 2 (5 mm apart): the slab's worst
    assert panel["ranked_first"].sum() == 130
