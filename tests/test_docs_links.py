"""Every relative link in the project's Markdown (README, docs/, bench/, spec/, ...) points at something that exists.

Links are ``[text](target)``, ``![alt](target)``, ``[id]: target`` and HTML ``src=`` / ``href=``
outside code; a target with a scheme (``https:``, ``mailto:``) is not checked. A ``#fragment``
into a Markdown file must name one of its headings (GitHub's anchors).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
SKIP_DIRS = {"node_modules", "build", "dist", "__pycache__", "artifacts", "api"}

FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)(?!`).+?(?<!`)\1(?!`)", re.S)
INLINE = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*(<[^>]*>|[^\s()]*(?:\([^\s()]*\)[^\s()]*)*)(?:\s+[\"'(][^)]*)?\s*\)")
REFDEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)", re.M)
HTML = re.compile(r"""<(?:a|img|source)\b[^>]*?\b(?:href|src)\s*=\s*["']([^"']+)["']""", re.I)
HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", re.M)


def markdown_files() -> list[Path]:
    """The project's Markdown files (hidden folders, build outputs and node_modules left out)."""
    found = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIP_DIRS and not d.endswith(".egg-info"))
        found += [Path(folder) / f for f in sorted(files) if f.endswith(".md")]
    return found


def strip_code(text: str) -> str:
    """``text`` without fenced code blocks and code spans (their brackets are not links)."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def links(text: str) -> list[str]:
    """Link targets in Markdown ``text``, outside code."""
    text = strip_code(text)
    found = [m.group(1) for m in INLINE.finditer(text)] + [m.group(1) for m in REFDEF.finditer(text)]
    found += [m.group(1) for m in HTML.finditer(text)]
    return [t[1:-1] if t.startswith("<") and t.endswith(">") else t for t in found]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed, spaces -> '-'."""
    h = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    h = re.sub(r"<[^>]+>", "", h).replace("`", "").lower()
    return re.sub(r"[^\w\- ]", "", h).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor GitHub gives the headings of ``path`` (repeats get -1, -2, ...)."""
    seen: dict[str, int] = {}
    out = set()
    for m in HEADING.finditer(FENCE.sub("", path.read_text(encoding="utf-8"))):
        s = slug(m.group(1))
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


def broken_links(path: Path) -> list[str]:
    """The relative links of ``path`` whose target (or #fragment) does not exist, each described."""
    bad = []
    for target in links(path.read_text(encoding="utf-8")):
        if not target or re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("//"):
            continue  # a URL with a scheme: not ours to check offline
        file_part, _, fragment = target.partition("#")
        dest = (path.parent / unquote(file_part)).resolve() if file_part else path
        rel = dest.relative_to(ROOT).as_posix() if dest.is_relative_to(ROOT) else str(dest)
        if not dest.exists():
            bad.append(f"{target!r}: {rel} does not exist")
            continue
        if fragment and dest.suffix == ".md" and dest.is_file() and unquote(fragment).lower() not in anchors(dest):
            bad.append(f"{target!r}: no heading with anchor #{fragment} in {rel}")
    return bad


def test_markdown_is_found():
    names = {p.relative_to(ROOT).as_posix() for p in markdown_files()}
    assert {"README.md", "CHANGELOG.md", "docs/index.md", "bench/README.md", "spec/README.md"} <= names


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(path):
    assert broken_links(path) == [], f"broken links in {path.relative_to(ROOT)}"


def test_the_checker_finds_broken_links(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "there.md").write_text("# A `code` heading: yes!\n\n## Twice\n\n## Twice\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](sub/there.md) [ok too](sub/there.md#a-code-heading-yes) [second](sub/there.md#twice-1)\n"
        "[web](https://example.org/nowhere.md) ![img](missing.png) [gone](sub/none.md)\n"
        "[bad anchor](sub/there.md#nope) `[in code](nothere.md)`\n\n"
        "```\n[in a fence](alsonot.md)\n```\n\n[ref]: sub/absent.md\n<img src=\"pic.svg\">\n"
    )
    found = broken_links(page)
    assert len(found) == 5, found
    for what in ("missing.png", "sub/none.md", "#nope", "sub/absent.md", "pic.svg"):
        assert any(what in f for f in found), (what, found)
