"""overview.png: the scan with every proposal's outline and the uncertainty map,
on a few axial slices through the organ and one coronal slice, to judge at a glance."""
from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np


def _slices_through(mask: np.ndarray, count: int) -> list[int]:
    zs = np.nonzero(mask.reshape(mask.shape[0], -1).any(1))[0]
    if len(zs) == 0:
        return [mask.shape[0] // 2]
    qs = np.linspace(0.2, 0.8, count) if len(zs) > count else np.linspace(0, 1, min(count, len(zs)))
    return sorted({int(zs[int(round(q * (len(zs) - 1)))]) for q in qs})


def render_overview(image: np.ndarray, masks: np.ndarray, spacing: tuple[float, float, float], path: Path,
                    title: str, n_axial: int = 3) -> None:
    """image (Z, H, W) in [0, 1] and masks (N, Z, H, W) on the axis-aligned model grid
    (x to the patient's left, y posterior): shown in radiological convention."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import cm

    n = masks.shape[0]
    p = masks.mean(0)
    unc = 4 * p * (1 - p)
    union = masks.any(0)
    zs = _slices_through(union, n_axial)
    colours = cm.tab10(np.arange(n) % 10)
    sx, sy, sz = spacing
    yc = int(np.round(np.nonzero(union)[1].mean())) if union.any() else image.shape[1] // 2
    views = [("axial", z) for z in zs] + [("coronal", yc)]
    fig, axes = plt.subplots(2, len(views), figsize=(3.2 * len(views), 6.6), squeeze=False)
    # The title wrapped to stay left of the legend, the panels lowered for its lines (before the colour bar
    # takes its room): with several warnings in it the title ran under the legend and off the picture
    # (REVIEW CAREFULLY, wrong side and heart together: 190 characters in one line).
    lines = textwrap.wrap(title, TITLE_CHARS, break_on_hyphens=False) or [""]
    fig.subplots_adjust(top=0.88 - 0.03 * (len(lines) - 1))
    for col, (kind, k) in enumerate(views):
        if kind == "axial":
            img, ms, u, aspect = image[k], masks[:, k], unc[k], sy / sx
            label = f"axial z={k}"
        else:
            img, ms, u, aspect = image[::-1, k], masks[:, ::-1, k], unc[::-1, k], sz / sx
            label = f"coronal y={k}"
        ax = axes[0, col]
        ax.imshow(img, cmap="gray", vmin=0, vmax=1, aspect=aspect, interpolation="bilinear")
        for i in range(n):
            if ms[i].any():
                ax.contour(ms[i].astype(float), levels=[0.5], colors=[colours[i]], linewidths=1.4 if i == 0 else 0.8)
        ax.set_title(label, fontsize=9)
        ax.axis("off")
        ax2 = axes[1, col]
        ax2.imshow(img, cmap="gray", vmin=0, vmax=1, aspect=aspect, interpolation="bilinear")
        im = ax2.imshow(np.ma.masked_where(u <= 0, u), cmap="inferno", vmin=0, vmax=1, alpha=0.85, aspect=aspect)
        ax2.axis("off")
        if col == 0:
            ax.text(2, 4, "R", color="w", fontsize=9, va="top")
            ax2.set_title("uncertainty (0 = all agree)", fontsize=8)
    fig.colorbar(im, ax=axes[1, :].tolist(), shrink=0.7, label="disagreement")
    handles = [plt.Line2D([], [], color=colours[i], lw=1.5, label=f"#{i + 1}") for i in range(min(n, 10))]
    fig.legend(handles=handles, loc="upper right", fontsize=7, ncol=min(n, 5), title="proposal (rank)",
               title_fontsize=7)
    fig.suptitle("\n".join(lines), fontsize=10, x=0.02, y=0.995, ha="left", va="top")
    fig.savefig(path, dpi=90)
    plt.close(fig)


#: The overview title's line length: what fits left of the legend at 10 pt on the 4-view figure.
TITLE_CHARS = 105


#: How evaluate's slice figure draws each mask: (label, colour, line style).
SLICE_STYLES = {"reference": ("reference", "white", "solid"), "ranked_first": ("ranked-first", "#00d0ff", "solid"),
                "consensus": ("consensus", "#ff9f1c", "dashed"), "baseline": ("baseline UNet", "#ff4fd8", "dotted")}


def slice_panel(image: np.ndarray, masks: dict[str, np.ndarray], aspect: float) -> tuple[int, dict]:
    """The axial slice of the model grid where ``masks["ranked_first"]`` and ``masks["reference"]``
    differ in the most voxels (missed plus taken in; the reference's largest slice where they agree
    everywhere), and what to draw there: image (Z, H, W) in [0, 1], masks (Z, H, W) bool on that grid."""
    ref, first = masks["reference"], masks["ranked_first"]
    wrong = (ref ^ first).reshape(ref.shape[0], -1).sum(1)
    z = int(np.argmax(wrong)) if wrong.any() else int(np.argmax(ref.reshape(ref.shape[0], -1).sum(1)))
    return z, {"image": image[z].copy(), "aspect": aspect, **{k: m[z].copy() for k, m in masks.items()}}


def render_slices(panels: list[tuple[str, dict]], path: Path, title: str) -> None:
    """One panel per (caption, slice_panel) in radiological convention: the reference and each method's
    outline, so that where a Dice comes from (a missed lobe, a neighbour taken in) is seen at once."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(5, max(1, len(panels)))
    rows = int(np.ceil(len(panels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 3.4 * rows + 0.6), squeeze=False, layout="constrained")
    drawn = set()
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (caption, p) in zip(axes.ravel(), panels):
        ax.imshow(p["image"], cmap="gray", vmin=0, vmax=1, aspect=p["aspect"], interpolation="bilinear")
        for key, (_, colour, style) in SLICE_STYLES.items():
            if key in p and p[key].any():
                ax.contour(p[key].astype(float), levels=[0.5], colors=[colour], linestyles=style,
                           linewidths=1.6 if key == "reference" else 1.1)
                drawn.add(key)
        ax.text(2, 4, "R", color="w", fontsize=8, va="top")
        ax.set_title(caption, fontsize=8)
    handles = [plt.Line2D([], [], color=c, ls=s, lw=1.5, label=lab) for k, (lab, c, s) in SLICE_STYLES.items() if k in drawn]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8, facecolor="0.3", labelcolor="w")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=90)
    plt.close(fig)
