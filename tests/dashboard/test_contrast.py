"""Readable contrast: every text colour of the stylesheet against its background meets WCAG AA (4.5:1)."""

from __future__ import annotations

import re

import pytest

from gateway.dashboard.web import STATIC_DIR

CSS = (STATIC_DIR / "dashboard.css").read_text()
VARIABLES = dict(re.findall(r"--([a-z-]+):\s*(#[0-9a-fA-F]{6})", CSS))
# (text, background) as the stylesheet pairs them
PAIRS = [("ink", "bg"), ("ink", "panel"), ("muted", "bg"), ("muted", "panel"), ("link", "bg"),
         ("allow", "allow-bg"), ("flag", "flag-bg"), ("review", "review-bg"), ("block", "block-bg"),
         ("block", "bg"), ("#ffffff", "#0b57d0"), ("#ffffff", "block"), ("#0b3d91", "bg")]


def _luminance(colour: str) -> float:
    channels = [int(colour[i:i + 2], 16) / 255 for i in (1, 3, 5)]
    linear = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def _colour(name: str) -> str:
    return name if name.startswith("#") else VARIABLES[name]


@pytest.mark.parametrize(("text", "background"), PAIRS)
def test_text_colour_meets_wcag_aa_on_its_background(text: str, background: str) -> None:
    lighter, darker = sorted((_luminance(_colour(text)), _luminance(_colour(background))), reverse=True)
    ratio = (lighter + 0.05) / (darker + 0.05)
    assert ratio >= 4.5, f"{text} on {background}: {ratio:.2f}:1"
