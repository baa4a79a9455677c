"""The documentation holds together: every relative link in README.md, CONTRIBUTING.md,
docs/*.md and bench/README.md reaches a file or folder that exists (and, for `#anchor` links,
a heading of the target file, by GitHub's heading slugs), and every ```python block of
README.md runs (CPU, small sizes, each block in a fresh namespace)."""

import glob
import os
import re
import urllib.parse

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = sorted(
    [os.path.join(ROOT, p) for p in ("README.md", "CONTRIBUTING.md",
                                     os.path.join("bench", "README.md"))]
    + glob.glob(os.path.join(ROOT, "docs", "*.md")))
README_MAX_BYTES = 10 * 1024

FENCE = re.compile(r"^\s*(```|~~~)")
# [text](target) and ![alt](target); the target ends at the first space or ')' (an optional
# "title" after a space is ignored)
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"`[^`]*`")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"")


def _rel(path):
    return os.path.relpath(path, ROOT)


def _prose_lines(text):
    """(line number, line) outside fenced code blocks."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield number, line


def github_slug(heading):
    """GitHub's anchor for a heading's text: inline markup dropped (code spans keep their text,
    links their text), lower case, every character but letters, digits, '_', '-' and spaces
    removed, spaces turned into '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = text.replace("`", "")
    text = re.sub(r"<[^>]+>", "", text)
    text = re.sub(r"(\*\*|__|\*)", "", text)
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors_of(path):
    """Every anchor GitHub gives the headings of a markdown file (duplicates numbered -1, -2,
    ...), plus explicit <a name=...> anchors."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    seen, anchors = {}, set()
    for _, line in _prose_lines(text):
        for name in HTML_ANCHOR.findall(line):
            anchors.add(name)
        m = HEADING.match(line)
        if not m:
            continue
        slug = github_slug(m.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def links_of(path):
    """(line number, target) of every relative link in a markdown file, code excluded."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    for number, line in _prose_lines(text):
        for target in LINK.findall(INLINE_CODE.sub("", line)):
            scheme = urllib.parse.urlparse(target).scheme
            if scheme in ("http", "https", "mailto"):
                continue
            yield number, target


def test_pages_found():
    names = {_rel(p) for p in PAGES}
    assert {"README.md", "CONTRIBUTING.md"} <= names, names
    assert any(n.startswith("docs" + os.sep) for n in names), names


def test_readme_fits_in_ten_kilobytes():
    size = os.path.getsize(os.path.join(ROOT, "README.md"))
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes, at most {README_MAX_BYTES}"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_relative_links_resolve(page):
    broken = []
    for number, target in links_of(page):
        file_part, _, anchor = target.partition("#")
        file_part = urllib.parse.unquote(file_part)
        dest = page if not file_part else os.path.normpath(
            os.path.join(os.path.dirname(page), file_part))
        where = f"{_rel(page)}:{number}: {target}"
        if not os.path.exists(dest):
            broken.append(f"{where} (no such file: {_rel(dest)})")
            continue
        if anchor:
            if not dest.endswith(".md"):
                broken.append(f"{where} (an anchor into a file that is not markdown)")
            elif urllib.parse.unquote(anchor) not in anchors_of(dest):
                broken.append(f"{where} (no heading with the anchor #{anchor} in {_rel(dest)})")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_slugs_follow_github():
    assert github_slug("Fused linear + cross-entropy") == "fused-linear--cross-entropy"
    assert github_slug("Under `torch.compile`") == "under-torchcompile"
    assert github_slug("dtypes and devices") == "dtypes-and-devices"
    assert github_slug("`auto_chunk_rows`: rows per chunk") == "auto_chunk_rows-rows-per-chunk"
    assert github_slug("The [SIMT](x.md) harness") == "the-simt-harness"


def _python_blocks(path):
    """(first line number, source) of every ```python block."""
    blocks, current, start = [], None, 0
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            stripped = line.strip()
            if current is None and re.fullmatch(r"```\s*python[3]?", stripped):
                current, start = [], number + 1
            elif current is not None and stripped.startswith("```"):
                blocks.append((start, "".join(current)))
                current = None
            elif current is not None:
                current.append(line)
    assert current is None, f"{_rel(path)}: unterminated code block from line {start}"
    return blocks


README_BLOCKS = _python_blocks(os.path.join(ROOT, "README.md"))


def test_readme_has_python_blocks():
    assert README_BLOCKS


@pytest.mark.parametrize("start,source", README_BLOCKS,
                         ids=[f"README.md:{start}" for start, _ in README_BLOCKS])
def test_readme_python_block_runs(start, source):
    torch.manual_seed(0)
    code = compile("\n" * (start - 1) + source, os.path.join(ROOT, "README.md"), "exec")
    exec(code, {"__name__": "__readme__"})
