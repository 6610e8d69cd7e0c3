"""Every relative link of the repository's markdown (README, docs/, data/) points at a file that is in the
repository: not missing, and not written into a git-ignored folder (a link to `docs/runs/...` once pointed
at a file `.gitignore`'s `runs/` kept out of every clone)."""

import re
import subprocess
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
# [text](target) and ![alt](target); the target ends at whitespace or ')' (an optional "title" follows a space)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def relative_targets(text: str):
    """The link targets of markdown `text` that name a file of the repository (no URL, no pure anchor),
    without their #anchor; fenced code blocks are skipped."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue  # http:, https:, mailto:, ...; an anchor of this page
        yield unquote(target.split("#", 1)[0])


def test_relative_targets_parse_links_and_skip_urls_anchors_and_code():
    text = ("See [a](docs/a.md#part) and ![img](../images/x.png \"title\"), [web](https://x.org/y.md), "
            "[here](#top), [mail](mailto:a@b.c).\n```\n[code](not/a/link.md)\n```\n[sp](<with%20space.md>)")
    assert list(relative_targets(text)) == ["docs/a.md", "../images/x.png", "with space.md"]


def markdown_files():
    """The tracked markdown files (git ls-files), else every .md outside hidden and build folders."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "*.md"], cwd=ROOT, capture_output=True, timeout=60, check=True)
        return [ROOT / name for name in out.stdout.decode().split("\0") if name]
    except (OSError, subprocess.SubprocessError):
        return [p for p in ROOT.rglob("*.md") if not any(part.startswith(".") for part in p.relative_to(ROOT).parts)]


def ignored(paths):
    """The paths git ignores (those a clone would not have even if they exist here)."""
    if not paths:
        return set()
    try:
        out = subprocess.run(["git", "check-ignore", "--no-index", "--stdin", "-z"], cwd=ROOT, capture_output=True,
                             input="\0".join(str(p) for p in paths).encode(), timeout=60)
    except (OSError, subprocess.SubprocessError):
        return set()
    return {Path(name) for name in out.stdout.decode().split("\0") if name}


def test_every_relative_link_of_the_docs_resolves_to_a_file_of_the_repository():
    files = markdown_files()
    assert any(p.name == "README.md" for p in files)
    links = []
    for md in files:
        for target in relative_targets(md.read_text(encoding="utf-8")):
            links.append((md.relative_to(ROOT), target, (md.parent / target).resolve()))
    assert len(links) > 10  # the docs link to one another and to images
    missing = [f"{md}: {target}" for md, target, path in links if not path.exists()]
    inside = [path for _, _, path in links if path.is_relative_to(ROOT)]
    kept_out = ignored(inside)
    not_kept = [f"{md}: {target} (git-ignored)" for md, target, path in links if path in kept_out]
    assert not missing + not_kept, "broken links:\n" + "\n".join(missing + not_kept)


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))
