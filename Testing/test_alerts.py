"""segment's warnings are made in one place (progidiff.alerts) and shown in four: the command line,
report.json, the overview's title and the Slicer notice. These pin what each form says."""
from progidiff.alerts import (DARK_LIVER_HU, LIVER_TOP_LEFT_SHARE, dark_liver_warning, find_alerts, heart_warning,
                              nothing_found_warning, review_warning, unseen_end_warning, window_cut_warning)

CALM = dict(review=False, agreement=0.9, unseen_ends=[], window_cut=[], window_mm=384.0, median_hu=55.0,
            top_left_share=0.05)


def test_a_calm_result_says_nothing():
    assert find_alerts("liver", "Liver", **CALM) == []


def test_every_warning_in_order_with_its_code_phrase_and_sentence():
    loud = dict(CALM, review=True, agreement=0.62, unseen_ends=["superior", "inferior"], window_cut=["left"],
                median_hu=12.4, top_left_share=0.8)
    found = find_alerts("liver", "Liver", **loud)
    assert [a.codes for a in found] == [("review",), ("unseen superior end", "unseen inferior end"), ("cut left",),
                                        ("dark liver",), ("heart?",)]
    assert [a.phrase for a in found] == ["REVIEW CAREFULLY", "superior and inferior ends unseen in training",
                                         "cut at the window's left edge", "reads 12 HU: a fatty liver?",
                                         "top left of the midline: the heart?"]
    assert [a.text for a in found] == [review_warning(0.62), unseen_end_warning("liver", ["superior", "inferior"]),
                                       window_cut_warning("liver", ["left"], 384.0), dark_liver_warning(12.4),
                                       heart_warning(0.8)]
    assert "agreement 0.62, under 0.80" in found[0].text
    assert "top and bottom slices" in found[1].text


def test_proposals_that_are_all_empty_are_said_first_and_not_as_absence():
    """Empty proposals 'agree' at 1.0, so no review flag fires: this alert is what tells the user."""
    found = find_alerts("kidney_left", "Left kidney", **dict(CALM, agreement=1.0, median_hu=None, top_left_share=None,
                                                              unseen_ends=["superior"], empty_of=8))
    assert [a.codes for a in found][0] == ("nothing found",) and found[0].phrase == "NOTHING FOUND"
    assert found[0].text == nothing_found_warning("left kidney", 8)
    assert found[0].text.startswith("None of the 8 proposals holds any left kidney")
    assert "not a finding that the left kidney is absent" in found[0].text
    assert find_alerts("liver", "Liver", **dict(CALM, empty_of=0)) == []


def test_the_liver_signs_are_the_liver_s_and_need_a_measurement():
    loud = dict(CALM, median_hu=12.0, top_left_share=0.9)
    assert find_alerts("spleen", "Spleen", **loud) == []
    assert find_alerts("liver", "Liver", **dict(CALM, median_hu=None, top_left_share=None)) == []   # MR, or empty
    at = find_alerts("liver", "Liver", **dict(CALM, median_hu=DARK_LIVER_HU, top_left_share=LIVER_TOP_LEFT_SHARE))
    assert at == []   # both thresholds are strict


def test_the_window_names_both_sides_cut():
    (cut,) = find_alerts("spleen", "Spleen", **dict(CALM, window_cut=["left", "posterior"]))
    assert cut.codes == ("cut left", "cut posterior")
    assert cut.phrase == "cut at the window's left and posterior edges"
    assert "The spleen reaches the edge of the model's 384 mm window on the patient's left and posterior sides" in cut.text


def test_review_below_the_usual_says_against_what():
    (alert,) = find_alerts("kidney_left", "Left kidney", **dict(CALM, review=True, agreement=0.823, usual_agreement=0.8715))
    assert alert.codes == ("review",) and alert.phrase == "REVIEW CAREFULLY (the usual 0.87)"
    assert alert.text == review_warning(0.823, 0.8715)
    assert "(agreement 0.82, against 0.87 there, as the model card records; more than 0.03 less)" in alert.text
    (floor,) = find_alerts("kidney_left", "Left kidney", **dict(CALM, review=True, agreement=0.62, usual_agreement=0.8715))
    assert floor.phrase == "REVIEW CAREFULLY" and "under 0.80" in floor.text
    # a review flag set by another rule, with no usual agreement known, is still said without failing
    (other,) = find_alerts("liver", "Liver", **dict(CALM, review=True, agreement=0.85))
    assert other.phrase == "REVIEW CAREFULLY" and other.text.startswith("The proposals disagree (agreement 0.85)")


def test_segment_help_states_the_review_thresholds_the_engine_uses():
    """The --help text spells them out (cli imports no numpy, so that --help stays fast): it must not drift."""
    from progidiff.cli import EPILOG_SEGMENT
    from progidiff.proposals import BELOW_USUAL, REVIEW_AGREEMENT

    assert f"below {REVIEW_AGREEMENT:.2f}, or more than {BELOW_USUAL:.2f} below the organ's" in EPILOG_SEGMENT


def test_a_modality_given_against_the_scan_is_said_not_refused(ct_crop, mr_path):
    from progidiff.alerts import modality_doubt_warning
    from progidiff.engine import Engine, SegmentOptions
    from progidiff.volume import read_scan

    reason = "given, though the scan looks like MR: intensity heuristic (1st percentile -2: not Hounsfield units)"
    (alert,) = find_alerts("liver", "Liver", **dict(CALM, modality="CT", modality_reason=reason))
    assert alert.codes == ("modality?",) and alert.phrase == "given as CT: is it?"
    assert alert.text == modality_doubt_warning("CT", reason)
    assert alert.text.startswith("The modality was given as CT, but the scan looks like MR: intensity heuristic")
    assert find_alerts("liver", "Liver", **dict(CALM, modality="CT", modality_reason="given")) == []
    # through the engine: the MR given as CT is segmented, and said to look like MR; the CT given as CT is not
    engine = Engine(device="cpu")
    mr = engine.segment(read_scan(mr_path), "liver", SegmentOptions(proposals=1, steps=1, modality="CT"))
    assert mr.modality == "CT" and mr.modality_reason.startswith("given, though the scan looks like MR: ")
    assert "modality?" in mr.warnings
    ct = engine.segment(read_scan(ct_crop), "liver", SegmentOptions(proposals=1, steps=1, modality="CT"))
    assert ct.modality_reason == "given" and "modality?" not in ct.warnings


def test_the_overview_title_is_wrapped_left_of_the_legend(tmp_path, monkeypatch):
    """With REVIEW CAREFULLY, a wrong side and the heart together the title was one line of 190 characters, run
    under the legend and off the picture."""
    import numpy as np
    from matplotlib.figure import Figure

    from progidiff.overview import TITLE_CHARS, render_overview

    said = []
    real = Figure.suptitle
    monkeypatch.setattr(Figure, "suptitle", lambda self, t, **k: said.append(t) or real(self, t, **k))
    title = ("Liver: 4 proposals · agreement 0.92 · 865 mL (median) · REVIEW CAREFULLY (the usual 0.95) · on the "
             "patient's left: left and right swapped? · top left of the midline: the heart?")
    masks = np.zeros((2, 6, 16, 16), bool)
    masks[:, 2:4, 4:9, 4:9] = True
    render_overview(np.random.default_rng(0).random((6, 16, 16)), masks, (6.0, 6.0, 5.0), tmp_path / "o.png", title)
    lines = said[-1].split("\n")
    assert len(lines) == 2 and all(len(line) <= TITLE_CHARS for line in lines)
    assert " ".join(lines) == title and (tmp_path / "o.png").stat().st_size > 0
