"""The human-readable model card (README.md in a model or adapter folder), rendered from the
JSON card so the two never disagree."""
from __future__ import annotations

import json
import math
from pathlib import Path

from .proposals import BELOW_USUAL, REVIEW_AGREEMENT


def training_metrics_name(card: dict) -> str:
    """The name of the card's metrics entry for the dataset it (a model or an adapter card) was trained on:
    the one whose agreement segment reads as the usual (engine.usual_agreement)."""
    return Path(str(card.get("training", {}).get("dataset", ""))).name


def format_mm(value: float | None) -> str:
    """A distance (HD95) for the tables: '–' where it is undefined (nothing predicted: NaN, or null in JSON)."""
    return "–" if value is None or not math.isfinite(value) else f"{value:.1f}"


def unseen_ends_text(ends: dict[str, list[str]]) -> str:
    """One sentence from the card's ``training.unseen_organ_ends`` ({"liver": ["superior"], ...})."""
    by_end: dict[str, list[str]] = {}
    for organ, sides in ends.items():
        for side in sides:
            by_end.setdefault(side, []).append(organ)
    parts = [f"the {side} end of {', '.join(organs)}" for side, organs in sorted(by_end.items())]
    return ("; ".join(parts) + ". Every training scan's field of view cuts these organs off there, so where a scan "
            "shows that end (and what lies beyond it) the model is on ground it never trained on: review it there.")


