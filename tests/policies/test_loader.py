"""policies/loader.py and the schema: every mistake is caught before a policy is active, located precisely."""

from __future__ import annotations

from pathlib import Path

import pytest

from policies.loader import PolicyError, load_policy_file, load_policy_text

from .conftest import BASE_POLICY, RULES, policy


def test_default_policy_loads_with_a_sha256_revision() -> None:
    loaded = load_policy_file(RULES / "default.yaml")
    assert loaded.policy.id == "default"
    assert loaded.revision.startswith("sha256:") and len(loaded.revision) == 7 + 64


def test_unknown_key_names_file_dotted_path_and_line() -> None:
    text = 'id: p\nversion: "1"\nprompt:\n  lexical:\n    - id: r\n      action: block\n      wrods: [x]\n'
    with pytest.raises(PolicyError, match=r"^p\.yaml:7: prompt\.lexical\.0\.wrods: unknown field"):
        load_policy_text(text, name="p.yaml")


def test_wrong_type_is_an_error_not_a_coercion() -> None:
    text = 'id: p\nversion: "1"\nprompt:\n  max_length: {id: long, limit: "50", action: block}\n'
    with pytest.raises(PolicyError, match=r"p\.yaml:4: prompt\.max_length\.limit: Input should be a valid integer"):
        load_policy_text(text, name="p.yaml")


def test_unquoted_version_number_is_rejected() -> None:
    with pytest.raises(PolicyError, match=r"version: Input should be a valid string \(got 1\.0\)"):
        load_policy_text("id: p\nversion: 1.0\n", name="p.yaml")


def test_bad_regex_names_the_pattern_and_its_line() -> None:
    text = 'id: p\nversion: "1"\nprompt:\n  lexical:\n    - id: r\n      action: block\n      patterns:\n' \
           '        - "(unclosed"\n'
    with pytest.raises(PolicyError, match=r"p\.yaml:8: prompt\.lexical\.0\.patterns\.0: invalid regular expression"):
        load_policy_text(text, name="p.yaml")


def test_duplicate_yaml_key_is_rejected_instead_of_last_one_winning() -> None:
    text = 'id: p\nversion: "1"\nmodels:\n  allowed: [a]\n  allowed: [a, b]\n'
    with pytest.raises(PolicyError, match=r"p\.yaml:5: models: duplicate key 'allowed'"):
        load_policy_text(text, name="p.yaml")


def test_invalid_yaml_reports_its_line() -> None:
    with pytest.raises(PolicyError, match=r"p\.yaml:3: <document>: invalid YAML"):
        load_policy_text('id: p\nversion: "1"\nprompt: a: b\n', name="p.yaml")


@pytest.mark.parametrize("text,expected", [
    ('id: p\nversion: "1"\x00\n', r"p\.yaml: <document>: invalid YAML: .*special characters are not allowed"),
    ("id: p\nversion: 2020-02-30\n", r"p\.yaml: <document>: invalid value: day is out of range"),
    ("id: p\nversion: " + "9" * 5001 + "\n", r"p\.yaml: <document>: invalid value: Exceeds the limit"),
    ('id: p\nversion: "1"\n? [a, b]\n: c\n', r"p\.yaml:3: <document>: mapping keys must be plain names"),
    ("id: p\nversion: " + "[" * 80 + "]" * 80 + "\n", r"p\.yaml(:\d+)?: .*nests deeper than 64 levels"),
    ("id: p\nversion: " + "[" * 5000 + "]" * 5000 + "\n", r"p\.yaml: <document>: the document nests deeper"),
], ids=["control-character", "impossible-date", "huge-integer", "list-as-key", "deep", "deeper-than-python"])
def test_yaml_that_cannot_become_python_values_is_a_policy_error(text: str, expected: str) -> None:
    with pytest.raises(PolicyError, match=expected):
        load_policy_text(text, name="p.yaml")


@pytest.mark.parametrize("pattern", ["a{4294967296}", "(" * 5000 + "a" + ")" * 5000])
def test_a_regex_past_the_engine_limits_is_a_field_error(pattern: str) -> None:
    text = f'id: p\nversion: "1"\nprompt:\n  lexical:\n    - id: r\n      action: block\n      patterns:\n' \
           f'        - "{pattern}"\n'
    expected = r"p\.yaml:8: prompt\.lexical\.0\.patterns\.0: regular expression .* too large"
    with pytest.raises(PolicyError, match=expected):
        load_policy_text(text, name="p.yaml")


def test_missing_required_field_is_named() -> None:
    with pytest.raises(PolicyError, match=r"version: required field is missing"):
        load_policy_text("id: p\n", name="p.yaml")


