#!/usr/bin/env python3
"""Picture the same axial slice of several copies of a dataset side by side (each presentation the
robustness scripts make, beside the scan as acquired), with the reference outlines of the named labels:
the patient's right on the left and the front up, as radiologists read, in the abdominal window
(W400 L40), and optionally other masks (--masks: a proposal `progidiff segment` wrote, say). The slice is
the one at --z-mm in world z, from each dataset's first case.

example:
  python scripts/plot_dataset_slices.py --z-mm 353 --labels stomach duodenum inferior_vena_cava \\
      -o slices.png "as acquired=../shared/data/ct-abdomen" "oral contrast=runs/generalisation/ct-oral-contrast"
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

#: The abdominal window (W400 L40), HU.
WINDOW = (-160.0, 240.0)
COLOURS = ("tab:orange", "tab:green", "tab:cyan", "tab:pink", "tab:red", "tab:purple", "tab:olive", "tab:blue")
MASK_COLOURS = ("cyan", "magenta", "yellow", "lime")


def axial_slice(image: sitk.Image, z_mm: float, label: bool = False) -> np.ndarray:
    """The axial slice of ``image`` at world z ``z_mm``, resampled axis-aligned in world (LPS) coordinates
    at its finest in-plane spacing: rows run from the front to the back, columns from the patient's right
    to the left. Nearest neighbour for a ``label`` map."""
    corners = [image.TransformContinuousIndexToPhysicalPoint([float(i * (n - 1)) for i, n in zip(c, image.GetSize())])
               for c in np.ndindex(2, 2, 2)]
    lo, hi = np.min(corners, 0), np.max(corners, 0)
    step = min(image.GetSpacing()[:2])
    ref = sitk.Image([int(np.floor((hi[0] - lo[0]) / step)) + 1, int(np.floor((hi[1] - lo[1]) / step)) + 1, 1],
                     sitk.sitkFloat32)
    ref.SetOrigin((float(lo[0]), float(lo[1]), float(z_mm)))
    ref.SetSpacing((step, step, 1.0))
    interp, fill = (sitk.sitkNearestNeighbor, 0.0) if label else (sitk.sitkLinear, -1024.0)
    return sitk.GetArrayFromImage(sitk.Resample(image, ref, sitk.Transform(), interp, fill))[0]


def main(argv: list[str] | None = None) -> int:
    doc = __doc__.split("\n\n")
    p = argparse.ArgumentParser(description=doc[0], epilog=doc[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("datasets", nargs="+", metavar="TITLE=DATASET")
    p.add_argument("--z-mm", type=float, required=True, help="world z of the slice (mm)")
    p.add_argument("--labels", nargs="*", default=[], help="label names outlined (the first dataset's reference)")
    p.add_argument("--masks", nargs="*", default=[], metavar="[PANEL:]NAME=FILE",
                   help="other masks outlined (dashed), e.g. a proposal segment wrote: on every panel, or on "
                        "panel PANEL (1, 2, ...) alone")
    p.add_argument("-o", "--output", required=True, help="the PNG written")
    a = p.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    try:
        panels = [(t, Path(d)) for t, d in (s.split("=", 1) for s in a.datasets)]
    except ValueError:
        print(f"plot_dataset_slices: give each dataset as TITLE=DATASET, got {a.datasets}", file=sys.stderr)
        return 2
    if any("=" not in m for m in a.masks):
        print(f"plot_dataset_slices: give each mask as NAME=FILE, got {a.masks}", file=sys.stderr)
        return 2
    first = panels[0][1]
    try:
        names = {k: int(v) for k, v in json.loads((first / "dataset.json").read_text(encoding="utf-8"))["labels"].items()}
        label_file = sorted((first / "labelsTr").glob("*.nii*"))[0]
        missing = [n for n in a.labels if n not in names]
        if missing:
            raise ValueError(f"no such label in {first}: {', '.join(missing)}")
        lab = axial_slice(sitk.ReadImage(str(label_file)), a.z_mm, label=True)
        case = label_file.name.split(".nii")[0]
        extra = []
        for m in a.masks:
            name, f = m.split("=", 1)
            panel, name = name.split(":", 1) if ":" in name and name.split(":", 1)[0].isdigit() else ("0", name)
            extra.append((int(panel), name, axial_slice(sitk.ReadImage(f), a.z_mm, label=True) > 0))
        scans = [axial_slice(sitk.ReadImage(str(sorted((d / "imagesTr").glob(f"{case}_0000.nii*"))[0])), a.z_mm)
                 for _, d in panels]
    except (OSError, IndexError, KeyError, ValueError, RuntimeError) as e:
        print(f"plot_dataset_slices: {str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}",
              file=sys.stderr)
        return 2
    fig, axes = plt.subplots(1, len(panels), figsize=(3.7 * len(panels), 4.2), squeeze=False)
    styles = dict(zip(dict.fromkeys(n for _, n, _ in extra), MASK_COLOURS))
    for k, (ax, (title, _), arr) in enumerate(zip(axes[0], panels, scans), 1):
        ax.imshow(arr, cmap="gray", vmin=WINDOW[0], vmax=WINDOW[1], origin="upper")
        for name, colour in zip(a.labels, COLOURS):
            if (lab == names[name]).any():
                ax.contour(lab == names[name], levels=[0.5], colors=colour, linewidths=0.9)
        for panel, name, mask in extra:
            if panel in (0, k) and mask.any():
                ax.contour(mask, levels=[0.5], colors=styles[name], linewidths=1.1, linestyles="--")
        ax.text(0.02, 0.95, "R", color="white", fontsize=9, transform=ax.transAxes, va="top")
        ax.set_title(title, fontsize=10)
        ax.set_axis_off()
    handles = [plt.Line2D([], [], color=c, label=n.replace("_", " ")) for n, c in zip(a.labels, COLOURS)]
    handles += [plt.Line2D([], [], color=c, linestyle="--", label=n) for n, c in styles.items()]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9, bbox_to_anchor=(0.5, 0.02))
    fig.suptitle(f"z = {a.z_mm:g} mm, {case} (outlines: the reference labels)", fontsize=10)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.88, bottom=0.1, wspace=0.03)
    Path(a.output).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.output, dpi=100, bbox_inches="tight")
    print(f"written to {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
