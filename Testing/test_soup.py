"""`progidiff average`: the mean of the weights of fine-tunes of one model, and what it refuses."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from progidiff.volume import read_scan


@pytest.fixture(scope="module")
def fine_tunes(tmp_path_factory, tiny_dataset, tiny_model):
    """Two fine-tunes of the tiny model, three steps each, with training seeds 0 and 1."""
    from progidiff.cli import main

    root = tmp_path_factory.mktemp("soup")
    outs = []
    for seed in (0, 1):
        out = root / f"ft-{seed}"
        assert main(["train", str(tiny_dataset), "-o", str(out), "--init-from", str(tiny_model), "--stage2-steps", "3",
                     "--batch-size", "2", "--workers", "0", "--seed", str(seed), "--organs", "liver", "kidney_left"]) == 0
        outs.append(out)
    return outs


def test_average_writes_the_mean_of_the_weights_and_a_card_of_its_ingredients(tmp_path, fine_tunes, tiny_dataset):
    from progidiff.cli import main
    from progidiff.engine import Engine, SegmentOptions
    from progidiff.model import WEIGHTS_NAME

    out = tmp_path / "soup"
    assert main(["average", *map(str, fine_tunes), "-o", str(out)]) == 0
    a, b, m = (load_file(f / WEIGHTS_NAME) for f in (*fine_tunes, out))
    assert a.keys() == m.keys()
    moved = [k for k in a if a[k].is_floating_point() and not torch.equal(a[k], b[k])]
    assert moved  # the two seeds trained apart
    for k in moved:
        want = ((a[k].float() + b[k].float()) / 2).half()
        # fp16 in, fp32 mean, fp16 out: within one fp16 step of the exact mean
        assert torch.allclose(m[k].float(), want.float(), rtol=1e-3, atol=1e-4), k

    card = json.loads((out / "model_card.json").read_text(encoding="utf-8"))
    cards = [json.loads((f / "model_card.json").read_text(encoding="utf-8")) for f in fine_tunes]
    t = card["training"]
    assert [i["seed"] for i in t["weight_average_of"]] == [0, 1]
    assert [i["sha256"] for i in t["weight_average_of"]] == [c["sha256"][WEIGHTS_NAME] for c in cards]
    assert t["seconds"] == pytest.approx(sum(c["training"]["seconds"] for c in cards), abs=0.2)
    assert t["command"].startswith("progidiff average") and t["init_from"] == cards[0]["training"]["init_from"]
    assert t["holdout_z_mm"] == cards[0]["training"]["holdout_z_mm"] and "metrics" not in card
    assert "mean of the weights of 2 fine-tunes" in (out / "README.md").read_text(encoding="utf-8")
    runs = {line.split(",")[0] for line in (out / "train_log.csv").read_text(encoding="utf-8").splitlines()[1:]}
    assert runs == {"ft-0", "ft-1"}
    # A model like any other: it loads (sha256 checked) and segments.
    result = Engine(out, device="cpu").segment(read_scan(tiny_dataset / "imagesTr" / "case_001_0000.nii.gz"), "liver",
                                               SegmentOptions(proposals=1, steps=1))
    assert result.masks.shape[0] == 1
    # An existing model is not written over without --overwrite.
    assert main(["average", *map(str, fine_tunes), "-o", str(out)]) != 0
    assert main(["average", *map(str, fine_tunes), "-o", str(out), "--overwrite"]) == 0


def test_average_refuses_what_is_not_fine_tunes_of_one_model(tmp_path, fine_tunes, tiny_model, tiny_dataset, capsys):
    from progidiff.cli import main

    def refused(*models, why: str) -> None:
        out = tmp_path / "refused"
        capsys.readouterr()
        assert main(["average", *map(str, models), "-o", str(out)]) != 0
        err = capsys.readouterr().err
        assert why in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()

    refused(fine_tunes[0], why="two or more")
    refused(fine_tunes[0], fine_tunes[0], why="same weights")
    # A model trained from scratch is refused unless the others were fine-tuned from it; a copy of
    # their starting point under another name is not it.
    renamed = tmp_path / "renamed"
    shutil.copytree(tiny_model, renamed)
    card = json.loads((renamed / "model_card.json").read_text(encoding="utf-8"))
    card["name"] = "another-model"
    (renamed / "model_card.json").write_text(json.dumps(card), encoding="utf-8")
    refused(renamed, fine_tunes[0], why="trained from scratch")
    other = tmp_path / "other-slab"   # another held-out slab: the mean would have trained on it
    assert main(["train", str(tiny_dataset), "-o", str(other), "--init-from", str(tiny_model), "--stage2-steps", "1",
                 "--batch-size", "2", "--workers", "0", "--holdout-fraction", "0.3", "--organs", "liver", "kidney_left"]) == 0
    refused(fine_tunes[0], other, why="hold out different slabs")
    fewer = tmp_path / "fewer-organs"
    assert main(["train", str(tiny_dataset), "-o", str(fewer), "--init-from", str(tiny_model), "--stage2-steps", "1",
                 "--batch-size", "2", "--workers", "0", "--organs", "liver"]) == 0
    refused(fine_tunes[0], fewer, why="organs")
    refused(fine_tunes[0], tmp_path / "nope", why="no such model folder")


def test_average_takes_a_model_with_its_fine_tune(tmp_path, fine_tunes, tiny_model):
    """WiSE-FT: the mean of a model and a fine-tune of it (either order) is a model whose chain is the
    fine-tune's, and whose time is the fine-tune's alone (the starting point's is in the chain)."""
    from progidiff.cli import main
    from progidiff.model import WEIGHTS_NAME

    out = tmp_path / "wise"
    assert main(["average", str(fine_tunes[0]), str(tiny_model), "-o", str(out)]) == 0
    a, b, m = (load_file(f / WEIGHTS_NAME) for f in (tiny_model, fine_tunes[0], out))
    moved = [k for k in a if a[k].is_floating_point() and not torch.equal(a[k], b[k])]
    assert moved
    for k in moved:
        want = ((a[k].float() + b[k].float()) / 2).half()
        assert torch.allclose(m[k].float(), want.float(), rtol=1e-3, atol=1e-4), k
    card = json.loads((out / "model_card.json").read_text(encoding="utf-8"))
    tune = json.loads((fine_tunes[0] / "model_card.json").read_text(encoding="utf-8"))
    start = json.loads((tiny_model / "model_card.json").read_text(encoding="utf-8"))
    t = card["training"]
    assert t["init_from"] == tune["training"]["init_from"]
    assert t["init_from"]["sha256"] == start["sha256"][WEIGHTS_NAME]   # the fine-tune names its start's weights
    assert [i.get("starting_point", False) for i in t["weight_average_of"]] == [False, True]
    assert t["seconds"] == pytest.approx(tune["training"]["seconds"], abs=0.1)
    assert f"mean of the weights of `{tiny_model.name}` and 1 fine-tune of it" in (out / "README.md").read_text(encoding="utf-8")
    # The starting point with two fine-tunes of it: a mean of three.
    three = tmp_path / "three"
    assert main(["average", str(tiny_model), *map(str, fine_tunes), "-o", str(three)]) == 0
    m3 = load_file(three / WEIGHTS_NAME)
    c = load_file(fine_tunes[1] / WEIGHTS_NAME)
    k = moved[0]
    assert torch.allclose(m3[k].float(), ((a[k].float() + b[k].float() + c[k].float()) / 3).half().float(),
                          rtol=1e-3, atol=1e-4)