def render(card: dict) -> str:
    t = card.get("training", {})
    adapter = card.get("kind") == "lora-adapter"
    title = f"LoRA adapter `{Path(card.get('base_model', '')).name}` → {card.get('modality')}" if adapter else \
        f"Model `{card.get('name', '')}` ({card.get('modality', '')})"
    lines = [f"# {title}", ""]
    if adapter:
        lines += [f"Low-rank adapter (rank {card['rank']}) for base `{card['base_model']}` "
                  f"(weights sha256 `{card['base_sha256'][:16]}…`; refused on any other base). Trainable parameters during "
                  f"adaptation: {card['trainable_parameters']:,} of {card['model_parameters']:,} "
                  f"(**{100 * card['trainable_fraction']:.2f} %**). Bias-field augmentation: "
                  f"{'on' if card.get('bias_field_augmentation') else 'off'}.", ""]
    else:
        lines += [f"Organs: {', '.join(card.get('organs', []))}. Parameters: {card.get('parameters', 0):,}. "
                  f"Model grid: {card.get('grid', {}).get('size')} px at {card.get('grid', {}).get('spacing_mm')} mm, "
                  f"context ±{card.get('grid', {}).get('context')} slice(s).", ""]
    lines += ["## Training", "", f"- Command: `{t.get('command', '')}`",
              f"- Data: `{t.get('dataset', '')}`, cases {', '.join(t.get('cases', []))}",
              f"- Wall time: {t.get('seconds', 0) / 60:.1f} min on {t.get('device', 'cpu')}"
              f"{' (' + str(t.get('processes')) + ' process(es))' if t.get('processes') else ''}"]
    if t.get("init_from"):
        i = t["init_from"]
        first = (i.get("seconds") or 0) / 60
        chain = i.get("commands") or [i.get("command")]
        lines.append(f"- Fine-tuned from `{i.get('model')}` ({first:.1f} min and {i.get('steps', '?')} steps to train"
                     f"{', in ' + str(len(chain)) + ' runs' if len(chain) > 1 else ''}; "
                     f"command{'s, in order' if len(chain) > 1 else ''}: {'; '.join(f'`{c}`' for c in chain)}): "
                     f"**{first + t.get('seconds', 0) / 60:.1f} min in all**")
    if t.get("weight_average_of"):
        parts = [f"`{i.get('model')}` (seed {i.get('seed')}, {(i.get('seconds') or 0) / 60:.1f} min: `{i.get('command')}`)"
                 for i in t["weight_average_of"] if not i.get("starting_point")]
        start = [i.get("model") for i in t["weight_average_of"] if i.get("starting_point")]
        what = f"{len(parts)} fine-tunes" if len(parts) > 1 else "1 fine-tune"
        if start:   # WiSE-FT: the chain's time above already holds the starting point's
            what = f"`{start[0]}` and {what} of it"
        lines.append(f"- **The mean of the weights of {what}** (the wall time above is the fine-tunes' summed): "
                     + "; ".join(parts))
    if t.get("holdout_z_mm"):
        lines.append(f"- Held out from training (world z, mm): {json.dumps(t['holdout_z_mm'])}")
    if t.get("holdout_cases"):
        lines.append(f"- Held out from training, whole cases: {', '.join(t['holdout_cases'])}")
    if t.get("adapt_z_mm"):
        lines.append(f"- Adaptation slab (world z, mm): {json.dumps(t['adapt_z_mm'])}")
    if t.get("unseen_organ_ends"):
        lines.append(f"- **Never seen in training**: {unseen_ends_text(t['unseen_organ_ends'])}")
    cfg = t.get("config")
    if cfg:
        lines.append(f"- Settings: stage 1 {cfg.get('stage1_steps')} steps, stage 2 {cfg.get('stage2_steps')} steps, "
                     f"batch {cfg.get('batch_size')}, lr {cfg.get('lr')}, base fine-tuned in stage 2: {cfg.get('finetune_base')}")
    for dataset, m in card.get("metrics", {}).items():
        lines += ["", f"## Measured on `{dataset}`", ""]
        if m.get("dataset_description"):
            lines.append(f"- The dataset: {m['dataset_description']}")
        lines += [f"- {k}: {v}" for k, v in m.get("evaluated_on", {}).items()]
        base = "baseline" in md if (md := m["mean_dice"]) else False
        agr = any("agreement" in o for o in m["organs"].values())
        lines += [f"- {m['proposals']} proposals, {m['steps']} steps, {m['device']}; command: `{m['command']}`", "",
                  "| organ | ranked-first Dice | HD95 mm | consensus Dice | best-of-N Dice | RandTop-3 Dice | GED |"
                  + (" agreement |" if agr else "") + (" baseline UNet Dice |" if base else ""),
                  "|---|---|---|---|---|---|---|" + ("---|" if agr else "") + ("---|" if base else "")]
        for organ, o in m["organs"].items():
            lines.append(f"| {organ} | {o['ranked_first_dice']:.3f} | {format_mm(o['ranked_first_hd95_mm'])} | {o['consensus_dice']:.3f} | "
                         f"{o['best_of_n_dice']:.3f} | {o['randtop3_dice']:.3f} | {o['ged']:.3f} |"
                         + ((f" {o['agreement']:.3f} |" if "agreement" in o else " – |") if agr else "")
                         + (f" {o.get('baseline_unet_dice', float('nan')):.3f} |" if base else ""))
        lines.append(f"| **mean** | **{md['ranked_first']:.3f}** | | **{md['consensus']:.3f}** | **{md['best_of_n']:.3f}** | "
                     f"**{md['randtop3']:.3f}** | |" + (" |" if agr else "") + (f" **{md['baseline']:.3f}** |" if base else ""))
        if agr and dataset == training_metrics_name(card):
            lines += ["", f"Agreement is the proposals' mean pairwise Dice. `segment` asks for careful review where they "
                          f"agree below {REVIEW_AGREEMENT:.2f}, or more than {BELOW_USUAL:.2f} below this table's agreement "
                          "for the organ: the model is less sure of that scan than of this data. The agreement is over each whole scan, "
                          "as `segment` measures it, while the Dice is over the part scored."]
    # Said of this card's own data (a researcher's model trains on their labels, not the shipped model's
    # TotalSegmentator predictions); each table's dataset description says what its labels are.
    n = len(t.get("cases", []))
    data = (f"Trained on {n} case{'s' * (n != 1)} of `{t.get('dataset', '')}`: expect lower accuracy on people, scanners "
            "and protocols unlike " + ("it" if n == 1 else "them")) if n else \
        "Expect lower accuracy on people, scanners and protocols unlike its training data"
    lines += ["", data + ". Each table above is only as good as its dataset's labels; its description says what they are.", ""]
    return "\n".join(lines)


def write_markdown(folder: Path) -> Path:
    for name in ("adapter_card.json", "model_card.json"):
        if (folder / name).is_file():
            out = folder / "README.md"
            out.write_text(render(json.loads((folder / name).read_text(encoding="utf-8"))), encoding="utf-8")
            return out
    raise FileNotFoundError(folder)
