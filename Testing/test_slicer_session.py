"""Proposal cycling and accept/discard bookkeeping against a fake scene."""
import numpy as np
import pytest

from ProGiDiffSlicerLib.proposals_session import ProposalSession


class FakeScene:
    """Implements proposals_session.SceneIO in memory."""

    def __init__(self):
        self.nodes = {}
        self.visible = None
        self.segments = {}  # target -> {name: mask}
        self.editor = None

    def create_proposals(self, name, masks, reference, segment_names, color, terminology):
        self.nodes[name] = {"masks": masks.copy(), "names": list(segment_names), "terminology": terminology}
        return name

    def show_only(self, proposals, index):
        self.visible = (proposals, index)

    def remove(self, proposals):
        del self.nodes[proposals]

    def segment_names(self, target):
        return list(self.segments.get(target, {}))

    def write_segment(self, target, name, mask, reference, color, terminology):
        self.segments.setdefault(target, {})[name] = mask.copy()
        return f"seg-{name}"

    def open_in_segment_editor(self, target, reference, segment_id):
        self.editor = (target, segment_id)

    def read_segment(self, target, segment_id, reference):
        return self.segments[target][segment_id.removeprefix("seg-")]


@pytest.fixture(scope="module")
def result(tiny_engine, ct_crop):
    from progidiff.engine import SegmentOptions
    from progidiff.volume import read_scan

    from dataclasses import replace

    result = tiny_engine.segment(read_scan(ct_crop), "liver", SegmentOptions(proposals=3, steps=2))
    # The tiny model's "liver" lies wherever a few training steps put it, often in tissue darker than a
    # liver or left of the midline; the tests that want the dark-liver or heart notice set median_hu or
    # top_left_share themselves.
    return replace(result, median_hu=None, top_left_share=None)


def test_cycle_label_accept_and_discard(result):
    scene = FakeScene()
    s = ProposalSession(scene, result, reference="volume")
    node = s.node
    assert len(scene.nodes[node]["names"]) == 3 and scene.nodes[node]["names"][0] == "Liver — proposal 1"
    assert "SCT^10200004^Liver" in scene.nodes[node]["terminology"]
    assert scene.visible == (node, 0)
    assert s.label().startswith("1 of 3 · agreement ") and s.label().endswith(" mm") and " mL · " in s.label()
    assert "usual" not in s.label()   # the fixture's card records no usual agreement
    assert s.ranges().startswith("volume ") and "(min / median / max of 3)" in s.ranges()
    s.next()
    s.next()
    assert scene.visible == (node, 2) and s.label().startswith("3 of 3")
    s.next()
    assert s.index == 0
    s.previous()
    assert s.index == 2
    seg = s.accept("target")
    assert seg == "seg-Liver" and scene.editor == ("target", "seg-Liver")
    np.testing.assert_array_equal(scene.segments["target"]["Liver"], result.masks[2])
    # an existing segment is never overwritten without asking
    before = scene.segments["target"]["Liver"].copy()
    assert s.accept("target", which="consensus", confirm_overwrite=lambda name: False) is None
    np.testing.assert_array_equal(scene.segments["target"]["Liver"], before)
    asked = []
    assert s.accept("target", which="consensus", confirm_overwrite=lambda name: asked.append(name) or True)
    assert asked == ["Liver"]
    np.testing.assert_array_equal(scene.segments["target"]["Liver"], result.consensus)
    s.discard()
    assert scene.nodes == {}


def test_edits_after_accept_feed_a_refine_run(result, tiny_model, ct_crop):
    import SimpleITK as sitk

    from ProGiDiffSlicerLib.geometry import ijk_to_ras_of
    from ProGiDiffSlicerLib.worker import SegmentationWorker, SegmentRequest

    scene = FakeScene()
    s = ProposalSession(scene, result, reference="volume")
    assert s.edits() is None
    s.accept("target")
    assert s.edits() is None  # accepted, not yet edited
    scene.segments["target"]["Liver"][20:24, 40:60, 40:60] = True  # the expert paints
    edited, changed = s.edits()
    assert changed.sum() > 0 and edited[changed].all()
    img = sitk.ReadImage(str(ct_crop))
    w = SegmentationWorker()
    try:
        job = w.submit(SegmentRequest(array=sitk.GetArrayFromImage(img), ijk_to_ras=ijk_to_ras_of(img), prompt="liver",
                                      model_dir=str(tiny_model), force_cpu=True, proposals=2, steps=2,
                                      edited=edited, keep=changed))
        assert job.wait(120) and job.stage == "done", job.error
        for m in job.result.masks:
            np.testing.assert_array_equal(m[changed], edited[changed])
    finally:
        w.shutdown()


