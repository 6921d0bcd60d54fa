"""README.md and docs/*.md: every relative link and image points at a file that exists, every #anchor at a heading
of its target (GitHub's heading ids), and no page points users at material they do not have."""
import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def heading_id(text: str) -> str:
    """GitHub's id for a heading: lower case, letters/digits/'-'/'_' kept, spaces to '-', the rest dropped."""
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    return "".join("-" if ch == " " else ch for ch in text
                   if ch in " -_" or unicodedata.category(ch)[0] in "LN" or unicodedata.category(ch) == "Mn")


def without_code(text: str) -> str:
    return re.sub(r"```.*?```", "", text, flags=re.S)


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    for line in without_code(page.read_text()).splitlines():
        if m := re.match(r"#{1,6} (.*)", line):
            base = heading_id(m.group(1))
            seen[base] = seen.get(base, 0) + 1
    ids = set()
    for base, count in seen.items():
        ids |= {base, *(f"{base}-{i}" for i in range(1, count))}
    return ids


def test_heading_ids_follow_githubs_rules():
    assert heading_id("The paper's tables and figures") == "the-papers-tables-and-figures"
    assert heading_id("Probing (§3, App. D.1)") == "probing-3-app-d1"
    assert heading_id("Which α") == "which-α"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_and_images_resolve(page):
    broken = []
    for target in LINK.findall(without_code(page.read_text())):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, fragment = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            broken.append(f"{target}: no heading #{fragment}")
    assert not broken, broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_pages_cite_nothing_users_do_not_have(page):
    text = page.read_text()
    assert not re.search(r"\bSPEC\b|\.\./shared|shared/research|performance\.md", text)


def test_every_docs_page_is_in_the_index():
    index = (ROOT / "docs" / "README.md").read_text()
    pages = {p.name for p in (ROOT / "docs").glob("*.md")} - {"README.md"}
    assert pages and all(f"]({name})" in index for name in pages), pages
