"""Side-by-side policy diff (gateway/dashboard/diff.py)."""

from __future__ import annotations

from gateway.dashboard.diff import changed_count, side_by_side


def test_identical_texts_have_only_unchanged_rows() -> None:
    rows = side_by_side("a\nb\n", "a\nb\n")
    assert [r.kind for r in rows] == ["same", "same"]
    assert changed_count(rows) == 0


def test_changed_line_is_paired_with_its_replacement_and_line_numbers() -> None:
    rows = side_by_side("id: p\nlimit: 10\nend\n", "id: p\nlimit: 20\nend\n")
    changed = [r for r in rows if r.kind == "changed"]
    assert [(r.left_no, r.left, r.right_no, r.right) for r in changed] == [(2, "limit: 10", 2, "limit: 20")]


def test_added_and_removed_lines_leave_the_other_side_empty() -> None:
    rows = side_by_side("a\nold\nz\n", "a\nz\nnew\n")
    assert [(r.kind, r.left, r.right) for r in rows if r.kind != "same"] == [
        ("removed", "old", None), ("added", None, "new")]
