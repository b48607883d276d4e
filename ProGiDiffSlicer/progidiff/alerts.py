"""segment's warnings, each in the three forms it is shown: a short code (``evaluate``'s table), a phrase
(the overview's title) and a sentence (the command line, report.json and the Slicer notice). They are made
here and only here, so the command line, the picture and Slicer say the same thing, and a new warning
is added once."""
from __future__ import annotations

from dataclasses import dataclass

from .proposals import BELOW_USUAL, REVIEW_AGREEMENT


@dataclass(frozen=True)
class Alert:
    #: in short, one per thing found: "nothing found", "review", "unseen superior end", "cut left", "dark liver",
    #: "modality?", "narrow body", "wrong side?", "sides swapped?", "heart?", "weak organ"
    codes: tuple[str, ...]
    phrase: str   # for the overview's title: "NOTHING FOUND", "REVIEW CAREFULLY", "top left of the midline: the heart?"
    text: str     # the whole sentence, with what to check


def _flagged_by_usual(agreement: float, usual: float | None) -> bool:
    """Whether a review flag is the usual agreement's (proposals.needs_review's second test), not the floor's."""
    return agreement >= REVIEW_AGREEMENT and usual is not None


def review_warning(agreement: float, usual: float | None = None) -> str:
    """What segment says when the proposals agree too little (proposals.needs_review): below
    REVIEW_AGREEMENT, or well below their agreement for this organ on the model's training dataset (its card)."""
    if _flagged_by_usual(agreement, usual):
        return (f"The proposals agree less than on the model's training data (agreement {agreement:.2f}, against "
                f"{usual:.2f} there, as the model card records; more than {BELOW_USUAL:.2f} less): the model is less "
                "sure of this scan than of scans like its training data. Review carefully before accepting.")
    if agreement < REVIEW_AGREEMENT:
        return (f"The proposals disagree strongly (agreement {agreement:.2f}, under {REVIEW_AGREEMENT:.2f}): "
                "review carefully before accepting.")
    # flagged by a caller's own rule, with no usual agreement known: say only what is known
    return f"The proposals disagree (agreement {agreement:.2f}): review carefully before accepting."


def nothing_found_warning(organ: str, proposals: int) -> str:
    """What segment says when every proposal is empty. The proposals then 'agree' perfectly (the Dice of two
    empty masks is 1), so without this an empty result was shown with no warning at all."""
    return (f"None of the {proposals} proposals holds any {organ}: the model found none in this scan. That is not a "
            f"finding that the {organ} is absent: check that the scan shows it (its field of view), that the prompt "
            "names the organ meant, and that the modality is the model's; then draw it in the Segment Editor.")


#: An organ whose ranked-first Dice on the held-out part of the model's (or adapter's) training data is below
#: this is called a rough draft every time it is segmented, whatever the proposals' agreement: such an organ's
#: proposals fail while agreeing (the shipped CT model's gallbladder: Dice 0.53 at agreement 0.85). Called so:
#: with the shipped CT model the gallbladder (0.53) and pancreas (0.26); with its MR adapter the spleen (0.00),
#: gallbladder (0.15), stomach (0.52), pancreas (0.00), aorta (0.36), IVC (0.00) and right kidney (0.68).
#: A judgment, not a fit: 0.70 lies between the CT organs the model segments well (0.72-0.88) and those it
#: does not; nothing was tuned on the evaluation reports.
WEAK_ORGAN_DICE = 0.70
#: the code of that standing caveat: evaluate leaves it out of its warnings table, which asks whether the
#: warnings that depend on the scan fall on the poor segmentations (this one falls on an organ, every time).
WEAK_ORGAN = "weak organ"


def weak_organ_warning(organ: str, dice: float) -> str:
    """What segment says, every time, for an organ the model segments poorly even on its own held-out data
    (WEAK_ORGAN_DICE), as its card records."""
    return (f"This model segments the {organ} poorly: Dice {dice:.2f} on the held-out part of its own training data "
            "(its card). Its proposals can agree and still be wrong the same way: take them as a rough draft and "
            "correct them in the Segment Editor.")


def is_weak_organ(held_out_dice: float | None) -> bool:
    return held_out_dice is not None and held_out_dice < WEAK_ORGAN_DICE


def unseen_end_warning(organ: str, ends: list[str]) -> str:
    """What segment says when a scan shows an end of the organ that no training slice showed."""
    where = " and ".join({"superior": "top", "inferior": "bottom"}.get(e, e) for e in ends)
    return (f"The model never saw the {' and '.join(ends)} end{'s' * (len(ends) > 1)} of the {organ} in training "
            f"(its training scans cut it "
            f"off there), and this scan shows {'them' if len(ends) > 1 else 'it'}: check the proposals' {where} slices.")


