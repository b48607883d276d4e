"""Every relative link in the README and the docs points at a file that is there, and every in-page
anchor at a heading of that page (GitHub's anchor rule): the README is long, and its contents list and
the evaluation pages link into each other."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The pages written by hand and `evaluate`'s report.md files. Most reports' figures (report.png,
# report-slices.png) were left out of the repository to keep it small; such a report says so in their place.
PAGES = [REPO / "README.md"] + sorted((REPO / "docs").rglob("*.md")) + sorted((REPO / "Resources").rglob("*.md"))


def anchor(title: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def headings(text: str) -> set[str]:
    found, code = set(), False
    for line in text.splitlines():
        if line.startswith("```"):
            code = not code
        elif not code and (m := re.match(r"^#{1,6} (.*)$", line)):
            found.add(anchor(m.group(1)))
    return found


def links(text: str) -> list[str]:
    text = re.sub(r"```.*?```", "", text, flags=re.S)   # commands, not links
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", t)]


def test_anchor_follows_github():
    assert anchor("Quick start (fresh clone, Linux/macOS, Python ≥ 3.9)") == "quick-start-fresh-clone-linuxmacos-python--39"
    assert anchor("Wide bodies: the model's window widens") == "wide-bodies-the-models-window-widens"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    text = page.read_text(encoding="utf-8")
    broken = []
    for target in links(text):
        path, _, frag = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(target)
        elif frag and dest.suffix == ".md" and frag not in headings(dest.read_text(encoding="utf-8")):
            broken.append(target)
    assert not broken, broken
