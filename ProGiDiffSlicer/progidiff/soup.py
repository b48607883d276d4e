"""Weight averaging of fine-tuned models (a "uniform model soup", Wortsman et al. 2022, arXiv 2203.05482).

Fine-tunes of one model that differ only in their training seed land in one basin of the loss, and
their weights' mean is a model of the same size and sampling cost that keeps what all of them learned
and little of what one draw picked up by chance. On the shipped model, the same 600 fine-tuning
steps drawn with another seed lost the stomach of the held-out slab in three of five draws
(docs/evaluation/fatty-liver); docs/evaluation/weight-average has what the mean of two of them did
(it kept the loss: both had it).

Only fine-tunes of one model (``train --init-from``, the same model and chain) on the same held-out
slabs are averaged: two models trained from scratch share no basin, and their mean is noise. The model
they were fine-tuned from may be one of the ingredients: the mean of a model and its fine-tune is WiSE-FT
(Wortsman et al. 2022, arXiv 2109.01903), which often keeps most of what the fine-tune gained and loses
less of what the starting point could do (docs/evaluation/fatty-liver/ct-v16-criteria.md).
torch and peft have no helper for averaging whole saved models (torch.optim.swa_utils averages
along one run), so the mean is taken here, over the state dicts, in float32.
"""
from __future__ import annotations

import copy
import csv
import logging
from pathlib import Path
from typing import Sequence

import torch

from .errors import InputError
from .model import WEIGHTS_NAME, ProGiDiffModel
from .outputs import check_output_dir, staging

log = logging.getLogger(__name__)

#: Card entries every ingredient must share: what the model is, and what it was trained and held out on.
_SAME_CARD = ("modality", "organs", "vocabulary", "grid")
_SAME_TRAINING = ("init_from", "holdout_z_mm", "holdout_cases", "dataset")


def _training_record(card: dict) -> dict:
    return card.get("training", {})


def _is_parent(parent: ProGiDiffModel, child: ProGiDiffModel) -> bool:
    """Whether ``child`` was fine-tuned from ``parent`` (its card's record of the model it started
    from names the parent, its training command and, where recorded, its weights)."""
    init = _training_record(child.card).get("init_from") or {}
    if not init or init.get("model") != parent.card.get("name"):
        return False
    if init.get("command") != _training_record(parent.card).get("command"):
        return False
    sha = init.get("sha256")   # recorded since 2026-12-07; older cards are matched by name and command
    return sha is None or sha == parent.card.get("sha256", {}).get(WEIGHTS_NAME)


def starting_point(models: Sequence[ProGiDiffModel]) -> int | None:
    """The index of the ingredient every other one was fine-tuned from, if there is one."""
    for i, parent in enumerate(models):
        if all(_is_parent(parent, m) for j, m in enumerate(models) if j != i):
            return i
    return None


def check_ingredients(models: Sequence[ProGiDiffModel], names: Sequence[str]) -> int | None:
    """Refuse, in one line, models whose weights' mean would not be a model of theirs. Returns the
    index of the ingredient the others were fine-tuned from, where one of them is (else None)."""
    parent = starting_point(models) if len(models) > 1 else None
    tunes = [(m, n) for i, (m, n) in enumerate(zip(models, names)) if i != parent]
    first, first_name = tunes[0]
    if not _training_record(first.card).get("init_from"):
        raise InputError(f"{first_name} was trained from scratch; only fine-tunes of one model (train --init-from), "
                         "and the model they started from, can be averaged: models trained apart share no basin, "
                         "and their mean is noise.")
    shas = {}
    for model, name in zip(models, names):
        sha = model.card.get("sha256", {}).get(WEIGHTS_NAME)
        if sha in shas:
            raise InputError(f"{name} and {shas[sha]} hold the same weights; average different training runs.")
        shas[sha] = name
    for model, name in zip(models, names):
        if model is first:
            continue
        if dict(model.config) != dict(first.config):
            raise InputError(f"{name} and {first_name} differ in their architecture or grid (config.json); "
                             "only fine-tunes of one model can be averaged.")
        for key in _SAME_CARD:
            if model.card.get(key) != first.card.get(key):
                raise InputError(f"{name} and {first_name} differ in their card's {key}; "
                                 "only fine-tunes of one model on the same organs can be averaged.")
        for key in _SAME_TRAINING:
            if key == "init_from" and parent is not None and model is models[parent]:
                continue   # the starting point's own start is further up the chain
            # `or None`: older cards leave out an empty list of held-out cases that newer ones write
            if (_training_record(model.card).get(key) or None) != (_training_record(first.card).get(key) or None):
                what = {"init_from": "were fine-tuned from different models (or chains)",
                        "holdout_z_mm": "hold out different slabs", "holdout_cases": "hold out different cases",
                        "dataset": "were trained on different datasets"}[key]
                raise InputError(f"{name} and {first_name} {what}; the mean would have trained on what one of "
                                 "them holds out, or share no basin. Average fine-tunes of one run's recipe.")
    return parent


