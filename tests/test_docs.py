"""The README stays a short front page, and every relative link in it and in docs/ leads somewhere: to a
file that exists and, with a #fragment, to a heading of that file (GitHub's anchor for it)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.no_ray  # `make test` runs it beside the loopback `ray up` test (pyproject.toml)

ROOT = Path(__file__).resolve().parents[1]
README_LIMIT_BYTES = 12 * 1024  # the rest belongs in docs/ (issue 29)
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^(```|~~~)")
INLINE_CODE = re.compile(r"`[^`]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks: a `# comment` in a bash block is no heading, nor is a link."""
    lines, in_fence = [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            in_fence = not in_fence
        elif not in_fence:
            lines.append(line)
    return lines


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: link text kept, lowercase, punctuation but - and _ dropped, spaces to -."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading's anchor in a markdown file, a repeated one numbered -1, -2 as GitHub does."""
    seen: dict[str, int] = {}
    found = set()
    for line in prose_lines(page.read_text()):
        if match := HEADING.match(line):
            slug = github_slug(match.group(1))
            found.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
            seen[slug] = seen.get(slug, 0) + 1
    return found


def relative_links(page: Path) -> list[str]:
    """Link targets in a page's prose, without web and mail addresses."""
    targets = []
    for line in prose_lines(page.read_text()):
        targets += LINK.findall(INLINE_CODE.sub("", line))
    return [t for t in targets if not re.match(r"(https?:|mailto:)", t)]


def test_heading_slugs_follow_githubs_rules():
    assert github_slug("Seeds, grid ablations and `search report`") == "seeds-grid-ablations-and-search-report"
    assert github_slug("Shared backbone: many trials through one frozen copy") == (
        "shared-backbone-many-trials-through-one-frozen-copy")
    assert github_slug("From `ray up` to `softprompt export`") == "from-ray-up-to-softprompt-export"
    assert github_slug("S3-compatible stores (MinIO, Ceph, R2)") == "s3-compatible-stores-minio-ceph-r2"


def test_links_inside_code_are_not_links_and_comments_in_code_are_not_headings(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n```bash\n# not a heading\necho [x](missing.md)\n```\n\n`[y](gone.md)` [z](#title)\n")
    assert relative_links(page) == ["#title"]
    assert anchors(page) == {"title"}


def test_the_readme_is_at_most_12_kib():
    size = (ROOT / "README.md").stat().st_size
    assert size <= README_LIMIT_BYTES, \
        f"README.md is {size} bytes; move sections into docs/ (limit {README_LIMIT_BYTES})"


def test_there_are_docs_pages_to_check():
    assert len(PAGES) > 1


def test_every_relative_link_in_the_readme_and_docs_names_an_existing_file():
    broken = [f"{page.relative_to(ROOT)}: {target}"
              for page in PAGES for target in relative_links(page)
              if (path := target.split("#", 1)[0]) and not (page.parent / path).exists()]
    assert not broken, "links to missing files:\n" + "\n".join(broken)


def test_every_anchor_names_a_heading_in_its_file():
    broken = []
    for page in PAGES:
        for target in relative_links(page):
            if "#" not in target:
                continue
            path, anchor = target.split("#", 1)
            linked = (page.parent / path) if path else page
            if linked.suffix == ".md" and linked.exists() and anchor not in anchors(linked):
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, "anchors with no heading of that name:\n" + "\n".join(broken)