def window_cut_warning(organ: str, sides: list[str], window_mm: float) -> str:
    """What segment says when the ranked-first proposal reaches the edge of the model's window
    (``engine.window_sides_cut``) and the scan goes on beyond it."""
    return (f"The {organ} reaches the edge of the model's {window_mm:.0f} mm window on the patient's "
            f"{' and '.join(sides)} side{'s' * (len(sides) > 1)}, and the scan goes on beyond it: the model sees "
            f"nothing there, so the proposals stop at that edge. Check the {organ}'s {' and '.join(sides)} border.")


#: A CT liver whose ranked-first proposal reads below this (median HU) is flagged. An unenhanced healthy
#: liver reads 50-65 HU and under 40 is the usual CT sign of moderate to severe steatosis; contrast only
#: raises it. Measured (ranked-first proposal's median, seed 0): the sample CT 45, its fatty liver 7, the
#: painted person 44 and fatty 10, the PET/CT 94 and fatty 56, the portal-venous scan 100.
DARK_LIVER_HU = 40.0


def dark_liver_warning(median_hu: float) -> str:
    """What segment says when the liver proposal reads darker than a healthy liver (DARK_LIVER_HU):
    the model misses such livers more often (docs/evaluation/fatty-liver)."""
    return (f"The liver proposal reads {median_hu:.0f} HU (median), darker than a healthy liver (50-65 HU without "
            f"contrast; under {DARK_LIVER_HU:.0f} suggests a fatty liver). The default CT model, trained on one liver of "
            "46 HU, finds livers this dark less well (Dice 0.76-0.80 where it scored 0.84-0.88 on the same bodies): check "
            "its borders with the gallbladder, the stomach and the tissue around it.")


#: A liver proposal whose top LIVER_TOP_MM lies more than this share left of the body's midline is
#: flagged: the liver's top is its right lobe's dome, under the right hemidiaphragm, and the heart sits
#: on the dome left of the midline. The model never saw a heart (its training scan stops below the
#: dome), and unenhanced the heart is about as dense as a liver. Measured (report.json's top_left_share,
#: docs/evaluation/ct-chest-cta): on a chest CT with its heart and great vessels made unenhanced, seeds
#: 0/100/200, 0.78-0.86 where the proposal took 328-392 ml of the heart; 0.03-0.05 on that scan as
#: acquired, the other person's PET/CT and the painted person; 0.15-0.20 where the scan's top cuts the
#: liver through its widest part and its left lobe (the training person, six presentations of it).
LIVER_TOP_LEFT_SHARE = 0.5
LIVER_TOP_MM = 20.0


def heart_warning(share: float) -> str:
    """What segment says when the liver proposal's top lies mostly left of the midline (LIVER_TOP_LEFT_SHARE)."""
    return (f"{100 * share:.0f} % of the liver proposal's top {LIVER_TOP_MM:.0f} mm lies left of the body's midline, "
            "where the heart sits on the liver dome (a liver's top lies under the right hemidiaphragm). The model never "
            "saw a heart, and without contrast the heart is about as dense as a liver: the proposal may hold part of "
            "it. Check the top slices and erase what lies above the diaphragm.")


#: The side of the body's midline each of these organs lies on (but in situs inversus, 1 in 10,000). A proposal
#: whose centre lies more than WRONG_SIDE_MM on the other side says the scan's left and right are swapped: a
#: header written wrong in a conversion, far commoner than the anatomy. The kidneys are not here: the model
#: places a "left kidney" on the scan's left whatever its header says, so for them the liver's side is read
#: (SIDED_BY_PROMPT, Engine._liver_side).
#: Measured (engine.midline_offset_mm, + = the patient's left, ranked-first of 4): the sample CT liver -68,
#: gallbladder -70, spleen +111 mm; the other person's PET/CT -71, -3, +97; the sample CT mirrored in its
#: header +45, +111, -88.
EXPECTED_SIDE = {"liver": "right", "gallbladder": "right", "spleen": "left"}
WRONG_SIDE_MM = 20.0
#: The organs whose side the prompt names; for them the engine checks the liver's side (Engine._liver_side).
SIDED_BY_PROMPT = {"kidney_left": "left", "kidney_right": "right"}


