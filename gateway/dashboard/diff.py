"""Side-by-side line diff of two policy sources, as rows a template can lay out in two columns."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Literal

Kind = Literal["same", "changed", "removed", "added"]


@dataclass(frozen=True)
class DiffRow:
    """One row of the side-by-side view; a side is None where the other side has no counterpart."""

    kind: Kind
    left_no: int | None
    left: str | None
    right_no: int | None
    right: str | None


# Lines x lines of the differing middle up to which every line may anchor the alignment. SequenceMatcher
# without its "popular lines are junk" heuristic grows much faster than the text on many repeated lines
# (1,000 alternating comment lines took seconds, 500 over half a second); past this size the heuristic bounds it.
EXACT_ALIGNMENT_CELLS = 300 * 300
MAX_ALIGNED_LINES = 5000


def side_by_side(old: str, new: str) -> list[DiffRow]:
    """Every line of both texts aligned: same, changed (paired), removed (left only), added (right only)."""
    a, b = old.splitlines(), new.splitlines()
    rows: list[DiffRow] = []
    # The common head and tail are aligned as they are; only the middle needs matching.
    head = 0
    while head < min(len(a), len(b)) and a[head] == b[head]:
        head += 1
    tail = 0
    while tail < min(len(a), len(b)) - head and a[len(a) - 1 - tail] == b[len(b) - 1 - tail]:
        tail += 1
    middle_a, middle_b = a[head:len(a) - tail], b[head:len(b) - tail]
    if max(len(middle_a), len(middle_b)) > MAX_ALIGNED_LINES:  # no policy differs this much: pair them in order
        middle = [("replace", 0, len(middle_a), 0, len(middle_b))]
    else:
        matcher = difflib.SequenceMatcher(a=middle_a, b=middle_b,
                                          autojunk=len(middle_a) * len(middle_b) > EXACT_ALIGNMENT_CELLS)
        middle = matcher.get_opcodes()
    opcodes = [("equal", 0, head, 0, head)] if head else []
    opcodes += [(tag, i1 + head, i2 + head, j1 + head, j2 + head) for tag, i1, i2, j1, j2 in middle
                if i1 != i2 or j1 != j2]
    if tail:
        opcodes.append(("equal", len(a) - tail, len(a), len(b) - tail, len(b)))
    for tag, i1, i2, j1, j2 in opcodes:
        if tag == "equal":
            pairs = zip(range(i1, i2), range(j1, j2), strict=True)
            rows.extend(DiffRow("same", i + 1, a[i], j + 1, b[j]) for i, j in pairs)
            continue
        left, right = list(range(i1, i2)), list(range(j1, j2))
        for k in range(max(len(left), len(right))):
            i = left[k] if k < len(left) else None
            j = right[k] if k < len(right) else None
            kind: Kind = "added" if i is None else "removed" if j is None else "changed"
            rows.append(DiffRow(kind, None if i is None else i + 1, None if i is None else a[i],
                                None if j is None else j + 1, None if j is None else b[j]))
    return rows


def changed_count(rows: list[DiffRow]) -> int:
    return sum(1 for row in rows if row.kind != "same")
