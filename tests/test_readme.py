"""The README a ComfyUI user reads in one screen, and the docs/ pages it links to.

- at most 150 lines; the development set-up's two commands and the demo are in it;
- every relative link of README.md and docs/*.md names a file (and heading) that exists;
- the shell blocks marked runnable (an HTML comment ``<!-- runnable -->``, or ``<!-- runnable: creates FILE -->``,
  on the line before the fence) run as written, with bash -e, in a fresh clone of this repository whose ``.venv`` is
  the environment running the tests (as ``scripts/dev-install.sh`` leaves it); FILE must exist afterwards.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
RUNNABLE = re.compile(r"^<!-- runnable(?:: creates (?P<creates>\S+))? -->\n```(?:bash|sh)?\n(?P<code>.*?)\n```", re.M | re.S)
LINK = re.compile(r"\[[^\]]*\]\((?P<target>[^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"\s", "-", re.sub(r"[^\w\- ]", "", text))


def anchors(page: Path) -> set:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)  # no headings inside code
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


def test_readme_fits_on_a_screen_or_two():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 150
    for command in ("bash scripts/dev-install.sh", "bash scripts/test.sh", ".venv/bin/python -m zimage_core demo"):
        assert command in text, command
    for page in ("performance", "reliability", "precision", "formats", "architecture", "development"):
        assert f"(docs/{page}.md)" in text, page  # the pages everything else moved to


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_links_resolve(page):
    broken = []
    for match in LINK.finditer(page.read_text(encoding="utf-8")):
        target = match.group("target")
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {file}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {file.name}")
    assert broken == []


def runnable_blocks() -> list:
    return [(m.group("code"), m.group("creates")) for m in RUNNABLE.finditer(README.read_text(encoding="utf-8"))]


def test_the_demo_is_marked_runnable():
    assert (".venv/bin/python -m zimage_core demo", "zimage_demo.png") in runnable_blocks()


@pytest.mark.parametrize("code, creates", runnable_blocks(), ids=lambda v: str(v)[:40])
def test_runnable_block_runs_in_a_fresh_clone(code, creates, tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", "--depth", "1", f"file://{REPO}", str(clone)], check=True)
    (clone / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)  # what scripts/dev-install.sh made
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(["bash", "-e", "-c", code], cwd=clone, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{code}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    if creates:
        assert (clone / creates).is_file(), (code, creates, proc.stdout[-2000:])
