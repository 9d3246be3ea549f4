"""Dry-run replay: what a candidate policy would have decided on stored history. Pure: no database, no models.

Replay re-applies `decide()` to the classifier results stored with each past decision. Rules whose scores
were never stored (a new semantic category, a lexical rule added since, a category that gained a contrast
set and so a different score) cannot be replayed from scores; they are reported as skipped rather than
guessed, and keep the outcome they had (a skipped rule that fired still counts as fired).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from policies.classifiers.base import ClassifierResult
from policies.decisions import Context, Decision, Stage, decide, strictest
from policies.loader import LoadedPolicy

MAX_EXAMPLES_PER_RULE = 5
_STAGES = ("prompt", "output", "model")
# Audit actions whose payload holds the screenings behind a decision (`screenings`, with the `context`).
REPLAYABLE_ACTIONS = ("prompt.screened", "moderation.screened", "output.screened")


class ReplayError(ValueError):
    """A history record that cannot be replayed (names the record and what is missing)."""


@dataclass(frozen=True)
class HistoryItem:
    """One past decision with the classifier results and context it was made from."""

    id: str
    stage: Stage
    context: Context
    results: tuple[ClassifierResult, ...]
    decision: Decision

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], default_id: str = "") -> HistoryItem:
        """Read a record shaped like `Screening.to_dict()` plus `id` and `context` (an audit payload works)."""
        record = data.get("payload", data) if isinstance(data.get("payload"), Mapping) else data
        ident = str(record.get("id") or data.get("id") or default_id)
        if not isinstance(record.get("decision"), Mapping):
            raise ReplayError(f"history record {ident or '?'}: no decision")
        try:
            decision = Decision.from_dict(record["decision"])
            results = tuple(ClassifierResult.from_dict(r) for r in record.get("results") or ())
            context = Context.from_dict(record.get("context") or {})
        except (KeyError, TypeError, ValueError, AttributeError) as exc:  # a field missing or of the wrong shape
            raise ReplayError(f"history record {ident or '?'}: malformed ({type(exc).__name__}: {exc})") from exc
        stage = str(record.get("stage") or decision.stage)
        if stage not in _STAGES:
            raise ReplayError(f"history record {ident}: unknown stage {stage!r}")
        return cls(id=ident, stage=stage, context=context, results=results, decision=decision)  # type: ignore[arg-type]


@dataclass(frozen=True)
class ChangeExample:
    id: str
    stage: str
    team: str | None
    before: str
    after: str
    rules: dict[str, str]  # rule id -> "its action before -> after" ("not fired" when absent)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "stage": self.stage, "team": self.team, "before": self.before, "after": self.after,
                "rules": dict(self.rules)}


@dataclass
class ReplayReport:
    """How many past decisions a candidate policy would change, by rule, with examples."""

    candidate_revision: str
    total: int = 0
    changed: int = 0
    transitions: Counter[str] = field(default_factory=Counter)
    by_rule: Counter[str] = field(default_factory=Counter)
    skipped_rules: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[ChangeExample]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "candidate_revision": self.candidate_revision,
            "total": self.total,
            "changed": self.changed,
            "unchanged": self.total - self.changed,
            "transitions": dict(sorted(self.transitions.items())),
            "by_rule": dict(self.by_rule.most_common()),
            "skipped_rules": dict(self.skipped_rules.most_common()),
            "examples": {rule: [e.to_dict() for e in items] for rule, items in sorted(self.examples.items())},
        }

    def summary(self) -> str:
        lines = [f"{self.changed} of {self.total} past decisions would change under {self.candidate_revision}"]
        lines += [f"  {transition}: {count}" for transition, count in sorted(self.transitions.items())]
        lines += [f"  rule {rule}: {count} decision(s)" for rule, count in self.by_rule.most_common()]
        if self.skipped_rules:
            lines.append("  not replayable from stored scores (none stored, or computed with another contrast set): "
                         + ", ".join(f"{r} ({n})" for r, n in self.skipped_rules.most_common()))
        return "\n".join(lines)


def history_of_event(event_id: str, team: str | None, payload: Mapping[str, Any]) -> Iterator[HistoryItem]:
    """The screenings an audit event of a REPLAYABLE_ACTIONS action recorded, as history items."""
    context = payload.get("context") or {"team": team}
    screenings = payload.get("screenings") or []
    if not isinstance(screenings, list):
        raise ReplayError(f"history record {event_id}: `screenings` is not a list")
    for n, screening in enumerate(screenings):
        if not isinstance(screening, Mapping):
            raise ReplayError(f"history record {event_id}#{n}: a screening is not an object")
        yield HistoryItem.from_dict({**screening, "context": context}, default_id=f"{event_id}#{n}")


def replay(candidate: LoadedPolicy, history: Iterable[HistoryItem],
           max_examples: int = MAX_EXAMPLES_PER_RULE) -> ReplayReport:
    """Re-decide every history item under `candidate` and count what changes."""
    report = ReplayReport(candidate_revision=candidate.revision)
    for item in history:
        report.total += 1
        new = decide(candidate, item.results, item.context, item.stage, missing="skip")
        report.skipped_rules.update(new.skipped_rules)
        kept = tuple(r for r in item.decision.reasons if r.rule_id in new.skipped_rules)
        if kept:
            reasons = new.reasons + kept
            new = replace(new, reasons=reasons, action=strictest(r.action for r in reasons))
        before = {r.rule_id: r.action for r in item.decision.reasons}
        after = {r.rule_id: r.action for r in new.reasons}
        if new.action == item.decision.action and before == after:
            continue
        report.changed += 1
        report.transitions[f"{item.decision.action} -> {new.action}"] += 1
        rules = {rule: f"{before.get(rule, 'not fired')} -> {after.get(rule, 'not fired')}"
                 for rule in sorted(before.keys() | after.keys()) if before.get(rule) != after.get(rule)}
        example = ChangeExample(item.id, item.stage, item.context.team, item.decision.action, new.action, rules)
        for rule in rules:
            report.by_rule[rule] += 1
            bucket = report.examples.setdefault(rule, [])
            if len(bucket) < max_examples:
                bucket.append(example)
    return report
