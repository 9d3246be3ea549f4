"""policies/diff.py: text diff plus the rule ids added, removed and changed between revisions."""

from __future__ import annotations

from policies.diff import diff_policies

from .conftest import BASE_POLICY, policy


def test_identical_policies_have_the_same_revision_and_no_changes() -> None:
    diff = diff_policies(policy(), policy())
    assert diff.identical and diff.changed_rules == () and diff.unified == ""


def test_changed_threshold_names_the_rule_and_shows_the_line() -> None:
    new = policy(BASE_POLICY.replace("threshold: 0.5\n        exemplars: [a person",
                                     "threshold: 0.4\n        exemplars: [a person"))
    diff = diff_policies(policy(), new)
    assert diff.changed_rules == ("violence",)
    assert "-        threshold: 0.5" in diff.unified and "+        threshold: 0.4" in diff.unified


def test_added_and_removed_rules_are_listed() -> None:
    new = policy(BASE_POLICY.replace("- id: horror", "- id: scary"))
    diff = diff_policies(policy(), new)
    assert (diff.added_rules, diff.removed_rules) == (("scary",), ("horror",))


def test_team_overlay_changes_are_listed() -> None:
    new = policy(teams="teams:\n  ads:\n    overrides:\n      horror: {action: block}\n")
    assert diff_policies(policy(), new).changed_teams == ("ads",)