def is_wrong_side(organ: str, offset_mm: float | None) -> bool:
    """A liver, gallbladder or spleen proposal centred more than WRONG_SIDE_MM on the wrong side of the midline."""
    side = EXPECTED_SIDE.get(organ)
    if side is None or offset_mm is None:
        return False
    return offset_mm > WRONG_SIDE_MM if side == "right" else offset_mm < -WRONG_SIDE_MM


def wrong_side_warning(organ: str, offset_mm: float) -> str:
    """What segment says when ``is_wrong_side``: a header that swaps left and right, or a wrong proposal."""
    side = "left" if offset_mm > 0 else "right"
    return (f"The {organ} proposal lies on the patient's {side}, {abs(offset_mm):.0f} mm from the body's midline, where "
            f"a {organ} lies only in situs inversus: either the scan's left and right are swapped in its header (a "
            f"conversion error) or the proposal is not the {organ}. Check the orientation against a landmark (the "
            "scanner's L/R marker, the heart's apex); while it is in doubt, do not trust 'left' or 'right' prompts on "
            "this scan.")


def swapped_kidney_warning(organ: str, liver_offset_mm: float) -> str:
    """What segment says for a left or right kidney where the liver lies on the patient's left."""
    other = "right" if SIDED_BY_PROMPT[organ] == "left" else "left"
    name = organ.replace("kidney_", "") + " kidney"
    return (f"In this scan the liver lies on the patient's left ({liver_offset_mm:.0f} mm from the body's midline): its "
            f"left and right are most likely swapped in the header (a conversion error; situs inversus is rare), and "
            f"then this {name} proposal is the patient's {other} kidney. Check the orientation against a landmark (the "
            "scanner's L/R marker, the heart's apex) before naming the side.")


#: How the engine's modality reason starts where the modality given contradicts the scan (Engine._prepare).
GIVEN_THOUGH = "given, though the scan looks like"


def modality_doubt_warning(modality: str, reason: str) -> str:
    """What segment says where --modality was given and the scan looks like the other one."""
    looks = reason[len(GIVEN_THOUGH):].strip()
    return (f"The modality was given as {modality}, but the scan looks like {looks}. The model reads it as "
            f"{modality} (its window and, on MR, its adapter), so on the other modality it finds nothing right: check "
            "the modality given (--modality, or the module's setting), or leave it to auto.")


#: A trunk that reaches less far than this (mm, world x) from the body's centre is called narrow. Measured
#: (volume.body_reach_mm): the training scan 187; it made 0.85x as wide 159, where the model meets every liver,
#: spleen and kidney target; made 0.7x as wide 131, where it missed the spleen (0.589) and the stomach (0.077)
#: and the baseline UNet beat it (mean 0.624 against 0.543); the other person's PET/CT 174, the MR person 173.
#: Set between 131 and 159. Such a body is now seen zoomed (volume.body_zoom), which found the stomach again
#: but not the spleen (docs/evaluation/body-zoom): it is still said. An adult's organs zoomed as a slim adult's
#: would be (the training scan's fat taken away, zoom forced to 1.10-1.21x) kept every liver, spleen and kidney
#: target, but the stomach fell at 1.21x (0.39 / 0.55 against 0.64-0.72). A child's scan is untested.
#: Not said where the field of view cuts the trunk's sides (volume.body_fov_cut): that body is wider.
NARROW_BODY_REACH_MM = 145.0
#: The training scan's trunk reach, for the sentence.
TRAINING_BODY_REACH_MM = 187.0


def narrow_body_warning(reach_mm: float) -> str:
    """What segment says for a body narrower than NARROW_BODY_REACH_MM."""
    from .volume import ZOOM_REACH_MM

    return (f"This body is narrow: its trunk reaches {reach_mm:.0f} mm from its centre (about {2 * reach_mm:.0f} mm "
            f"wide; the model's training body: {TRAINING_BODY_REACH_MM:.0f} mm, about {2 * TRAINING_BODY_REACH_MM:.0f} mm "
            f"wide). The model saw it zoomed, as large as a body reaching {ZOOM_REACH_MM:.0f} mm. On its training scan "
            "made 0.7x as wide, organs and all, it then found the liver, kidneys and stomach but missed the spleen "
            "(Dice 0.54-0.58 against 0.80 at full size). A slim adult's organs are seen larger than the training "
            "body's: up to 1.21x larger, they kept the liver, spleen and kidneys but lost part of the stomach. A "
            "child's scan, whose organs are not a small adult's, is untested. Review every proposal, the spleen and "
            "stomach first.")


