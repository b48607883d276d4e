"""LoRA adaptation: adapter files, round trip, refusal on another base, modality detection."""
import json
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import interrupt, write_dicom_series
from progidiff.adapt import ADAPTER_CARD, ADAPTER_WEIGHTS, apply_adapter, shot_slab
from progidiff.engine import Engine, SegmentOptions
from progidiff.errors import ModelError
from progidiff.model import ProGiDiffModel
from progidiff.volume import guess_modality, read_scan

REPO = Path(__file__).resolve().parents[1]


def test_adapter_is_small_and_records_its_base(tiny_adapter, tiny_model):
    card = json.loads((tiny_adapter / ADAPTER_CARD).read_text(encoding="utf-8"))
    base = json.loads((tiny_model / "model_card.json").read_text(encoding="utf-8"))
    assert card["base_sha256"] == base["sha256"]["diffusion_pytorch_model.safetensors"]
    assert card["modality"] == "MR" and 0 < card["trainable_fraction"] <= 0.05
    assert (tiny_adapter / ADAPTER_WEIGHTS).stat().st_size < (tiny_model / "diffusion_pytorch_model.safetensors").stat().st_size
    held = card["training"]["holdout_z_mm"]["mr_001"]
    adapt = card["training"]["adapt_z_mm"]["mr_001"]
    assert all(b <= adapt[0] or a >= adapt[1] for a, b in held)  # held-out slabs do not overlap the shots


def test_round_trip_and_effect(tiny_adapter, tiny_model):
    base = ProGiDiffModel.from_pretrained(tiny_model)
    a1, a2 = apply_adapter(base, tiny_adapter), apply_adapter(base, tiny_adapter)
    x, t, s, img = torch.randn(2, 1, 32, 32), torch.tensor([10, 600]), torch.randn(2, 8, 384), torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(a1(x, t, s, img), a2(x, t, s, img))
        assert not torch.allclose(a1(x, t, s, img), base(x, t, s, img))
    lora = [n for n, _ in a1.named_parameters() if "lora_" in n]
    assert lora and all(n.startswith("controlnet.") for n in lora)


def test_refuses_another_base(tiny_adapter, tmp_path):
    from progidiff.model import small_unet_config

    other = ProGiDiffModel(unet_config=small_unet_config(sample_size=32, channels=(8, 16, 16, 16)),
                           encoder_channels=(8, 8, 8), grid_size=(32, 32))
    other.save_pretrained(tmp_path / "other", card={"organs": ["liver"]})
    with pytest.raises(ModelError, match="made for model"):
        apply_adapter(ProGiDiffModel.from_pretrained(tmp_path / "other"), tiny_adapter)


def test_engine_picks_the_adapter_for_mr(tiny_adapter, tiny_model, tmp_path, mr_path):
    models = tmp_path / "models"
    shutil.copytree(tiny_model, models / "tiny")
    shutil.copytree(tiny_adapter, models / "tiny-mr-lora")
    eng = Engine(models / "tiny", device="cpu")
    res = eng.segment(read_scan(mr_path), "liver", SegmentOptions(proposals=1, steps=1))
    assert res.modality == "MR" and res.adapter == "tiny-mr-lora"
    res = Engine(models / "tiny", device="cpu", adapter=None).segment(read_scan(mr_path), "liver",
                                                                      SegmentOptions(proposals=1, steps=1))
    assert res.adapter is None


def test_modality_detection_dicom_and_nifti(tmp_path, mr_path, ct_crop):
    mr = sitk.ReadImage(str(mr_path))
    scan = read_scan(write_dicom_series(mr, tmp_path / "mr_dicom", modality="MR"))
    assert scan.dicom_modality == "MR" and guess_modality(scan) == ("MR", "DICOM Modality tag")
    ct = read_scan(write_dicom_series(sitk.ReadImage(str(ct_crop)), tmp_path / "ct_dicom", modality="CT"))
    assert guess_modality(ct) == ("CT", "DICOM Modality tag")
    assert guess_modality(read_scan(mr_path))[0] == "MR"
    assert guess_modality(read_scan(ct_crop))[0] == "CT"


def test_shot_slab_splits_the_scan():
    z = np.arange(20) * 3.0
    adapt, held = shot_slab(z, 10)
    assert adapt == (13.5, 43.5)
    assert held == [(-1.5, 13.5), (43.5, 58.5)]


