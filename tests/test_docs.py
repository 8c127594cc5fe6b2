"""The documentation site builds: `mkdocs build --strict` on the repository's mkdocs.yml, whose `validation:`
turns a page missing from the nav, a link to a missing page and a link to a missing anchor into warnings that
strict mode makes fatal; no page of docs/ links outside the repository, and the built site loads nothing from
outside (no web fonts, no footer link)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MKDOCS = Path(sys.executable).parent / "mkdocs"   # installed with the dev extras, next to the test's Python


def test_mkdocs_build_strict_passes(tmp_path):
    assert MKDOCS.exists(), f"{MKDOCS} is missing: install the dev extras (pip install -e '.[dev]')"
    site = tmp_path / "site"
    done = subprocess.run([str(MKDOCS), "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(site)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, f"mkdocs build --strict failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr}"
    pages = sorted(p.relative_to(ROOT / "docs").with_suffix("").as_posix() for p in (ROOT / "docs").rglob("*.md"))
    for page in pages:   # every page rendered (index.md is the site's root)
        out = site / "index.html" if page == "index" else site / page / "index.html"
        assert out.is_file(), f"docs/{page}.md was not rendered to {out}"
    outside = re.compile(r"""(?:src|href)=["'](?:https?:)?//""", re.IGNORECASE)   # the site fetches nothing from elsewhere
    fetched = [f"{p.relative_to(site)}: {m.group(0)}" for p in sorted(site.rglob("*.html"))
               for m in outside.finditer(p.read_text())]
    assert not fetched, "the built site refers to outside addresses:\n" + "\n".join(fetched[:20])


def test_no_page_links_outside_the_repository():
    link = re.compile(r"\]\(\s*<?(https?:|//|[a-z]+://)|<https?://|href=[\"']https?:", re.IGNORECASE)
    found = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}"
             for p in sorted((ROOT / "docs").rglob("*.md"))
             for n, line in enumerate(p.read_text().splitlines(), 1) if link.search(line)]
    assert not found, "links to outside the repository (name files as code spans instead):\n" + "\n".join(found)
