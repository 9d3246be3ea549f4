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


def side_by_side(old: str, new: str) -> list[DiffRow]:
    """Every line of both texts aligned: same, changed (paired), removed (left only), added (right only)."""
    a, b = old.splitlines(), new.splitlines()
    rows: list[DiffRow] = []
    matcher = difflib.SequenceMatcher(a=a, b=b, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
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
