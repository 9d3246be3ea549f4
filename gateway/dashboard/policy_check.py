"""Policy validation problems as the editor shows them: dotted field path, line and message."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.errors import InvalidPolicy
from policies.loader import PolicyError, load_policy_text


@dataclass(frozen=True)
class Problem:
    field: str
    line: int | None
    message: str


def _problems(error: PolicyError) -> list[Problem]:
    return [Problem(field or "(whole document)", line, message) for field, line, message in error.problems]


def validate_source(source: str) -> list[Problem]:
    """What is wrong with a candidate policy (empty when it would be accepted); nothing is stored."""
    try:
        load_policy_text(source, name="editor")
    except PolicyError as exc:
        return _problems(exc)
    return []


def problems_of(exc: InvalidPolicy) -> list[Problem]:
    """The structured problems behind a service's InvalidPolicy (the loader's PolicyError is its cause)."""
    if isinstance(exc.__cause__, PolicyError):
        return _problems(exc.__cause__)
    return [Problem("(whole document)", None, exc.message)]
