"""segment reads the scan's median HU inside the ranked-first proposal and flags a CT liver darker
than a healthy one (a fatty liver, which the shipped model finds less well: docs/evaluation/fatty-liver)."""
from __future__ import annotations

import json
import logging

import numpy as np
import SimpleITK as sitk


def test_a_fatty_liver_is_flagged_with_its_median_hu(tmp_path, ct_path, ct_label_path, caplog):
    from progidiff import cli
    from progidiff.alerts import DARK_LIVER_HU, dark_liver_warning

    # The sample CT with its liver 40 HU darker (to 7 HU), as scripts/enhance_dataset_contrast.py makes it.
    image, labels = sitk.ReadImage(str(ct_path)), sitk.ReadImage(str(ct_label_path))
    arr = sitk.GetArrayFromImage(image)
    arr[sitk.GetArrayViewFromImage(labels) == 5] -= 40
    fatty = sitk.GetImageFromArray(arr)
    fatty.CopyInformation(image)
    path = tmp_path / "fatty.nii.gz"
    sitk.WriteImage(fatty, str(path))
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="progidiff"):
        assert cli.main(["segment", str(path), "--prompt", "liver", "-n", "2", "--steps", "2", "--device", "cpu",
                         "--modality", "CT", "-o", str(out)]) == 0
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    first = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "proposal_01.nii.gz"))) > 0
    assert first.any()
    assert report["median_hu"] == round(float(np.median(arr[first])), 1)   # the ranked-first proposal's, on the scan
    assert report["median_hu"] < DARK_LIVER_HU and report["dark_liver"] is True
    said = [r.getMessage() for r in caplog.records if "HU (median)" in r.getMessage()]
    assert said == [dark_liver_warning(report["median_hu"])]
