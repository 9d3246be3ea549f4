"""Decisions: a pure function of (policy, classifier results, context, stage). No I/O, clock or randomness.

The strictest fired rule wins (allow < flag < review < block); a rule whose classifier failed takes its
`on_error` action (block unless it says otherwise); shadow rules are recorded but never act. Team overlays
are applied here, and a loosening the organisation did not mark overridable is ignored even if a policy
object skipped the loader's checks: a team can never silently switch off an organisation rule.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from policies.classifiers.base import ClassifierResult
from policies.loader import LoadedPolicy
from policies.schema import (
    ACTION_ORDER,
    CONTRAST_SUFFIX,
    LexicalRule,
    LineageCondition,
    LineageRule,
    Policy,
    Rule,
    RuleOverride,
    SemanticCategory,
    TeamOverlay,
    base_rules,
)

Stage = Literal["prompt", "output", "model"]
MissingScores = Literal["fail_closed", "skip"]

MODEL_NOT_ALLOWED = "model_not_allowed"


@dataclass(frozen=True)
class Context:
    """Who asks, with which model (and its training lineage), for what declared use."""

    team: str | None = None
    model: str | None = None
    lineage: Sequence[Mapping[str, Any]] = ()
    use: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"team": self.team, "model": self.model, "lineage": [dict(s) for s in self.lineage],
                "use": self.use}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Context:
        return cls(team=data.get("team"), model=data.get("model"), lineage=tuple(data.get("lineage") or ()),
                   use=data.get("use"))


@dataclass(frozen=True)
class Reason:
    """Why a rule fired: which rule, which classifier and label, which score against which threshold.

    `contrast` (semantic categories) is the cosine subtracted from the category's similarity: the best
    cosine to its contrast set, so similarity = score + contrast.
    """

    rule_id: str
    classifier: str
    label: str
    score: float | None
    threshold: float | None
    action: str
    message: str
    contrast: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {"rule_id": self.rule_id, "classifier": self.classifier, "label": self.label,
               "score": self.score, "threshold": self.threshold, "action": self.action,
               "message": self.message}
        if self.contrast is not None:
            out["contrast"] = self.contrast
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Reason:
        return cls(rule_id=str(data["rule_id"]), classifier=str(data.get("classifier", "")),
                   label=str(data.get("label", "")), score=data.get("score"), threshold=data.get("threshold"),
                   action=str(data["action"]), message=str(data.get("message", "")),
                   contrast=data.get("contrast"))


@dataclass(frozen=True)
class Decision:
    """The outcome of one stage: action, the enforced reasons, shadow reasons, and the policy revision."""

    action: str
    reasons: tuple[Reason, ...]
    revision: str
    shadow: tuple[Reason, ...] = ()
    stage: str = "prompt"
    skipped_rules: tuple[str, ...] = field(default=())

    @property
    def rule_ids(self) -> list[str]:
        return [r.rule_id for r in self.reasons]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"action": self.action, "stage": self.stage, "revision": self.revision,
                               "reasons": [r.to_dict() for r in self.reasons],
                               "shadow": [r.to_dict() for r in self.shadow]}
        if self.skipped_rules:
            out["skipped_rules"] = list(self.skipped_rules)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Decision:
        return cls(action=str(data["action"]), revision=str(data.get("revision", "")),
                   reasons=tuple(Reason.from_dict(r) for r in data.get("reasons") or ()),
                   shadow=tuple(Reason.from_dict(r) for r in data.get("shadow") or ()),
                   stage=str(data.get("stage", "prompt")),
                   skipped_rules=tuple(data.get("skipped_rules") or ()))


@dataclass(frozen=True)
class EffectiveRule:
    """One rule as it applies to one team after the overlay, flattened for evaluation."""

    id: str
    stage: Stage
    classifier: str
    label: str
    threshold: float | None
    action: str
    mode: str
    on_error: str
    message: str
    rule: Rule
    # Semantic categories with a contrast set: the label of the cosine subtracted from the similarity. Their
    # score means nothing without it (e.g. history scored before the category had a contrast set).
    contrast_label: str | None = None


def strictest(actions: Iterable[str]) -> str:
    """The strictest of some actions; allow when there are none."""
    return max(actions, key=ACTION_ORDER.__getitem__, default="allow")


def _apply_override(rule: EffectiveRule, base: Rule, override: RuleOverride) -> EffectiveRule | None:
    may_loosen = base.overridable
    if override.enabled is False:
        return None if may_loosen else rule
    action, threshold, mode = rule.action, rule.threshold, rule.mode
    if override.action is not None and (may_loosen or ACTION_ORDER[override.action] > ACTION_ORDER[action]):
        action = override.action
    if (override.threshold is not None and threshold is not None
            and (may_loosen or override.threshold < threshold)):
        threshold = override.threshold
    if override.mode is not None and (may_loosen or override.mode == "enforce"):
        mode = override.mode
    return replace(rule, action=action, threshold=threshold, mode=mode)


def _flatten(policy: Policy, overlay: TeamOverlay | None) -> list[EffectiveRule]:
    def make(rule: Rule, stage: Stage, classifier: str, label: str, threshold: float | None) -> EffectiveRule:
        return EffectiveRule(rule.id, stage, classifier, label, threshold, rule.action, rule.mode, rule.on_error,
                             rule.message or rule.description or rule.id, rule)

    rules: list[EffectiveRule] = []
    prompt = policy.prompt
    if prompt.max_length is not None:
        rules.append(make(prompt.max_length, "prompt", "length", "chars", float(prompt.max_length.limit)))
    lexical: list[LexicalRule] = list(prompt.lexical) + (list(overlay.lexical) if overlay else [])
    rules += [make(r, "prompt", "lexical", r.id, 1.0) for r in lexical]
    if prompt.semantic is not None:
        semantic: list[SemanticCategory] = list(prompt.semantic.categories)
        semantic += list(overlay.semantic) if overlay else []
        rules += [replace(make(c, "prompt", "semantic", c.id, c.threshold),
                          contrast_label=c.contrast_label if c.has_contrast else None) for c in semantic]
    if prompt.toxicity is not None:
        rules += [make(t, "prompt", "toxicity", t.label, t.threshold) for t in prompt.toxicity.rules]
    if policy.output.image_concepts is not None:
        rules += [make(c, "output", "image_concepts", c.id, c.threshold)
                  for c in policy.output.image_concepts.concepts]
    rules += [make(r, "model", "model_card", "lineage", None) for r in policy.models.lineage]

    if overlay is None or not overlay.overrides:
        return rules
    originals = {rule_id: rule for rule_id, (_, rule) in base_rules(policy).items()}
    resolved: list[EffectiveRule] = []
    for rule in rules:
        override = overlay.overrides.get(rule.id)
        if override is None or rule.id not in originals:
            resolved.append(rule)
            continue
        applied = _apply_override(rule, originals[rule.id], override)
        if applied is not None:
            resolved.append(applied)
    return resolved


def effective_rules(policy: Policy, team: str | None, stage: Stage | None = None) -> list[EffectiveRule]:
    """The organisation's rules with the team's overlay applied (tightening always, loosening if allowed)."""
    rules = _flatten(policy, policy.teams.get(team) if team is not None else None)
    return [r for r in rules if stage is None or r.stage == stage]


def declared_use(policy: Policy, context: Context) -> str | None:
    """The request's declared use: the context's, else the team overlay's."""
    if context.use is not None:
        return context.use
    overlay = policy.teams.get(context.team) if context.team is not None else None
    return overlay.use if overlay is not None else None


