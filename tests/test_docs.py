"""The documentation's links: every relative link in README.md and docs/*.md names a file that exists, and every
#anchor a heading of that file, so a renamed result or a moved section cannot leave a dangling reference."""
import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def _anchors(markdown):
    """GitHub's heading anchors: lower case, punctuation but hyphens dropped, spaces to hyphens."""
    heads = re.findall(r"^#+ (.*)$", markdown, re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def _links(markdown):
    text = re.sub(r"```.*?```", "", markdown, flags=re.S)  # code blocks hold no links
    return [m for m in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", m)]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: os.path.relpath(p, ROOT))
def test_relative_links_resolve(doc):
    links = _links(_read(doc))
    assert links, f"{os.path.relpath(doc, ROOT)} has no relative links: the link pattern is broken"
    bad = []
    for link in links:
        path, _, anchor = link.partition("#")
        target = os.path.normpath(os.path.join(os.path.dirname(doc), path)) if path else doc
        if not os.path.exists(target):
            bad.append(f"{link}: no such file")
        elif anchor and anchor not in _anchors(_read(target)):
            bad.append(f"{link}: no heading with that anchor in {os.path.relpath(target, ROOT)}")
    assert not bad, "\n".join(bad)


def test_the_link_and_anchor_rules():
    assert _anchors("## Before the C++ training kernels\n") == {"before-the-c-training-kernels"}
    assert _anchors("## AMD EPYC Zen 3, AVX2 only (2026-12-07)\n") == {"amd-epyc-zen-3-avx2-only-2026-12-07"}
    assert _links("[a](x.md) [b](https://e.org) [c](#top)\n```\n[d](code.md)\n```\n") == ["x.md", "#top"]