def test_adaptation_keeps_the_dice_its_base_was_trained_with(tiny_adapter, shipped_model):
    from progidiff.adapt import base_dice_loss

    card = json.loads((tiny_adapter / ADAPTER_CARD).read_text(encoding="utf-8"))
    assert card["dice_loss"] == "both"            # the tiny base was trained with today's default
    assert base_dice_loss({"training": {"config": {}}}) == "batch"   # a card from before --dice-loss (ct-v3)
    shipped = json.loads((shipped_model / "model_card.json").read_text(encoding="utf-8"))
    assert base_dice_loss(shipped) == "both"
    lora = json.loads((shipped_model.parent / "progidiff-ct-abdomen-mr-lora" / ADAPTER_CARD).read_text(encoding="utf-8"))
    assert lora["dice_loss"] == "both"            # the shipped adapter was adapted from the shipped base


def test_one_seed_gives_one_adapter_whatever_the_global_generator_did(tmp_path, tiny_model, tiny_mr_dataset):
    """peft initialises lora_A from torch's global generator; `adapt --seed` must fix it too."""
    from safetensors.torch import load_file

    from progidiff.adapt import AdaptConfig, adapt

    def run(name: str, seed: int, global_seed: int) -> dict:
        torch.manual_seed(global_seed)      # what ran before in the same process
        out = adapt(AdaptConfig(dataset=str(tiny_mr_dataset), base=str(tiny_model), output=str(tmp_path / name),
                                shots=10, rank=2, steps=2, batch_size=2, seed=seed), progress=False)
        return load_file(str(out / ADAPTER_WEIGHTS))

    a, b, c = run("a", 0, 1), run("b", 0, 2), run("c", 1, 1)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_sigterm_mid_adapt_ends_it_as_ctrl_c_and_leaves_the_adapter_there_as_it_was(tmp_path, tiny_model,
                                                                                     tiny_mr_dataset, tiny_adapter):
    """A scheduler's SIGTERM mid-run: exit 130 with one line, the adapter folder being replaced as it
    was, and no staging folder beside it (before, Python died at once: rc -15)."""
    out = tmp_path / "mr"
    shutil.copytree(tiny_adapter, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    rc, seen, rest = interrupt(["-m", "progidiff.cli", "adapt", str(tiny_mr_dataset), "--from", str(tiny_model),
                                "--rank", "2", "--steps", "400", "--batch-size", "2", "-o", str(out)],
                               tmp_path, signal.SIGTERM, r"adapt: .*\| ?[1-9]\d*/400 \[")
    assert rc == 130, (seen + rest)[-800:]
    assert "cancelled" in rest and "Traceback" not in rest, rest[-800:]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_adapt_writes_its_files_through_a_staging_folder(tmp_path, tiny_model, tiny_mr_dataset, monkeypatch):
    """A save cut short (here: the card fails to write) leaves the adapter folder as it was; before,
    new weights sat beside the old card."""
    from progidiff import card as card_module
    from progidiff.adapt import AdaptConfig, adapt

    cfg = AdaptConfig(dataset=str(tiny_mr_dataset), base=str(tiny_model), output=str(tmp_path / "mr"), shots=10,
                      rank=2, steps=2, batch_size=2)
    adapt(cfg, progress=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "mr").iterdir()}

    def cut(_folder):
        raise KeyboardInterrupt

    monkeypatch.setattr(card_module, "write_markdown", cut)
    cfg.seed = 1  # other weights
    with pytest.raises(KeyboardInterrupt):
        adapt(cfg, progress=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "mr").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_folder_given_in_the_wrong_place_is_named_for_what_it_is(tmp_path, capsys):
    """An adapter as --model, the model as --adapter, the baseline as --model: each was called incomplete
    ('lacks model_card.json; copy the whole folder again')."""
    from progidiff.cli import main

    models = REPO / "Resources" / "Models"
    scan = REPO / "Resources" / "SampleData" / "sample-ct-abdomen.nii.gz"
    for flag, folder, says in (("--model", "progidiff-ct-abdomen-mr-lora", "is a LoRA adapter, not a model; give it as --adapter"),
                               ("--model", "progidiff-ct-abdomen-baseline-unet", "is the deterministic baseline UNet"),
                               ("--adapter", "progidiff-ct-abdomen", "is a ProGiDiff model, not an adapter; give it as --model")):
        assert main(["segment", str(scan), "--prompt", "liver", flag, str(models / folder), "-o", str(tmp_path / "out")]) == 4
        err = capsys.readouterr().err
        assert f"{models / folder}: {says}" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