def allowed_models(policy: Policy, team: str | None) -> list[str] | None:
    """Models the team may use; None means any. A team list only narrows the organisation's."""
    base = policy.models.allowed
    overlay = policy.teams.get(team) if team is not None else None
    if overlay is None or overlay.allowed_models is None:
        return base
    if base is None:
        return list(overlay.allowed_models)
    return [m for m in overlay.allowed_models if m in base]


def _caption_source(stage: Mapping[str, Any]) -> str | None:
    source = stage.get("caption_source")
    if isinstance(source, Mapping):
        source = source.get("type") or source.get("kind") or source.get("source")
    return str(source) if source is not None else None


def _datasets(stage: Mapping[str, Any]) -> list[Mapping[str, Any] | str]:
    found: list[Mapping[str, Any] | str] = []
    for key in ("dataset", "datasets"):
        value = stage.get(key)
        if isinstance(value, list):
            found += value
        elif value is not None:
            found.append(value)
    return found


def _dataset_name(dataset: Mapping[str, Any] | str) -> str:
    return str(dataset.get("name", "")) if isinstance(dataset, Mapping) else str(dataset)


def _has_advisory(stage: Mapping[str, Any]) -> bool:
    if stage.get("advisories") or stage.get("advisory"):
        return True
    return any(isinstance(d, Mapping) and (d.get("advisories") or d.get("advisory")) for d in _datasets(stage))


