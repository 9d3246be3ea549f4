"""Intake: the count of requests between prompt screening and the queue."""

from __future__ import annotations

import pytest

from generator.intake import Intake


def test_a_request_counts_while_admitted_and_leaves_even_when_refused() -> None:
    intake = Intake()
    with intake.admitting():
        with intake.admitting():
            assert intake.pending() == 2
        assert intake.pending() == 1
    with pytest.raises(ValueError), intake.admitting():
        raise ValueError("prompt blocked")
    assert intake.pending() == 0
