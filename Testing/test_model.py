"""ProGiDiffModel persistence, refusals, and the Stable Diffusion folder path."""
import json
import string

import numpy as np
import pytest
import torch

from progidiff.errors import ModelError
from progidiff.model import CARD_NAME, WEIGHTS_NAME, ImageEncoder, ProGiDiffModel, small_unet_config
from progidiff.sampling import sample_proposals


def tiny_model() -> ProGiDiffModel:
    cfg = small_unet_config(sample_size=32, cross_attention_dim=384, channels=(8, 16))
    return ProGiDiffModel(unet_config=cfg, encoder_channels=(8, 8), grid_size=(32, 32))


def test_image_encoder_is_zero_initialised_and_keeps_resolution():
    enc = ImageEncoder(3, 16, (8, 16), downsample=1)
    out = enc(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 16, 32, 32) and torch.count_nonzero(out) == 0
    assert ImageEncoder(3, 16, (8, 16, 16), downsample=8)(torch.rand(1, 3, 64, 64)).shape == (1, 16, 8, 8)


def test_branch_is_a_controlnet_with_the_custom_encoder():
    from diffusers import ControlNetModel, UNet2DConditionModel

    m = tiny_model()
    assert isinstance(m.unet, UNet2DConditionModel) and isinstance(m.controlnet, ControlNetModel)
    assert isinstance(m.controlnet.controlnet_cond_embedding, ImageEncoder)
    # at initialisation the branch adds nothing (zero convolutions): the base alone decides
    x, t, s, img = torch.randn(2, 1, 32, 32), torch.tensor([10, 500]), torch.randn(2, 8, 384), torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m(x, t, s, img), m(x, t, s, None))


def test_save_load_round_trip(tmp_path):
    m = tiny_model().eval()
    m.save_pretrained(tmp_path / "m", card={"organs": ["liver"]}, dtype=torch.float32)
    card = json.loads((tmp_path / "m" / CARD_NAME).read_text(encoding="utf-8"))
    assert card["sha256"][WEIGHTS_NAME] and card["parameters"] == m.num_parameters()
    r = ProGiDiffModel.from_pretrained(tmp_path / "m")
    x, t, s, img = torch.randn(2, 1, 32, 32), torch.tensor([10, 500]), torch.randn(2, 8, 384), torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m(x, t, s, img), r(x, t, s, img))


def test_refuses_corrupt_incomplete_or_incompatible_models(tmp_path):
    m = tiny_model()
    d = tmp_path / "m"
    m.save_pretrained(d)
    w = d / WEIGHTS_NAME
    data = bytearray(w.read_bytes())
    data[-10] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="sha256"):
        ProGiDiffModel.from_pretrained(d)
    w.unlink()
    with pytest.raises(ModelError, match="lacks"):
        ProGiDiffModel.from_pretrained(d)
    m.save_pretrained(d)
    card = json.loads((d / CARD_NAME).read_text(encoding="utf-8"))
    card["format"] = 99
    (d / CARD_NAME).write_text(json.dumps(card), encoding="utf-8")
    with pytest.raises(ModelError, match="format"):
        ProGiDiffModel.from_pretrained(d)
    with pytest.raises(ModelError, match="no such model folder"):
        ProGiDiffModel.from_pretrained(tmp_path / "missing")


