"""Every relative link in README.md and docs/*.md resolves: the target file exists, and a #anchor names a
heading of the target page (GitHub's heading ids). Keeps the README -> docs/ move honest."""
import re
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")
INLINE_CODE = re.compile(r"`+[^`]*`+")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (a `# comment` in a bash block is not a heading)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's id for a heading: lower case, punctuation dropped (hyphens and underscores kept), spaces -> '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    ids, seen = set(), {}
    for line in prose_lines(page.read_text(encoding="utf-8")):
        if match := HEADING.match(line):
            base = slug(match.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            ids.add(base if n == 0 else f"{base}-{n}")
    return ids


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """'page: target (why)' for each relative link of `page` that does not resolve."""
    broken = []
    for line in prose_lines(page.read_text(encoding="utf-8")):
        for target in LINK.findall(INLINE_CODE.sub(lambda m: m.group(0).replace("](", "] ("), line)):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
                continue
            path, _, anchor = unquote(target).partition("#")
            file = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(root)}: {target}"
            if not file.exists():
                broken.append(f"{where} (no such file)")
            elif anchor and file.suffix != ".md":
                broken.append(f"{where} (an anchor into a file that is not markdown)")
            elif anchor and anchor not in anchors(file):
                broken.append(f"{where} (no heading with that id in {file.name})")
    return broken


def test_readme_and_docs_links_resolve():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert len(pages) > 1
    broken = [b for page in pages for b in broken_links(page)]
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_checker_finds_broken_links(tmp_path):
    """The checker itself: a good link, a missing file, a missing anchor, a code-block 'heading', a link in code."""
    (tmp_path / "other.md").write_text("# Other page\n\n## The LM head at Llama 3's vocabulary\n\n## Twice\n\n## Twice\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n```bash\n# 1. not a heading\n```\n\n"
        "[ok](other.md#the-lm-head-at-llama-3s-vocabulary) [ok](other.md#twice-1) [ok](#page) ![img](other.md)\n"
        "[gone](missing.md) [bad anchor](other.md#nope) [code block](#1-not-a-heading) [web](https://example.com/x)\n"
        "`[in code](nowhere.md)`\n")
    assert broken_links(page, tmp_path) == [
        "page.md: missing.md (no such file)",
        "page.md: other.md#nope (no heading with that id in other.md)",
        "page.md: #1-not-a-heading (no heading with that id in page.md)",
    ]


def test_readme_is_a_front_door():
    """Issue 19: the README stays short; details belong in docs/ pages."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines: move details into a docs/ page"