def is_dark_liver(organ: str, median_hu: float | None) -> bool:
    """A CT liver proposal darker than a healthy liver (DARK_LIVER_HU): a fatty liver, which the model finds
    less well. None (MR, or an empty proposal) is never dark."""
    return organ == "liver" and median_hu is not None and median_hu < DARK_LIVER_HU


def is_heart_suspect(organ: str, top_left_share: float | None) -> bool:
    """A liver proposal whose top lies mostly left of the body's midline (LIVER_TOP_LEFT_SHARE), where the
    heart sits on the liver dome: it may hold the heart, which the model never saw."""
    return organ == "liver" and top_left_share is not None and top_left_share > LIVER_TOP_LEFT_SHARE


def find_alerts(organ: str, display: str, *, review: bool, agreement: float, unseen_ends: list[str],
                window_cut: list[str], window_mm: float, median_hu: float | None,
                top_left_share: float | None, usual_agreement: float | None = None,
                empty_of: int = 0, held_out_dice: float | None = None,
                midline_offset_mm: float | None = None, liver_offset_mm: float | None = None,
                body_reach_mm: float | None = None, modality: str | None = None,
                modality_reason: str = "") -> list[Alert]:
    """Every warning segment gives for one result, in the order it gives them; empty where it says nothing.
    ``organ`` is the vocabulary's name ("liver"), ``display`` the name shown ("Liver"); ``empty_of``: the
    number of proposals when every one of them is empty, else 0; ``held_out_dice``: the organ's Dice on the
    held-out part of the model's training data, from its card (None: not recorded); ``midline_offset_mm``:
    where the ranked-first proposal's centre lies from the body's midline (+ = the patient's left);
    ``liver_offset_mm``: for a left or right kidney, where the liver lies; ``body_reach_mm``: how far the
    trunk reaches from the body's centre (world x); ``modality``, ``modality_reason``: the modality used and why
    (the engine's "given, though the scan looks like MR: ..." where the user's contradicts the scan)."""
    name = display.lower()
    out = []
    if empty_of:
        out.append(Alert(("nothing found",), "NOTHING FOUND", nothing_found_warning(name, empty_of)))
    if review:
        phrase = (f"REVIEW CAREFULLY (the usual {usual_agreement:.2f})" if _flagged_by_usual(agreement, usual_agreement)
                  else "REVIEW CAREFULLY")
        out.append(Alert(("review",), phrase, review_warning(agreement, usual_agreement)))
    if modality_reason.startswith(GIVEN_THOUGH):
        out.append(Alert(("modality?",), f"given as {modality}: is it?", modality_doubt_warning(modality, modality_reason)))
    if body_reach_mm is not None and body_reach_mm < NARROW_BODY_REACH_MM:   # also where nothing was found: it may be why
        out.append(Alert(("narrow body",), f"a narrow body ({2 * body_reach_mm:.0f} mm): review",
                         narrow_body_warning(body_reach_mm)))
    if unseen_ends:
        out.append(Alert(tuple(f"unseen {e} end" for e in unseen_ends),
                         f"{' and '.join(unseen_ends)} end{'s' * (len(unseen_ends) > 1)} unseen in training",
                         unseen_end_warning(name, unseen_ends)))
    if window_cut:
        out.append(Alert(tuple(f"cut {s}" for s in window_cut), f"cut at the window's {' and '.join(window_cut)} "
                         f"edge{'s' * (len(window_cut) > 1)}", window_cut_warning(name, window_cut, window_mm)))
    if is_dark_liver(organ, median_hu):
        out.append(Alert(("dark liver",), f"reads {median_hu:.0f} HU: a fatty liver?", dark_liver_warning(median_hu)))
    if is_wrong_side(organ, midline_offset_mm):
        side = "left" if midline_offset_mm > 0 else "right"
        out.append(Alert(("wrong side?",), f"on the patient's {side}: left and right swapped?",
                         wrong_side_warning(name, midline_offset_mm)))
    if organ in SIDED_BY_PROMPT and is_wrong_side("liver", liver_offset_mm):
        out.append(Alert(("sides swapped?",), "the liver on the patient's left: sides swapped?",
                         swapped_kidney_warning(organ, liver_offset_mm)))
    if is_heart_suspect(organ, top_left_share):
        out.append(Alert(("heart?",), "top left of the midline: the heart?", heart_warning(top_left_share)))
    if is_weak_organ(held_out_dice) and not empty_of:
        out.append(Alert((WEAK_ORGAN,), f"a rough draft (held-out Dice {held_out_dice:.2f})",
                         weak_organ_warning(name, held_out_dice)))
    return out
