"""Differences between two policy revisions: a unified text diff and the rule ids added, removed or changed."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from policies.loader import LoadedPolicy
from policies.schema import Policy, base_rules


@dataclass(frozen=True)
class PolicyDiff:
    old_revision: str
    new_revision: str
    unified: str
    added_rules: tuple[str, ...]
    removed_rules: tuple[str, ...]
    changed_rules: tuple[str, ...]
    changed_teams: tuple[str, ...]

    @property
    def identical(self) -> bool:
        return self.old_revision == self.new_revision

    def to_dict(self) -> dict[str, Any]:
        return {"old_revision": self.old_revision, "new_revision": self.new_revision, "unified": self.unified,
                "added_rules": list(self.added_rules), "removed_rules": list(self.removed_rules),
                "changed_rules": list(self.changed_rules), "changed_teams": list(self.changed_teams)}


def _rule_dumps(policy: Policy) -> dict[str, dict[str, Any]]:
    rules = {rule_id: rule.model_dump(mode="json") for rule_id, (_, rule) in base_rules(policy).items()}
    # Section-level settings that change how rules score (the embedding or CLIP model) count per rule.
    if policy.prompt.semantic is not None:
        for category in policy.prompt.semantic.categories:
            rules[category.id]["_model"] = policy.prompt.semantic.model
    if policy.prompt.toxicity is not None:
        for tox in policy.prompt.toxicity.rules:
            rules[tox.id]["_model"] = policy.prompt.toxicity.model.model_dump(mode="json")
    if policy.output.image_concepts is not None:
        for concept in policy.output.image_concepts.concepts:
            rules[concept.id]["_model"] = policy.output.image_concepts.model.model_dump(mode="json")
    return rules


def diff_policies(old: LoadedPolicy, new: LoadedPolicy, old_name: str = "a", new_name: str = "b") -> PolicyDiff:
    """Compare two loaded policies (their sources and their rules)."""
    unified = "".join(difflib.unified_diff(old.source.splitlines(keepends=True), new.source.splitlines(keepends=True),
                                           fromfile=f"{old_name} ({old.revision[:19]})",
                                           tofile=f"{new_name} ({new.revision[:19]})"))
    before, after = _rule_dumps(old.policy), _rule_dumps(new.policy)
    teams_before = {k: v.model_dump(mode="json") for k, v in old.policy.teams.items()}
    teams_after = {k: v.model_dump(mode="json") for k, v in new.policy.teams.items()}
    return PolicyDiff(
        old_revision=old.revision,
        new_revision=new.revision,
        unified=unified,
        added_rules=tuple(sorted(after.keys() - before.keys())),
        removed_rules=tuple(sorted(before.keys() - after.keys())),
        changed_rules=tuple(sorted(k for k in before.keys() & after.keys() if before[k] != after[k])),
        changed_teams=tuple(sorted(k for k in teams_before.keys() | teams_after.keys()
                                   if teams_before.get(k) != teams_after.get(k))),
    )
