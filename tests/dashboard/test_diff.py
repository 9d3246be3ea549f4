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


def _lines(rows, side: str) -> list[str]:
    return [getattr(r, side) for r in rows if getattr(r, side) is not None]


def test_every_line_of_both_sides_appears_once_in_order_whatever_the_size() -> None:
    # Many repeated lines made exact alignment take seconds per page view (a request anyone with the
    # auditor role could send); the rows still cover both texts, in order, with their line numbers.
    head = "id: p\nversion: '1'\n"
    cases = [(head + "\n".join("#" if i % 2 else "# a" for i in range(1000)),
              head + "\n".join("#" if i % 3 else "# a" for i in range(1000))),
             ("\n".join(f"l{i}" for i in range(6000)), "\n".join(f"m{i}" for i in range(6001)))]
    for old, new in cases:
        rows = side_by_side(old, new)
        assert _lines(rows, "left") == old.splitlines() and _lines(rows, "right") == new.splitlines()
        assert [r.left_no for r in rows if r.left_no] == list(range(1, len(old.splitlines()) + 1))
        assert [r.right_no for r in rows if r.right_no] == list(range(1, len(new.splitlines()) + 1))


def test_the_common_head_and_tail_stay_unchanged_rows_around_an_edit() -> None:
    old = "\n".join(["a", "b", "x", "c", "d"])
    new = "\n".join(["a", "b", "y", "z", "c", "d"])
    assert [(r.kind, r.left, r.right) for r in side_by_side(old, new)] == [
        ("same", "a", "a"), ("same", "b", "b"), ("changed", "x", "y"), ("added", None, "z"),
        ("same", "c", "c"), ("same", "d", "d")]
