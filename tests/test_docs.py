"""The documentation holds: params.yaml is the code's defaults and documents every key in its
comments, the README stays short, and every relative link and #anchor in the Markdown resolves."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests.conftest import PROJECT
from vaelab import params as params_mod

PARAMS_FILE = PROJECT / "params.yaml"
README = PROJECT / "README.md"
DOCS = sorted((PROJECT / "docs").glob("*.md"))
README_MAX_LINES = 200


def test_params_file_holds_the_code_defaults():
    defaults = params_mod.flatten(params_mod.defaults())
    raw = yaml.safe_load(PARAMS_FILE.read_text())
    assert sorted(params_mod.flatten_yaml(raw)) == sorted(defaults)
    # Values as the stages read them (validated, YAML 1.2 floats), key by key for a clear diff.
    loaded = params_mod.flatten(params_mod.load(PARAMS_FILE))
    assert {k: (v, type(v)) for k, v in loaded.items()} == {
        k: (v, type(v)) for k, v in defaults.items()
    }


def leaf_keys_and_comments(text: str) -> dict[str, str]:
    """``{"section.key": its comment}`` for every key under a section of a params-shaped YAML
    text: the comment on the key's line (after its value), else the comment lines directly above
    the key at the key's own indentation (a comment continuing the previous key's line comment is
    indented further and is not counted); "" when there is none."""
    lines = text.splitlines()
    document = yaml.compose(text)
    found: dict[str, str] = {}
    for section_node, keys_node in document.value:
        if not isinstance(keys_node, yaml.MappingNode):
            continue
        for key_node, value_node in keys_node.value:
            name = f"{section_node.value}.{key_node.value}"
            row, column = key_node.start_mark.line, key_node.start_mark.column
            end = value_node.end_mark
            after_value = lines[row][end.column :] if end.line == row else ""
            comment = after_value.strip().removeprefix("#").strip()
            if not after_value.strip().startswith("#"):
                comment = ""
            above = []
            for line in reversed(lines[:row]):
                indent = len(line) - len(line.lstrip())
                if not line.lstrip().startswith("#") or indent != column:
                    break
                above.insert(0, line.strip().removeprefix("#").strip())
            found[name] = comment or " ".join(above).strip()
    return found


def test_every_params_key_carries_a_comment():
    comments = leaf_keys_and_comments(PARAMS_FILE.read_text())
    assert sorted(comments) == sorted(params_mod.flatten(params_mod.defaults()))
    assert [key for key, comment in comments.items() if not comment] == []


def test_the_comment_reader_tells_a_documented_key_from_an_undocumented_one():
    text = (
        "train:\n"
        "  epochs: 20   # passes\n"
        "  # Adam's step size,\n"
        "  # over two lines\n"
        "  lr: 0.001\n"
        "  seed: 0      # a line comment\n"
        "               # that continues here\n"
        "  device: auto\n"
    )
    assert leaf_keys_and_comments(text) == {
        "train.epochs": "passes",
        "train.lr": "Adam's step size, over two lines",
        "train.seed": "a line comment",
        "train.device": "",
    }


def test_readme_is_short():
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move reference to docs/"


FENCE = re.compile(r"^[ \t]*(`{3,}|~{3,}).*?^[ \t]*\1", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def prose(text: str) -> str:
    """The Markdown without code blocks and code spans, where a link is not a link."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the text as rendered (links and emphasis reduced to their
    words), lower-case, punctuation removed, spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # [words](url) -> words
    text = re.sub(r"[*`]", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file; repeated headings get -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for heading in HEADING.findall(FENCE.sub("", path.read_text())):
        base = slug(heading)
        found.add(f"{base}-{seen[base]}" if base in seen else base)
        seen[base] = seen.get(base, 0) + 1
    return found


def test_slugs_are_githubs():
    assert slug("Model and loss, and how they relate to the tutorial") == (
        "model-and-loss-and-how-they-relate-to-the-tutorial"
    )
    assert slug("Several processes (DDP)") == "several-processes-ddp"
    assert slug("`make test` and [pytest](https://pytest.org)") == "make-test-and-pytest"


def relative_links(path: Path) -> list[str]:
    return [
        target
        for target in LINK.findall(prose(path.read_text()))
        if not re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:", target)  # http:, https:, mailto: ...
    ]


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: str(p.relative_to(PROJECT)))
def test_relative_links_and_anchors_resolve(page: Path):
    broken = []
    for target in relative_links(page):
        file_part, _, anchor = target.partition("#")
        linked = (page.parent / file_part).resolve() if file_part else page
        if not linked.exists() or not linked.is_relative_to(PROJECT):
            broken.append(f"{target}: no such file in the repository")
        elif anchor and (linked.suffix != ".md" or anchor not in anchors(linked)):
            broken.append(f"{target}: no heading with the anchor #{anchor} in {linked.name}")
    assert broken == []


def test_every_docs_page_is_linked_from_the_readme():
    assert DOCS, "docs/ has no pages"
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in relative_links(README)}
    assert [p.name for p in DOCS if p.resolve() not in linked] == []


def test_a_broken_link_and_a_missing_anchor_are_found(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "# Top\n\n## Two words\n\n[ok](#two-words) [gone](#three) [web](https://x.org)\n"
        "`[code](nowhere.md)`\n\n```\n[fenced](nowhere.md)\n```\n[missing](nowhere.md)\n"
    )
    assert relative_links(page) == ["#two-words", "#three", "nowhere.md"]
    assert anchors(page) == {"top", "two-words"}