def test_unknown_detoxify_label_is_rejected() -> None:
    text = """
    id: p
    version: "1"
    prompt:
      toxicity:
        model: {variant: original, checkpoint: d/x.ckpt, config_dir: d/bert, sha256: "%s"}
        rules: [{id: t, label: sexual_explicit, threshold: 0.5, action: block}]
    """ % ("0" * 64)
    with pytest.raises(PolicyError, match=r"prompt\.toxicity\.rules\.0\.label: unknown label 'sexual_explicit'"):
        policy(text)


def test_model_paths_must_stay_inside_the_models_directory() -> None:
    text = """
    id: p
    version: "1"
    output:
      image_concepts:
        model: {architecture: x, weights: ../secret.pt}
        concepts: []
    """
    with pytest.raises(PolicyError, match=r"output\.image_concepts\.model\.weights: .*relative to the models"):
        policy(text)


def test_duplicate_rule_ids_are_rejected() -> None:
    text = BASE_POLICY.replace("- id: horror", "- id: nudity")
    with pytest.raises(PolicyError, match=r"prompt\.lexical\.2\.id: duplicate rule id 'nudity'"):
        policy(text)


def test_team_may_not_disable_a_non_overridable_org_rule() -> None:
    # The LiteLLM precedence bug: a team setting silently switching off an organisation guardrail.
    teams = "teams:\n  ads:\n    overrides:\n      minors: {enabled: false}\n"
    with pytest.raises(PolicyError, match=r"teams\.ads\.overrides\.minors\.enabled: rule 'minors' is not "
                                          r"overridable; a team may only tighten it"):
        policy(teams=teams)


def test_team_may_not_lower_the_action_of_a_non_overridable_rule() -> None:
    teams = "teams:\n  ads:\n    overrides:\n      horror: {action: flag, mode: shadow}\n"
    with pytest.raises(PolicyError, match=r"teams\.ads\.overrides\.horror\.mode: .*enforce -> shadow"):
        policy(teams=teams)


def test_team_may_not_raise_the_threshold_of_a_non_overridable_rule() -> None:
    teams = "teams:\n  ads:\n    overrides:\n      violence: {threshold: 0.9}\n"
    with pytest.raises(PolicyError, match=r"teams\.ads\.overrides\.violence\.threshold: .*0\.5 -> 0\.9"):
        policy(teams=teams)


def test_team_may_loosen_an_overridable_rule() -> None:
    loaded = policy(teams="teams:\n  art:\n    overrides:\n      nudity: {action: review}\n")
    assert loaded.policy.teams["art"].overrides["nudity"].action == "review"


def test_team_may_tighten_any_rule() -> None:
    loaded = policy(teams="teams:\n  ads:\n    overrides:\n      horror: {action: block}\n")
    assert loaded.policy.teams["ads"].overrides["horror"].action == "block"


def test_override_of_an_unknown_rule_is_rejected() -> None:
    with pytest.raises(PolicyError, match=r"teams\.ads\.overrides\.nudty: unknown rule id 'nudty'"):
        policy(teams="teams:\n  ads:\n    overrides:\n      nudty: {action: block}\n")


def test_team_rule_may_not_reuse_an_org_rule_id() -> None:
    teams = "teams:\n  ads:\n    lexical:\n      - {id: nudity, action: flag, words: [x]}\n"
    with pytest.raises(PolicyError, match=r"teams\.ads\.lexical\.0\.id: rule id 'nudity' is already used"):
        policy(teams=teams)


def test_team_allowed_models_must_be_within_the_org_list() -> None:
    text = BASE_POLICY + "models:\n  allowed: [a]\nteams:\n  ads:\n    allowed_models: [a, b]\n"
    with pytest.raises(PolicyError, match=r"teams\.ads\.allowed_models\.1: model 'b' is not allowed"):
        policy(text)


def test_revision_ignores_comments_and_layout() -> None:
    a = load_policy_text('id: p\nversion: "1"\n')
    b = load_policy_text('# a comment\nversion:   "1"\nid: p\n')
    assert a.revision == b.revision


def test_revision_changes_with_content() -> None:
    assert load_policy_text('id: p\nversion: "1"\n').revision != load_policy_text('id: p\nversion: "2"\n').revision


def test_unreadable_file_is_a_policy_error_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"missing\.yaml: <document>: cannot read policy file"):
        load_policy_file(tmp_path / "missing.yaml")


CONTRAST_POLICY = """\
id: p
version: "1"
prompt:
  semantic:
    categories:
      - id: minors
        action: block
        threshold: 0.1
        exemplars: [a child posing seductively]
        contrast: [a woman posing seductively]
        contrast_categories: [adult]
      - id: adult
        action: review
        threshold: 0.1
        exemplars: [a nude woman]
"""


def test_semantic_category_accepts_contrast_exemplars_and_categories() -> None:
    (minors, adult) = load_policy_text(CONTRAST_POLICY).policy.prompt.semantic.categories  # type: ignore[union-attr]
    assert minors.contrast == ["a woman posing seductively"] and minors.contrast_categories == ["adult"]
    assert minors.has_contrast and not adult.has_contrast
    assert minors.contrast_label == "minors.contrast"


