"""policies/decisions.py: a pure function from (policy, results, context, stage) to an explained decision."""

from __future__ import annotations

import json

from policies.decisions import Context, Decision, Reason, decide, effective_rules
from policies.schema import Policy

from .conftest import BASE_POLICY, policy, prompt_results, result

CTX = Context(team=None, model="demo")


def test_no_fired_rule_allows() -> None:
    decision = decide(policy(), prompt_results(), CTX, "prompt")
    assert decision.action == "allow" and decision.reasons == ()


def test_fired_rule_is_explained_with_rule_score_threshold_and_revision() -> None:
    loaded = policy()
    decision = decide(loaded, prompt_results(semantic={"violence": 0.61}), CTX, "prompt")
    (reason,) = decision.reasons
    assert (reason.rule_id, reason.classifier, reason.label) == ("violence", "semantic", "violence")
    assert (reason.score, reason.threshold, reason.action) == (0.61, 0.5, "review")
    assert decision.revision == loaded.revision


def test_score_equal_to_threshold_fires() -> None:
    assert decide(policy(), prompt_results(semantic={"violence": 0.5}), CTX, "prompt").action == "review"


def test_strictest_fired_rule_wins() -> None:
    results = prompt_results(lexical={"horror": 1.0, "nudity": 1.0}, semantic={"violence": 0.9})
    decision = decide(policy(), results, CTX, "prompt")
    assert decision.action == "block"
    assert set(decision.rule_ids) == {"horror", "nudity", "violence"}


def test_prompt_over_the_length_limit_is_blocked_but_at_the_limit_is_not() -> None:
    assert decide(policy(), prompt_results(chars=51), CTX, "prompt").rule_ids == ["too_long"]
    assert decide(policy(), prompt_results(chars=50), CTX, "prompt").action == "allow"


def test_classifier_error_blocks_by_default() -> None:
    results = [result("length", chars=1), result("lexical", error="boom"), prompt_results()[2]]
    decision = decide(policy(), results, CTX, "prompt")
    assert decision.action == "block"
    assert all("classifier error (fail closed): boom" in r.message for r in decision.reasons)


def test_missing_classifier_result_fails_closed() -> None:
    decision = decide(policy(), prompt_results()[:2], CTX, "prompt")
    assert decision.action == "block"
    assert "classifier 'semantic' produced no result" in decision.reasons[0].message


def test_missing_label_in_a_result_fails_closed() -> None:
    results = [result("length", chars=1), result("lexical", nudity=0.0), prompt_results()[2]]
    assert decide(policy(), results, CTX, "prompt").action == "block"


def test_rule_with_on_error_allow_does_not_block_on_classifier_error() -> None:
    results = [*prompt_results()[:2], result("semantic", error="timeout")]
    decision = decide(policy(), results, CTX, "prompt")
    assert "lenient" not in decision.rule_ids
    assert "violence" in decision.rule_ids  # the other semantic rule still fails closed


def test_shadow_rule_is_recorded_but_does_not_act() -> None:
    decision = decide(policy(), prompt_results(lexical={"gore_shadow": 1.0}), CTX, "prompt")
    assert decision.action == "allow"
    assert [r.rule_id for r in decision.shadow] == ["gore_shadow"]


def test_team_overlay_loosens_an_overridable_rule_for_that_team_only() -> None:
    loaded = policy(teams="teams:\n  art:\n    overrides:\n      nudity: {action: review}\n")
    results = prompt_results(lexical={"nudity": 1.0})
    assert decide(loaded, results, Context(team="art"), "prompt").action == "review"
    assert decide(loaded, results, Context(team="ads"), "prompt").action == "block"


def test_team_overlay_tightens_a_rule() -> None:
    loaded = policy(teams="teams:\n  ads:\n    overrides:\n      horror: {action: block}\n")
    assert decide(loaded, prompt_results(lexical={"horror": 1.0}), Context(team="ads"), "prompt").action == "block"


def test_team_overlay_lowers_a_threshold() -> None:
    loaded = policy(teams="teams:\n  ads:\n    overrides:\n      violence: {threshold: 0.3}\n")
    results = prompt_results(semantic={"violence": 0.35})
    assert decide(loaded, results, Context(team="ads"), "prompt").action == "review"
    assert decide(loaded, results, CTX, "prompt").action == "allow"


def test_team_disabling_an_overridable_rule_removes_it_for_the_team() -> None:
    loaded = policy(teams="teams:\n  art:\n    overrides:\n      nudity: {enabled: false}\n")
    rules = {r.id for r in effective_rules(loaded.policy, "art")}
    assert "nudity" not in rules and "minors" in rules


def test_non_overridable_rule_survives_a_team_disable_even_without_loader_checks() -> None:
    # Defence in depth for the LiteLLM bug: a Policy built without check_policy() still cannot be loosened.
    loaded = policy()
    raw = loaded.policy.model_dump()
    raw["teams"] = {"ads": {"overrides": {"minors": {"enabled": False, "action": "flag"}}}}
    unchecked = type(loaded)(Policy.model_validate(raw), loaded.revision, loaded.source, None)
    decision = decide(unchecked, prompt_results(lexical={"minors": 1.0}), Context(team="ads"), "prompt")
    assert decision.action == "block" and decision.rule_ids == ["minors"]


