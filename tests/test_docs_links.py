"""Every relative link in the README and the docs points at a file that exists (issue 26: the
README was split into docs/, and a moved page must not leave a link behind)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [
    ROOT / "README.md",
    ROOT / "BENCHMARKS.md",
    ROOT / "CHANGELOG.md",
    ROOT / "models" / "default" / "MODEL_CARD.md",
    *sorted((ROOT / "docs").glob("*.md")),
]
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*```.*?^\s*```", re.S | re.M)
CODE = re.compile(r"`[^`\n]*`")


def relative_links(text: str) -> list[str]:
    """The relative targets of a page's Markdown links and images, fragment stripped; links
    inside code are not links, and web addresses and in-page anchors are not files."""
    text = CODE.sub("", FENCE.sub("", text))
    found = []
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue  # http(s):, mailto: ..., or an anchor in the same page
        found.append(target.split("#", 1)[0])
    return found


def test_the_pages_exist():
    assert all(p.is_file() for p in PAGES), [str(p) for p in PAGES if not p.is_file()]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_point_at_files(page):
    broken = [t for t in relative_links(page.read_text()) if not (page.parent / t).exists()]
    assert not broken, f"{page.relative_to(ROOT)} links to missing files: {broken}"


def test_the_link_reader_finds_links_and_skips_the_rest():
    text = (
        "[a](docs/a.md#part) ![pic](b.png) [web](https://x.org/c.md) [here](#top)\n"
        '`[code](no.md)`\n```\n[fenced](no2.md)\n```\n[titled](c.md "title")\n'
    )
    assert relative_links(text) == ["docs/a.md", "b.png", "c.md"]
