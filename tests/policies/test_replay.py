"""policies/replay.py: dry-run a candidate policy over stored decisions; counts changes by rule."""

from __future__ import annotations

import json

from policies.decisions import Context, decide
from policies.replay import HistoryItem, replay
from policies.runtime import Screening

from .conftest import BASE_POLICY, policy, prompt_results


def history_item(ident: str, lexical: dict[str, float] | None = None, semantic: dict[str, float] | None = None,
                 team: str | None = None) -> HistoryItem:
    """A stored screening made under BASE_POLICY, read back the way the export gives it."""
    ctx = Context(team=team, model="demo")
    results = tuple(prompt_results(lexical=lexical, semantic=semantic))
    screening = Screening(decide(policy(), results, ctx, "prompt"), results)
    record = {**screening.to_dict(), "id": ident, "context": ctx.to_dict()}
    return HistoryItem.from_dict(json.loads(json.dumps(record)))


def test_same_policy_changes_nothing() -> None:
    history = [history_item("1", lexical={"nudity": 1.0}), history_item("2")]
    report = replay(policy(), history)
    assert (report.total, report.changed) == (2, 0)


def test_lower_threshold_reports_newly_fired_rule_with_examples() -> None:
    candidate = policy(BASE_POLICY.replace("threshold: 0.5\n        exemplars: [a person being stabbed]",
                                           "threshold: 0.3\n        exemplars: [a person being stabbed]"))
    history = [history_item("a", semantic={"violence": 0.4}), history_item("b", semantic={"violence": 0.2})]
    report = replay(candidate, history)
    assert report.changed == 1
    assert report.transitions == {"allow -> review": 1}
    assert report.by_rule == {"violence": 1}
    assert [e.id for e in report.examples["violence"]] == ["a"]


def test_removed_rule_is_reported_as_no_longer_firing() -> None:
    candidate = policy(BASE_POLICY.replace("words: [zombie]", "words: [zombie]\n      mode: shadow"))
    report = replay(candidate, [history_item("z", lexical={"horror": 1.0})])
    assert report.transitions == {"flag -> allow": 1}
    assert report.examples["horror"][0].rules == {"horror": "flag -> not fired"}


def test_rules_without_stored_scores_are_skipped_not_guessed() -> None:
    candidate = policy(BASE_POLICY + "      - {id: brand_new, action: block, threshold: 0.5, exemplars: [x]}\n")
    report = replay(candidate, [history_item("1")])
    assert report.changed == 0
    assert report.skipped_rules == {"brand_new": 1}


def test_history_reads_audit_payload_records() -> None:
    item = history_item("p")
    record = {"payload": {"id": "p", "stage": "prompt", "decision": item.decision.to_dict(),
                          "results": [r.to_dict() for r in item.results], "context": {"team": "ads"}}}
    parsed = HistoryItem.from_dict(record)
    assert parsed.context.team == "ads" and parsed.results == item.results


def test_report_summary_counts_changes() -> None:
    candidate = policy(BASE_POLICY.replace("words: [zombie]", "words: [zombie, ghoul]"))
    report = replay(candidate, [history_item("1", lexical={"horror": 1.0})])
    assert report.summary().startswith("0 of 1 past decisions would change")
    assert json.loads(json.dumps(report.to_dict()))["unchanged"] == 1


def test_history_scored_before_a_category_had_contrast_is_skipped_not_replayed_on_stale_margins() -> None:
    candidate = policy(BASE_POLICY.replace("threshold: 0.5\n        exemplars: [a person being stabbed]",
                                           "threshold: 0.3\n        exemplars: [a person being stabbed]\n"
                                           "        contrast: [chopping wood]"))
    # 0.4 was a score without contrast; read as the candidate's margin it would wrongly fire at 0.3.
    report = replay(candidate, [history_item("old", semantic={"violence": 0.4})])
    assert (report.changed, report.skipped_rules) == (0, {"violence": 1})


def test_skipped_rule_keeps_the_outcome_it_had_instead_of_counting_as_no_longer_firing() -> None:
    candidate = policy(BASE_POLICY.replace("exemplars: [a person being stabbed]",
                                           "exemplars: [a person being stabbed]\n        contrast: [chopping wood]"))
    report = replay(candidate, [history_item("fired", semantic={"violence": 0.7})])
    assert (report.changed, report.skipped_rules) == (0, {"violence": 1})


def test_history_with_contrast_scores_replays_contrast_categories() -> None:
    base = BASE_POLICY.replace("exemplars: [a person being stabbed]",
                               "exemplars: [a person being stabbed]\n        contrast: [chopping wood]")
    ctx = Context(model="demo")
    results = tuple(prompt_results(semantic={"violence": 0.4, "violence.contrast": 0.35}))
    record = {**Screening(decide(policy(base), results, ctx, "prompt"), results).to_dict(), "id": "new",
              "context": ctx.to_dict()}
    candidate = policy(base.replace("threshold: 0.5\n        exemplars: [a person being stabbed]",
                                    "threshold: 0.3\n        exemplars: [a person being stabbed]"))
    report = replay(candidate, [HistoryItem.from_dict(json.loads(json.dumps(record)))])
    assert report.transitions == {"allow -> review": 1} and not report.skipped_rules


def test_history_scored_with_contrast_is_skipped_under_a_candidate_without_it() -> None:
    report = replay(policy(), [history_item("new", semantic={"violence": 0.2, "violence.contrast": 0.5})])
    assert (report.changed, report.skipped_rules) == (0, {"violence": 1})
