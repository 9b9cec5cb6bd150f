"""The support matrix (docs/support.md) is true of every timm name in the supported families:
each kind of sparsity works or is refused with the reason the page gives, and everything that
works trains, exports compacted, loads back and equals the masked model on real photos."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sparsekit.support import (
    KINDS,
    MATRIX_END,
    MATRIX_START,
    TOLERANCE,
    end_to_end,
    family_names,
    sample_photos,
    support_of,
)

PAGE = Path(__file__).parents[1] / "docs" / "support.md"
ROW = re.compile(r"^\| `(?P<name>[^`]+)` \| (?P<family>\w+) \| (?P<cells>.+) \|$")
REASON = re.compile(r'^<a id="why-(?P<number>\d+)"></a>\*\*(?P=number)\.\*\* (?P<text>.+)$')


def _matrix() -> dict[str, tuple[str, dict[str, str | None]]]:
    """Each name's family and, per kind, None (works) or the page's reason."""
    text = PAGE.read_text()
    body = text[text.index(MATRIX_START) : text.index(MATRIX_END)].splitlines()
    reasons = {m["number"]: m["text"] for line in body if (m := REASON.match(line))}
    rows = {}
    for line in body:
        if m := ROW.match(line):
            cells = [c.strip() for c in m["cells"].split("|")]
            kinds = {}
            for kind, cell in zip(KINDS, cells, strict=True):
                number = re.fullmatch(r"no \[(\d+)\]\(#why-\1\)", cell)
                kinds[kind] = None if cell == "yes" else reasons[number.group(1)]
            rows[m["name"]] = (m["family"], kinds)
    return rows


MATRIX = _matrix()
PHOTOS = sample_photos()


def test_the_matrix_lists_every_name_of_the_supported_families() -> None:
    assert list(MATRIX) == family_names()
    assert len(MATRIX) > 250


@pytest.mark.parametrize("name", family_names())
def test_every_name_is_as_the_matrix_says(name: str) -> None:
    support = support_of(name)
    family, kinds = MATRIX[name]
    assert support.family == family
    assert {k: support.refused.get(k) for k in KINDS} == kinds
    for reason in support.refused.values():  # one paragraph, that says why
        assert "\n" not in reason and len(reason) > 40 and reason.rstrip().endswith((".", ")"))
    if all(kind in support.refused for kind in KINDS):
        return  # refused as a whole: nothing to apply
    difference, _ = end_to_end(support, PHOTOS)
    assert difference < TOLERANCE


def test_the_counts_other_pages_quote_are_the_matrix_counts() -> None:
    works = {k: sum(kinds[k] is None for _, kinds in MATRIX.values()) for k in KINDS}
    total = len(MATRIX)
    docs = PAGE.parent
    structured, tokens = (
        " ".join((docs / p).read_text().split()) for p in ("structured.md", "tokens.md")
    )
    assert f"Of the {total} timm names" in structured
    assert f"head pruning works on {works['heads']}" in structured
    assert f"neuron pruning on {works['neurons']}" in structured
    assert f"Of the {total} timm names" in tokens
    assert f"{works['tokens']} take token selection" in tokens
