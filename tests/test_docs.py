"""The README and the pages under docs/: every link leads somewhere, the README stays a five-minute read, and the
pages describe the project as it is (its history lives in benchmarks/results/history.md)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.cli import ROOT

README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "src" / "charlstm" / "pretrained" / "README.md"]
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# words that tell a reader about this repository's past instead of its present
_HISTORY = re.compile(
    r"previous default|the default now|earlier default|\bused to\b|at commit [0-9a-f]{7}|\bcommit [0-9a-f]{7,40}\b"
    r"|\bwas removed\b",
    re.IGNORECASE,
)


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lowercased, punctuation dropped, spaces to hyphens."""
    found = set()
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            found.add(re.sub(r"\s", "-", re.sub(r"[^\w\- ]", "", title)))
    return found


def links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.DOTALL)
    return [m.group(1) for m in _LINK.finditer(text)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_leads_to_a_file_and_heading_that_exist(page: Path):
    broken = []
    for link in links(page):
        if re.match(r"[a-z]+://", link):
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        missing_anchor = bool(anchor) and target.suffix == ".md" and target.exists() and anchor not in anchors(target)
        if not target.exists() or missing_anchor:
            broken.append(link)
    assert not broken, f"{page.relative_to(ROOT)} links to what does not exist: {broken}"


def test_the_readme_is_a_five_minute_read_and_links_every_docs_page():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 220
    linked = {Path(link.partition("#")[0]).name for link in links(README)}
    missing = [p.name for p in (ROOT / "docs").glob("*.md") if p.name not in linked]
    assert not missing, f"README.md links no page for {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_pages_describe_the_project_as_it_is(page: Path):
    found = [m.group(0) for m in _HISTORY.finditer(page.read_text(encoding="utf-8"))]
    assert not found, f"{page.relative_to(ROOT)} speaks of the project's past: {found} (history.md is the place)"