def lineage_matches(condition: LineageCondition, lineage: Sequence[Mapping[str, Any]],
                    use: str | None) -> str | None:
    """A description of the matching training stage, or None when the condition does not hold.

    A lineage stage is a mapping with `caption_source` (a string, or a mapping with `type`), `dataset` or
    `datasets` (names, or mappings with `name` and `advisories`) and optional `advisories`.
    """
    if condition.uses is not None and use not in condition.uses:
        return None
    for index, stage in enumerate(lineage):
        source = _caption_source(stage)
        if condition.caption_source is not None and source not in condition.caption_source:
            continue
        names = [_dataset_name(d) for d in _datasets(stage)]
        if condition.datasets is not None and not set(names) & set(condition.datasets):
            continue
        if condition.advisory is not None and _has_advisory(stage) != condition.advisory:
            continue
        label = stage.get("name") or ", ".join(names) or f"stage {index + 1}"
        return f"training stage {label!s} (captions: {source or 'unknown'})"
    return None


# A fired reason with the rule it came from (None for the built-in model allow-list).
Fired = tuple[EffectiveRule | None, Reason]


def _model_reasons(policy: Policy, rules: list[EffectiveRule], context: Context) -> list[Fired]:
    fired: list[Fired] = []
    allowed = allowed_models(policy, context.team)
    if allowed is not None and context.model not in allowed:
        who = f"team {context.team!r}" if context.team else "this policy"
        fired.append((None, Reason(MODEL_NOT_ALLOWED, "model_card", "model", None, None,
                                   policy.models.not_allowed_action,
                                   f"model {context.model!r} is not allowed for {who}; allowed: "
                                   f"{', '.join(allowed) or 'none'}")))
    use = declared_use(policy, context)
    for rule in rules:
        assert isinstance(rule.rule, LineageRule)
        match = lineage_matches(rule.rule.when, context.lineage, use)
        if match is not None:
            use_note = f" for use {use!r}" if use else ""
            fired.append((rule, Reason(rule.id, "model_card", "lineage", None, None, rule.action,
                                       f"{rule.message}: {match}{use_note}")))
    return fired


def _fires(rule: EffectiveRule, score: float) -> bool:
    assert rule.threshold is not None
    # The length limit is inclusive (a prompt of exactly `limit` characters passes); scores fire at >=.
    return score > rule.threshold if rule.classifier == "length" else score >= rule.threshold


def _contrast_mismatch(rule: EffectiveRule, scores: Mapping[str, float]) -> str | None:
    """Why a semantic score cannot be this category's margin (e.g. history scored under another contrast set)."""
    if rule.classifier != "semantic":
        return None
    if rule.contrast_label is not None and rule.contrast_label not in scores:
        return f"classifier {rule.classifier!r} returned no contrast score {rule.contrast_label!r}"
    if rule.contrast_label is None and rule.label + CONTRAST_SUFFIX in scores:
        return f"classifier {rule.classifier!r} scored {rule.label!r} with a contrast set the category does not have"
    return None


def decide(policy: LoadedPolicy, results: Sequence[ClassifierResult], context: Context, stage: Stage,
           *, missing: MissingScores = "fail_closed") -> Decision:
    """Apply the policy to classifier results for one input at one stage.

    `missing="skip"` (used by replay over stored history) skips rules whose score was never computed
    instead of failing closed on them; skipped rule ids are listed in the decision.
    """
    rules = effective_rules(policy.policy, context.team, stage)
    by_name: dict[str, ClassifierResult] = {}
    for result in results:
        by_name.setdefault(result.name, result)

    fired: list[Fired] = []
    skipped: list[str] = []
    if stage == "model":
        fired = _model_reasons(policy.policy, rules, context)
    for rule in rules if stage != "model" else ():
        found = by_name.get(rule.classifier)
        error = None
        if found is None:
            error = f"classifier {rule.classifier!r} produced no result"
        elif found.error is not None:
            error = found.error
        elif rule.label not in found.scores:
            error = f"classifier {rule.classifier!r} returned no score for {rule.label!r}"
        else:
            error = _contrast_mismatch(rule, found.scores)
        if error is not None:
            if missing == "skip" and (found is None or found.error is None):
                skipped.append(rule.id)
                continue
            if rule.on_error != "allow":
                fired.append((rule, Reason(rule.id, rule.classifier, rule.label, None, rule.threshold,
                                           rule.on_error, f"classifier error (fail closed): {error}")))
            continue
        assert found is not None
        score = found.scores[rule.label]
        if _fires(rule, score):
            contrast = found.scores[rule.contrast_label] if rule.contrast_label is not None else None
            fired.append((rule, Reason(rule.id, rule.classifier, rule.label, score, rule.threshold,
                                       rule.action, rule.message, contrast)))

    enforced = tuple(reason for rule, reason in fired if rule is None or rule.mode == "enforce")
    shadow = tuple(reason for rule, reason in fired if rule is not None and rule.mode == "shadow")
    return Decision(action=strictest(r.action for r in enforced), reasons=enforced, revision=policy.revision,
                    shadow=shadow, stage=stage, skipped_rules=tuple(skipped))
