"""README is the front door: small, and every page of docs/ is one link away from it; no link is dead."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
README_MAX_BYTES = 10 * 1024


def _links(page: Path) -> set[Path]:
    """The local files a Markdown page links to, resolved from the page's folder."""
    targets = LINK.findall(page.read_text())
    return {(page.parent / target).resolve() for target in targets if "://" not in target}


def test_the_readme_is_a_front_door() -> None:
    text = README.read_text()
    assert len(text.encode()) <= README_MAX_BYTES, len(text.encode())
    assert "make demo" in text and "make test" in text
    assert "from fluxfarm import FarmClient" in text and "fluxfarm submit" in text


def test_every_docs_page_is_linked_from_the_readme() -> None:
    pages = {page.resolve() for page in (ROOT / "docs").rglob("*.md")}
    assert len(pages) >= 8
    assert sorted(str(p.relative_to(ROOT)) for p in pages - _links(README)) == []


def test_no_link_in_the_readme_or_docs_is_dead() -> None:
    dead = []
    for page in [README, *(ROOT / "docs").rglob("*.md")]:
        dead += [f"{page.relative_to(ROOT)} -> {target}" for target in _links(page) if not target.exists()]
    assert dead == []
