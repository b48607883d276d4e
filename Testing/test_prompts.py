import pytest

from progidiff.errors import PromptError
from progidiff.prompts import PromptResolver, TextEncoder, Vocabulary


@pytest.fixture(scope="module")
def resolver():
    return PromptResolver(Vocabulary.load(), TextEncoder())


@pytest.mark.parametrize("prompt,organ", [
    ("liver", "liver"), ("Liver", "liver"), ("hepatic", "liver"), ("the liver", "liver"),
    ("kidney left", "kidney_left"), ("Left kidney", "kidney_left"), ("right kidney", "kidney_right"),
    ("IVC", "inferior_vena_cava"), ("pancreatic tail", "pancreas"), ("spleeen", "spleen"),
    ("gallblader", "gallbladder"), ("  PANCREAS ", "pancreas"),
])
def test_synonyms_resolve(resolver, prompt, organ):
    assert resolver.resolve(prompt).organ.name == organ


@pytest.mark.parametrize("prompt", ["brain", "tumor", "liver tumour", "heart", "lung"])
def test_unknown_organs_are_refused_with_suggestions(resolver, prompt):
    with pytest.raises(PromptError) as e:
        resolver.resolve(prompt)
    msg = str(e.value)
    assert "closest" in msg and "\n" not in msg
    # the message names real organs of the vocabulary
    assert any(o.display in msg for o in resolver.vocabulary.organs)


@pytest.mark.parametrize("prompt,organs", [
    ("both kidneys", ["right kidney", "left kidney"]),        # went to the right kidney, without a word
    ("bilateral kidneys", ["right kidney", "left kidney"]),
    ("liver with gallbladder", ["liver", "gallbladder"]),     # went to the gallbladder
    ("liver and spleen", ["liver", "spleen"]),                # went to the spleen
    ("left kidney and spleen", ["left kidney", "spleen"]),
    ("aorta, IVC", ["aorta", "inferior vena cava"]),
    ("liver and kidneys", ["liver", "right kidney", "left kidney"]),
])
def test_a_prompt_naming_several_organs_is_refused_with_one_run_each(resolver, prompt, organs):
    with pytest.raises(PromptError) as e:
        resolver.resolve(prompt)
    msg = str(e.value)
    assert f"names {len(organs)} organs" in msg and "\n" not in msg
    assert "segments one organ per run: --prompt '" in msg and all(f"--prompt '{o}'" in msg for o in organs)


@pytest.mark.parametrize("prompt,organ", [("liver and liver", "liver"), ("pancreas head", "pancreas"),
                                          ("right renal", "kidney_right")])
def test_one_organ_named_once_or_in_part_still_resolves(resolver, prompt, organ):
    assert resolver.resolve(prompt).organ.name == organ


def test_ambiguous_kidney_asks_for_a_side(resolver):
    with pytest.raises(PromptError, match="ambiguous"):
        resolver.resolve("kidney")


@pytest.mark.parametrize("prompt", ["", "   ", "x" * 500])
def test_empty_or_long_prompts(resolver, prompt):
    with pytest.raises(PromptError):
        resolver.resolve(prompt)


def test_non_ascii_prompt_is_refused_not_crashed(resolver):
    with pytest.raises(PromptError):
        resolver.resolve("肝臓の腫瘍")


def test_token_states_shape_and_terminology():
    enc = TextEncoder(max_length=8)
    states = enc.token_states(["Liver", "Left kidney"])
    assert states.shape == (2, 8, enc.hidden_size)
    v = Vocabulary.load()
    term = v["pancreas"].slicer_terminology()
    assert "SCT^15776009^Pancreas" in term
    assert "SCT^7771000^Left" in v["kidney_left"].slicer_terminology()
    assert v.organ_for_label_name("kidney_left").name == "kidney_left"
    assert v.organ_for_label_name("brain") is None
    # other datasets' spellings (BTCV, FLARE, MSD) name the same organs; part of a name does not
    for name, organ in [("left kidney", "kidney_left"), ("Right Kidney", "kidney_right"), ("Gall-bladder", "gallbladder"),
                        ("inferior vena cava", "inferior_vena_cava"), ("IVC", "inferior_vena_cava"), ("Liver", "liver")]:
        assert v.organ_for_label_name(name).name == organ, name
    for name in ("hepatic vessel", "kidney", "liver tumour", "portal vein and splenic vein"):
        assert v.organ_for_label_name(name) is None, name