def test_notice_says_when_the_consensus_is_the_ranked_first_proposal(result):
    from dataclasses import replace

    from progidiff.proposals import REVIEW_AGREEMENT, ProposalSet

    def notice(agreement, rule):
        ranking = ProposalSet(result.ranking.order, result.ranking.scores, agreement, agreement < REVIEW_AGREEMENT)
        return ProposalSession(FakeScene(), replace(result, ranking=ranking, consensus_rule=rule), "volume").notice()

    assert notice(0.95, "vote-corrected") == ""
    assert (notice(0.7, "vote-corrected").startswith("⚠ The proposals disagree strongly")
            and "vote" not in notice(0.7, "vote-corrected"))
    assert notice(0.4, "ranked-first").endswith("the consensus is the ranked-first proposal.")


def test_notice_says_when_the_scan_shows_an_organ_end_the_model_never_saw(result):
    from dataclasses import replace

    s = ProposalSession(FakeScene(), replace(result, unseen_ends=["superior"]), "volume")
    last = s.notice().splitlines()[-1]
    assert last.startswith("⚠ The model never saw the superior end of the liver in training")
    assert last.endswith("check the proposals' top slices.")
    assert "never saw" not in ProposalSession(FakeScene(), replace(result, unseen_ends=[]), "volume").notice()


def test_notice_says_when_the_organ_meets_the_model_window_s_edge(result):
    from dataclasses import replace

    s = ProposalSession(FakeScene(), replace(result, window_cut=["right"]), "volume")
    last = s.notice().splitlines()[-1]
    window = result.grid.GetSize()[0] * result.grid.GetSpacing()[0]
    assert last.startswith(f"⚠ The liver reaches the edge of the model's {window:.0f} mm window on the patient's right side")
    assert "window" not in ProposalSession(FakeScene(), replace(result, window_cut=[]), "volume").notice()


def test_notice_says_when_the_liver_reads_darker_than_a_healthy_one(result):
    from dataclasses import replace

    from progidiff.alerts import DARK_LIVER_HU

    s = ProposalSession(FakeScene(), replace(result, median_hu=8.0), "volume")
    last = s.notice().splitlines()[-1]
    assert last.startswith("⚠ The liver proposal reads 8 HU (median), darker than a healthy liver")
    for hu in (DARK_LIVER_HU, 46.0, None):   # at the threshold, a healthy liver, and MR (no HU)
        assert "HU" not in ProposalSession(FakeScene(), replace(result, median_hu=hu), "volume").notice()
    spleen = replace(result, median_hu=8.0, organ=replace(result.organ, name="spleen"))
    assert not spleen.dark_liver   # the sign is the liver's


def test_notice_says_when_the_liver_s_top_lies_left_of_the_midline(result):
    from dataclasses import replace

    from progidiff.alerts import LIVER_TOP_LEFT_SHARE

    s = ProposalSession(FakeScene(), replace(result, top_left_share=0.82), "volume")
    last = s.notice().splitlines()[-1]
    assert last.startswith("⚠ 82 % of the liver proposal's top 20 mm lies left of the body's midline")
    for share in (LIVER_TOP_LEFT_SHARE, 0.06, None):   # at the threshold, a liver dome, and no proposal
        assert "midline" not in ProposalSession(FakeScene(), replace(result, top_left_share=share), "volume").notice()
    assert not replace(result, top_left_share=0.82, organ=replace(result.organ, name="spleen")).heart_suspect


def test_warnings_in_short_list_what_segment_says(result):
    from dataclasses import replace

    calm = replace(result, ranking=replace(result.ranking, review=False), unseen_ends=[], window_cut=[])
    assert calm.warnings == []
    loud = replace(calm, ranking=replace(result.ranking, review=True), unseen_ends=["superior"], window_cut=["left"],
                   median_hu=8.0, top_left_share=0.8)
    assert loud.warnings == ["review", "unseen superior end", "cut left", "dark liver", "heart?"]
    assert replace(loud, organ=replace(result.organ, name="spleen")).warnings == ["review", "unseen superior end", "cut left"]


def test_the_label_reads_the_agreement_against_the_usual(result):
    from dataclasses import replace

    s = ProposalSession(FakeScene(), replace(result, usual_agreement=0.9485), "volume")
    assert f"· agreement {result.ranking.agreement:.2f} (usual 0.95) · " in s.label()
