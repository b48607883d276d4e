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