def mean_state(models: Sequence[ProGiDiffModel]) -> dict[str, torch.Tensor]:
    """The element-wise mean of the models' weights (float32; integer buffers must agree)."""
    states = [m.state_dict() for m in models]
    out = {}
    for key, value in states[0].items():
        if value.is_floating_point():
            out[key] = torch.stack([s[key].float() for s in states]).mean(0)
        else:
            if any(not torch.equal(s[key], value) for s in states[1:]):
                raise InputError(f"the models' {key} differ; they cannot be averaged.")
            out[key] = value
    return out


def soup_card(models: Sequence[ProGiDiffModel], names: Sequence[str], output: Path, command: str,
              parent: int | None = None) -> dict:
    """A fine-tune's card, with the training record of the mean: each ingredient's command, seed and
    time, and the fine-tunes' time summed (each one was trained, so the soup cost all of them; the
    starting point's time is already in their chain's, ``init_from``)."""
    tunes = [i for i in range(len(models)) if i != parent]
    card = copy.deepcopy(models[tunes[0]].card)
    for key in ("sha256", "metrics", "parameters", "format", "engine_version"):
        card.pop(key, None)
    card["name"] = output.name
    t = card.setdefault("training", {})
    ingredients = [{"model": Path(n).name, "command": _training_record(m.card).get("command"),
                    "seed": _training_record(m.card).get("config", {}).get("seed"),
                    "seconds": _training_record(m.card).get("seconds"),
                    "sha256": m.card.get("sha256", {}).get(WEIGHTS_NAME)} for m, n in zip(models, names)]
    if parent is not None:
        ingredients[parent]["starting_point"] = True
    t["weight_average_of"] = ingredients
    t["seconds"] = round(sum(ingredients[i]["seconds"] or 0 for i in tunes), 1)
    t["command"] = command
    cfg = t.get("config")
    if isinstance(cfg, dict):
        cfg["seed"] = [i["seed"] for i in ingredients]
        cfg["output"] = str(output)
    t.pop("resumed_at_stage_step", None)
    return card


def _merged_log(folders: Sequence[Path], path: Path) -> None:
    """The ingredients' loss logs in one file, a ``run`` column first."""
    rows: list[list[str]] = []
    header: list[str] | None = None
    for folder in folders:
        log_path = folder / "train_log.csv"
        if not log_path.is_file():
            continue
        with open(log_path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            head = next(reader, None)
            if head is None:
                continue
            header = header or ["run"] + head
            rows += [[folder.name] + r for r in reader]
    if header:
        with open(path, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([header] + rows)


def average_models(folders: Sequence[str | Path], output: str | Path, command: str = "",
                   overwrite: bool = False) -> Path:
    """Average two or more fine-tunes of one model into ``output`` (a model folder like train's)."""
    folders = [Path(f) for f in folders]
    out = Path(output)
    if len(folders) < 2:
        raise InputError("give two or more model folders to average.")
    if any(f.resolve() == out.resolve() for f in folders):
        raise InputError(f"{out}: is one of the models to average; write the mean to another folder.")
    check_output_dir(out, overwrite)
    if (out / "model_card.json").is_file() and not overwrite:
        raise InputError(f"{out}: already holds a model; use --overwrite or another -o.")
    names = [str(f) for f in folders]
    models = [ProGiDiffModel.from_pretrained(f) for f in folders]
    parent = check_ingredients(models, names)
    model = models[0]
    model.load_state_dict(mean_state(models))
    card = soup_card(models, names, out, command, parent)
    # Written beside OUTPUT and moved in once whole (as adapt does): a stop while saving leaves no
    # model whose weights and card disagree.
    with staging(out, overwrite=True) as tmp:
        model.save_pretrained(tmp, card=card)
        _merged_log(folders, tmp / "train_log.csv")
        from .card import write_markdown

        write_markdown(tmp)
    log.info("saved the mean of %d models to %s", len(folders), out)
    return out