def build_tiny_sd(root):
    """A Stable Diffusion folder in diffusers layout, tiny enough for a CPU test."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                         block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                         attention_head_dim=4, norm_num_groups=8).save_pretrained(root / "unet")
    AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(16, 32), latent_channels=4,
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  norm_num_groups=8, sample_size=32).save_pretrained(root / "vae")
    vocab = {c: i for i, c in enumerate(string.ascii_lowercase)}
    vocab.update({c + "</w>": len(vocab) + i for i, c in enumerate(string.ascii_lowercase)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (root / "tok").mkdir(parents=True)
    (root / "tok" / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (root / "tok" / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    CLIPTokenizer(str(root / "tok" / "vocab.json"), str(root / "tok" / "merges.txt")).save_pretrained(root / "tokenizer")
    CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
                                 eos_token_id=vocab["<|endoftext|>"])).save_pretrained(root / "text_encoder")
    return root


def test_from_stable_diffusion_builds_on_the_local_folder(tmp_path):
    from diffusers import UNet2DConditionModel

    from progidiff.engine import load_text_encoder

    sd = build_tiny_sd(tmp_path / "sd")
    m = ProGiDiffModel.from_stable_diffusion(sd, grid_size=(32, 32), encoder_channels=(8, 16))
    base = UNet2DConditionModel.from_pretrained(sd / "unet")
    for k, v in base.state_dict().items():
        torch.testing.assert_close(m.unet.state_dict()[k], v)
    # the branch starts as a copy of the pre-trained base's encoder
    torch.testing.assert_close(m.controlnet.conv_in.weight, base.conv_in.weight)
    assert m.vae is not None and m.latent_size() == (16, 16)
    m.save_pretrained(tmp_path / "progidiff-sd", card={"organs": ["liver"]})
    r = ProGiDiffModel.from_pretrained(tmp_path / "progidiff-sd")
    enc = load_text_encoder(r, tmp_path / "progidiff-sd")
    states = enc.token_states(["liver"])
    assert states.shape[-1] == 32
    probs = sample_proposals(r, np.random.rand(3, 3, 32, 32).astype(np.float32), states, seeds=[0, 1], steps=2)
    assert probs.shape == (2, 3, 32, 32) and 0 <= probs.min() and probs.max() <= 1


def test_shipped_models_are_small_documented_and_load(shipped_model):
    """Resources/Models: <= 30 MB in all, safetensors, model card with command, time, data and numbers."""
    root = shipped_model.parent
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert total <= 30 * 1024 ** 2, total
    card = json.loads((shipped_model / CARD_NAME).read_text(encoding="utf-8"))
    assert card["training"]["command"].startswith("progidiff train")
    assert card["training"]["seconds"] > 0 and card["training"]["cases"]
    assert {"liver", "spleen", "kidney_left", "kidney_right", "gallbladder", "stomach", "pancreas", "aorta",
            "inferior_vena_cava"} <= set(card["organs"])
    assert card["metrics"], "measured numbers belong in the model card"
    ProGiDiffModel.from_pretrained(shipped_model)  # sha256 verified on load


def test_shipped_baseline_is_documented_and_loads(shipped_model):
    """The deterministic UNet shipped beside the default model, which evaluate scores beside it."""
    from progidiff.baseline import BASELINE_CARD, Baseline, find_baseline

    folder = find_baseline(shipped_model)
    assert folder is not None, "Resources/Models/<model>-baseline-unet is missing"
    card = json.loads((folder / BASELINE_CARD).read_text(encoding="utf-8"))
    assert card["training"]["command"].startswith("progidiff train") and "--baseline unet" in card["training"]["command"]
    model_card = json.loads((shipped_model / CARD_NAME).read_text(encoding="utf-8"))
    assert card["training"]["holdout_z_mm"] == model_card["training"]["holdout_z_mm"]  # same held-out slab
    cfg = model_card["training"]["config"]
    # Same budget, counting the steps of the model it was fine-tuned from (--init-from).
    init_steps = model_card["training"].get("init_from", {}).get("steps", 0)
    assert card["training"]["steps"] == cfg["stage1_steps"] + cfg["stage2_steps"] + init_steps
    assert (folder / "README.md").is_file()
    assert set(Baseline(folder).organs) == set(model_card["organs"])


@pytest.mark.parametrize("d", [0.6134969592094421, 0.26249998807907104])
def test_card_shows_the_report_s_rounding(tmp_path, d):
    """The card's README prints each Dice as report.md does (3 decimals of the measured value), not a
    value rounded twice: 0.61349... once showed as 0.614 in the card and 0.613 in the report (rounded
    to 4 decimals first), and ct-v13's pancreas 0.26249998... as 0.263 against 0.262 (to 6 first)."""
    from progidiff.evaluate import record_in_card

    (tmp_path / CARD_NAME).write_text(json.dumps({"name": "m", "modality": "CT"}), encoding="utf-8")
    h = 24.949
    organ = {m: {"dice": d, "hd95": h} for m in ("ranked_first", "consensus", "best_of_n", "randtop3", "baseline")}
    rep = {"dataset": "data/ct", "dataset_description": "painted: not a real scan", "evaluated_on": {}, "proposals": 8,
           "steps": 4, "device": "cpu", "command": "c",
           "organs": {"ivc": {**organ, "ged": d}},
           "mean_dice": {m: d for m in ("ranked_first", "consensus", "best_of_n", "randtop3", "baseline")}}
    record_in_card(rep, tmp_path, None)
    row = next(r for r in (tmp_path / "README.md").read_text(encoding="utf-8").splitlines() if r.startswith("| ivc |"))
    assert row == f"| ivc | {d:.3f} | {h:.1f} | " + " | ".join([f"{d:.3f}"] * 5) + " |", row
    assert "- The dataset: painted: not a real scan" in (tmp_path / "README.md").read_text(encoding="utf-8")
    # an organ with nothing predicted has no HD95: null in the card (strict JSON), "–" in its README
    rep["organs"]["ivc"]["ranked_first"]["hd95"] = float("nan")
    record_in_card(rep, tmp_path, None)
    json.loads((tmp_path / CARD_NAME).read_text(encoding="utf-8"), parse_constant=lambda c: pytest.fail(f"{c} in the card"))
    assert f"| ivc | {d:.3f} | – |" in (tmp_path / "README.md").read_text(encoding="utf-8")


def test_card_says_what_the_model_trained_on_not_what_the_shipped_one_did():
    """A researcher's model card ends with its own data, not the shipped model's: it once told every
    model trained on manual labels that its labels were TotalSegmentator predictions of one person."""
    from progidiff.card import render

    text = render({"name": "m", "modality": "CT", "training": {"dataset": "/data/Task09_Spleen", "cases": ["a", "b", "c"]}})
    assert "Trained on 3 cases of `/data/Task09_Spleen`: expect lower accuracy on people, scanners and protocols unlike them." in text
    assert "TotalSegmentator" not in text
    assert "Trained on 1 case of `x`" in render({"training": {"dataset": "x", "cases": ["a"]}})
    assert "Expect lower accuracy on people, scanners and protocols unlike its training data." in render({})