def test_team_added_rule_adds_to_org_rules_instead_of_replacing_them() -> None:
    loaded = policy(teams="teams:\n  ads:\n    lexical:\n      - {id: competitor, action: review, words: [acme]}\n")
    results = prompt_results(lexical={"nudity": 1.0, "competitor": 1.0})
    decision = decide(loaded, results, Context(team="ads"), "prompt")
    assert decision.action == "block" and set(decision.rule_ids) == {"nudity", "competitor"}


def test_model_outside_the_allow_list_is_blocked() -> None:
    loaded = policy(BASE_POLICY + "models:\n  allowed: [demo]\n")
    decision = decide(loaded, [], Context(model="other"), "model")
    assert decision.action == "block" and decision.rule_ids == ["model_not_allowed"]
    assert decide(loaded, [], Context(model="demo"), "model").action == "allow"


def test_team_allow_list_narrows_the_org_list() -> None:
    loaded = policy(BASE_POLICY + "models:\n  allowed: [a, b]\nteams:\n  ads:\n    allowed_models: [a]\n")
    assert decide(loaded, [], Context(team="ads", model="b"), "model").action == "block"
    assert decide(loaded, [], Context(team="other", model="b"), "model").action == "allow"


LINEAGE_POLICY = BASE_POLICY + """
models:
  lineage:
    - id: synthetic_ads
      action: review
      when: {caption_source: [synthetic], uses: [advertising]}
    - id: advisory
      action: flag
      when: {advisory: true}
teams:
  ads: {use: advertising}
"""
SYNTHETIC = ({"name": "stage 2", "dataset": "internal", "caption_source": {"type": "synthetic", "model": "LLaVA"}},)


def test_lineage_rule_fires_for_the_declared_use_of_the_team() -> None:
    decision = decide(policy(LINEAGE_POLICY), [], Context(team="ads", lineage=SYNTHETIC), "model")
    assert decision.rule_ids == ["synthetic_ads"]
    assert "stage 2" in decision.reasons[0].message


def test_lineage_rule_does_not_fire_for_other_uses() -> None:
    assert decide(policy(LINEAGE_POLICY), [], Context(team="art", lineage=SYNTHETIC), "model").action == "allow"


def test_context_use_overrides_the_team_declared_use() -> None:
    ctx = Context(team="art", lineage=SYNTHETIC, use="advertising")
    assert decide(policy(LINEAGE_POLICY), [], ctx, "model").action == "review"


def test_dataset_advisory_rule_reads_advisories_on_the_dataset() -> None:
    lineage = ({"dataset": {"name": "laion-coco", "advisories": ["withdrawn 2023"]}, "caption_source": "synthetic"},)
    assert decide(policy(LINEAGE_POLICY), [], Context(lineage=lineage), "model").rule_ids == ["advisory"]


def test_decision_round_trips_through_json() -> None:
    decision = decide(policy(), prompt_results(semantic={"violence": 0.7}, lexical={"gore_shadow": 1.0}), CTX, "prompt")
    restored = Decision.from_dict(json.loads(json.dumps(decision.to_dict())))
    assert restored == decision


def test_skip_mode_skips_rules_without_stored_scores_instead_of_blocking() -> None:
    results = [result("length", chars=1), result("lexical", nudity=0.0, minors=0.0, horror=0.0, gore_shadow=0.0)]
    decision = decide(policy(), results, CTX, "prompt", missing="skip")
    assert decision.action == "allow"
    assert set(decision.skipped_rules) == {"violence", "lenient"}


CONTRAST = BASE_POLICY.replace("exemplars: [a person being stabbed]",
                               "exemplars: [a person being stabbed]\n        contrast: [a person chopping wood]")


def test_contrast_category_reason_reports_score_threshold_and_contrast() -> None:
    results = prompt_results(semantic={"violence": 0.61, "violence.contrast": 0.3})
    (reason,) = decide(policy(CONTRAST), results, CTX, "prompt").reasons
    assert (reason.rule_id, reason.score, reason.threshold, reason.contrast) == ("violence", 0.61, 0.5, 0.3)
    assert reason.to_dict()["contrast"] == 0.3
    assert Reason.from_dict(json.loads(json.dumps(reason.to_dict()))) == reason


def test_reason_without_contrast_keeps_its_stored_shape() -> None:
    (reason,) = decide(policy(), prompt_results(semantic={"violence": 0.61}), CTX, "prompt").reasons
    assert reason.contrast is None and "contrast" not in reason.to_dict()
    stored = {"rule_id": "violence", "classifier": "semantic", "label": "violence", "score": 0.61,
              "threshold": 0.5, "action": "review", "message": "m"}
    assert Reason.from_dict(stored).contrast is None


def test_contrast_category_without_a_contrast_score_fails_closed() -> None:
    decision = decide(policy(CONTRAST), prompt_results(semantic={"violence": 0.1}), CTX, "prompt")
    (reason,) = decision.reasons
    assert decision.action == "block" and reason.rule_id == "violence"
    assert "returned no contrast score 'violence.contrast'" in reason.message


def test_score_computed_with_a_contrast_set_the_category_lacks_fails_closed() -> None:
    results = prompt_results(semantic={"violence": 0.1, "violence.contrast": 0.4})
    (reason,) = decide(policy(), results, CTX, "prompt").reasons
    assert reason.action == "block" and "with a contrast set the category does not have" in reason.message
