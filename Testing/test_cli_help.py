"""Every public command's --help ends with an example of itself (the brief's rule for public commands)."""
from __future__ import annotations

import argparse

from progidiff.cli import build_parser


def test_every_command_has_help_with_an_example_of_itself():
    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert {"segment", "train", "evaluate", "refine", "adapt", "bench", "average"} <= set(subs.choices)
    for name, sub in subs.choices.items():
        text = sub.format_help()
        example = text.split("example:", 1)
        assert len(example) == 2, f"{name} --help has no example"
        assert f"progidiff {name} " in example[1] or f"progidiff.cli {name} " in example[1], name


def test_building_the_command_line_imports_no_torch():
    """``progidiff --help`` (and every typo's usage line) must not wait for torch and diffusers:
    with the training defaults read from train.py it took 5.0 s on a 2-core machine, 0.07 s without."""
    import subprocess
    import sys

    code = ("import sys; from progidiff.cli import build_parser; build_parser(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'numpy', 'diffusers', 'transformers', 'monai', 'SimpleITK', 'peft', 'accelerate')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_prompt_has_a_short_flag_as_the_proposals_and_output_do():
    """``segment scan.nii.gz -p liver -n 4 -o out/``: -n and -o had short forms and -p did not, and was refused."""
    parser = build_parser()
    a = parser.parse_args(["segment", "scan.nii.gz", "-p", "left kidney", "-n", "4", "-o", "out"])
    assert (a.prompt, a.proposals, a.output) == ("left kidney", 4, "out")
    a = parser.parse_args(["refine", "scan.nii.gz", "-p", "liver", "--mask", "m.nii.gz", "--keep", "k.nii.gz", "-o", "out"])
    assert a.prompt == "liver"