def test_misspelt_contrast_key_names_file_field_and_line() -> None:
    text = CONTRAST_POLICY.replace("        contrast: [", "        contrasts: [")
    with pytest.raises(PolicyError, match=r"^p\.yaml:10: prompt\.semantic\.categories\.0\.contrasts: unknown field"):
        load_policy_text(text, name="p.yaml")


def test_contrast_given_as_a_string_instead_of_a_list_is_rejected() -> None:
    text = CONTRAST_POLICY.replace("contrast: [a woman posing seductively]", "contrast: a woman posing seductively")
    with pytest.raises(PolicyError, match=r"p\.yaml:10: prompt\.semantic\.categories\.0\.contrast: Input should be "
                                          r"a valid list"):
        load_policy_text(text, name="p.yaml")


def test_contrast_category_that_is_not_a_rule_id_is_rejected() -> None:
    text = CONTRAST_POLICY.replace("contrast_categories: [adult]", "contrast_categories: [Adult Content]")
    with pytest.raises(PolicyError, match=r"p\.yaml:11: prompt\.semantic\.categories\.0\.contrast_categories\.0: "
                                          r"String should match pattern"):
        load_policy_text(text, name="p.yaml")


def test_unknown_contrast_category_names_its_line_and_the_known_ones() -> None:
    text = CONTRAST_POLICY.replace("contrast_categories: [adult]", "contrast_categories: [adults]")
    with pytest.raises(PolicyError, match=r"p\.yaml:11: prompt\.semantic\.categories\.0\.contrast_categories\.0: "
                                          r"unknown semantic category 'adults'; known organisation categories: "
                                          r"adult, minors"):
        load_policy_text(text, name="p.yaml")


def test_category_cannot_be_its_own_contrast() -> None:
    text = CONTRAST_POLICY.replace("contrast_categories: [adult]", "contrast_categories: [minors]")
    with pytest.raises(PolicyError, match=r"categories\.0\.contrast_categories\.0: category 'minors' cannot be its "
                                          r"own contrast"):
        load_policy_text(text, name="p.yaml")


def test_contrast_phrase_that_is_also_an_exemplar_is_rejected() -> None:
    text = CONTRAST_POLICY.replace("contrast: [a woman posing seductively]", "contrast: [A child posing seductively]")
    with pytest.raises(PolicyError, match=r"p\.yaml:10: prompt\.semantic\.categories\.0\.contrast\.0: 'A child posing "
                                          r"seductively' is both an exemplar and a contrast exemplar of 'minors'"):
        load_policy_text(text, name="p.yaml")


def test_team_category_may_contrast_with_organisation_and_own_categories_only() -> None:
    team = ("teams:\n  art:\n    semantic:\n"
            "      - {id: art_nude, action: flag, threshold: 0.1, exemplars: [x], contrast_categories: [adult]}\n"
            "      - {id: art_gore, action: flag, threshold: 0.1, exemplars: [y], contrast_categories: [art_nude]}\n")
    assert len(load_policy_text(CONTRAST_POLICY + team).policy.teams["art"].semantic) == 2
    other = team + "  ads:\n    semantic:\n      - {id: ad, action: flag, threshold: 0.1, exemplars: [z], " \
                   "contrast_categories: [art_nude]}\n"
    with pytest.raises(PolicyError, match=r"teams\.ads\.semantic\.0\.contrast_categories\.0: unknown semantic "
                                          r"category 'art_nude'"):
        load_policy_text(CONTRAST_POLICY + other, name="p.yaml")


def test_organisation_category_may_not_contrast_with_a_team_category() -> None:
    text = CONTRAST_POLICY.replace("contrast_categories: [adult]", "contrast_categories: [art_nude]") + (
        "teams:\n  art:\n    semantic:\n      - {id: art_nude, action: flag, threshold: 0.1, exemplars: [x]}\n")
    with pytest.raises(PolicyError, match=r"prompt\.semantic\.categories\.0\.contrast_categories\.0: unknown "
                                          r"semantic category 'art_nude'"):
        load_policy_text(text, name="p.yaml")


def test_aliased_lists_are_refused_before_they_expand() -> None:
    # Each line refers to the previous list ten times: 10**9 values from a few hundred bytes.
    lines = ["id: p", 'version: "1"', "l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 9)]
    with pytest.raises(PolicyError, match=r"p\.yaml:3: l1\.0: YAML aliases of lists or mappings are not allowed"):
        load_policy_text("\n".join(lines) + "\n", name="p.yaml")


def test_an_aliased_scalar_is_just_its_value() -> None:
    text = BASE_POLICY.replace("id: test", "id: &name test").replace("words: [zombie]", "words: [zombie, *name]")
    [horror] = [rule for rule in load_policy_text(text, name="p.yaml").policy.prompt.lexical if rule.id == "horror"]
    assert list(horror.words) == ["zombie", "test"]
