"""Every `*.cases.yaml` beside a policy passes: one test per case, ids are the case sentences."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest

from policies.cases import Case, load_cases, policy_path_for, run_case
from policies.loader import LoadedPolicy, PolicyError, load_policy_file
from policies.runtime import PolicyRuntime

from .conftest import REPO, RULES

CASES_FILES = sorted(RULES.glob("*.cases.yaml"))


@cache
def _policy(cases_path: Path) -> LoadedPolicy:
    return load_policy_file(policy_path_for(cases_path, load_cases(cases_path).policy))


@cache
def _runtime(cases_path: Path) -> PolicyRuntime:
    return PolicyRuntime(_policy(cases_path), REPO / "models")


def _all_cases() -> list[tuple[Path, Case]]:
    return [(path, case) for path in CASES_FILES for case in load_cases(path).cases]


def test_default_policy_has_a_cases_file() -> None:
    assert RULES / "default.cases.yaml" in CASES_FILES


@pytest.mark.parametrize(("cases_path", "case"), _all_cases(),
                         ids=[f"{p.name}::{c.id}" for p, c in _all_cases()])
def test_policy_case(cases_path: Path, case: Case) -> None:
    outcome = run_case(_policy(cases_path), case, lambda: _runtime(cases_path))
    assert outcome.passed, f"{case.id}: {outcome.message}"


def test_cases_file_with_a_prompt_and_scores_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "p.cases.yaml"
    path.write_text("cases:\n  - id: both\n    prompt: x\n    scores: {lexical: {}}\n    expect: {action: allow}\n")
    with pytest.raises(PolicyError, match=r"p\.cases\.yaml:3: cases\.0\.prompt: a `prompt` case"):
        load_cases(path)


def test_cases_file_with_an_unknown_key_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "p.cases.yaml"
    path.write_text("cases:\n  - id: typo\n    prompt: x\n    expect: {action: allow, reason: []}\n")
    with pytest.raises(PolicyError, match=r"p\.cases\.yaml:4: cases\.0\.expect\.reason: unknown field"):
        load_cases(path)
