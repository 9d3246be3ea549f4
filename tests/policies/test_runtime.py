"""policies/runtime.py: classifiers loaded once per revision, screenings for the audit log, fail closed."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from policies.decisions import Context
from policies.runtime import PolicyRuntime

from .conftest import BASE_POLICY, FakeClassifier, FakeEncoder, policy

CTX = Context(team=None, model="demo")


def fake_semantic(text: str) -> dict[str, float]:
    return {"violence": 0.9 if "stab" in text else 0.1, "lenient": 0.0}


def runtime(text: str = BASE_POLICY, models_dir: Path = Path("models"), **sections: str) -> PolicyRuntime:
    return PolicyRuntime(policy(text, **sections), models_dir,
                         classifiers={"semantic": FakeClassifier("semantic", fake_semantic)})


def test_screen_prompt_runs_every_text_classifier_and_records_them() -> None:
    screening = runtime().screen_prompt("a zombie stabbing a man", CTX)
    assert [r.name for r in screening.results] == ["length", "lexical", "semantic"]
    assert screening.decision.action == "review"
    assert set(screening.decision.rule_ids) == {"horror", "violence"}


def test_screening_dict_is_json_safe_and_names_classifier_versions() -> None:
    data = json.loads(json.dumps(runtime().screen_prompt("a naked man", CTX).to_dict()))
    assert data["decision"]["action"] == "block"
    assert data["stage"] == "prompt"
    assert {r["name"]: r["version"] for r in data["results"]}["semantic"] == "fake-1"
    assert all("latency_ms" in r and "error" in r for r in data["results"])


def test_screen_prompts_runs_each_classifier_once_per_batch() -> None:
    semantic = FakeClassifier("semantic", fake_semantic)
    rt = PolicyRuntime(policy(), Path("models"), classifiers={"semantic": semantic})
    screenings = rt.screen_prompts(["a cat", "a naked man", "a stabbing"], CTX)
    assert [s.decision.action for s in screenings] == ["allow", "block", "review"]
    assert semantic.calls == [3]


def test_classifier_exception_becomes_a_recorded_error_and_blocks() -> None:
    def broken(text: str) -> dict[str, float]:
        raise RuntimeError("CUDA out of memory")

    rt = PolicyRuntime(policy(), Path("models"), classifiers={"semantic": FakeClassifier("semantic", broken)})
    screening = rt.screen_prompt("a cat", CTX)
    assert screening.decision.action == "block"
    assert screening.results[2].error == "RuntimeError: CUDA out of memory"


def broken_semantic() -> PolicyRuntime:
    def broken(text: str) -> dict[str, float]:
        raise RuntimeError("CUDA out of memory")

    return PolicyRuntime(policy(), Path("models"), classifiers={"semantic": FakeClassifier("semantic", broken)})


def test_a_decision_made_by_a_classifier_error_is_a_fault_naming_the_classifier() -> None:
    fault = broken_semantic().screen_prompt("a cat", CTX).fault()
    assert fault == "classifier 'semantic' failed: RuntimeError: CUDA out of memory"


def test_a_block_on_real_scores_is_the_policys_decision_even_when_another_classifier_failed() -> None:
    screening = broken_semantic().screen_prompt("a naked man", CTX)  # the word list blocks it
    assert screening.decision.action == "block" and screening.fault() is None


def test_a_rule_whose_on_error_is_review_decides_a_failure_itself_and_is_no_fault() -> None:
    def broken(text: str) -> dict[str, float]:
        raise RuntimeError("CUDA out of memory")

    lenient = BASE_POLICY.replace("        action: review\n        threshold: 0.5",
                                  "        action: review\n        on_error: review\n        threshold: 0.5")
    rt = PolicyRuntime(policy(lenient), Path("models"), classifiers={"semantic": FakeClassifier("semantic", broken)})
    screening = rt.screen_prompt("a cat", CTX)
    assert screening.decision.action == "review" and screening.fault() is None


def test_a_screening_without_classifier_errors_has_no_fault() -> None:
    assert runtime().screen_prompt("a zombie stabbing a man", CTX).fault() is None


def test_classifiers_are_built_once_per_revision() -> None:
    lexical_only = BASE_POLICY[:BASE_POLICY.index("  semantic:")]  # no MiniLM needed
    loaded = policy(lexical_only)
    first = PolicyRuntime(loaded, Path("models"))
    second = PolicyRuntime(loaded, Path("models"))
    assert first.text_classifiers[1] is second.text_classifiers[1]


TINY_CLIP_OUTPUT = """
output:
  image_concepts:
    model: {architecture: tinyclip, config: tiny/tinyclip.json, weights: tiny/tinyclip.pt}
    concepts:
      - {id: red, name: red, action: flag, threshold: 0.3, prompts: [a red square]}
"""  # weights that the tests' models folders do not hold


def test_missing_clip_weights_block_images_with_a_message_naming_the_file(tmp_path: Path) -> None:
    rt = runtime(models_dir=tmp_path, output=TINY_CLIP_OUTPUT)
    (screening,) = rt.screen_images([Image.new("RGB", (32, 32), "red")], CTX)
    assert screening.decision.action == "block"
    assert "CLIP weights not found" in (screening.results[0].error or "")
    assert "tiny/tinyclip.pt" in screening.decision.reasons[0].message


def test_an_image_classifier_that_cannot_load_is_tried_again_only_now_and_then(tmp_path: Path, monkeypatch) -> None:
    import policies.runtime as runtime_module

    rt = runtime(models_dir=tmp_path, output=TINY_CLIP_OUTPUT)
    assert rt.output_fault() is None  # never loaded here: this process cannot tell
    builds: list[str] = []
    build = runtime_module._build
    monkeypatch.setattr(runtime_module, "_build", lambda name, *args: (builds.append(name), build(name, *args))[1])
    for _ in range(3):  # each batch screened while the weights are missing, and each check, within the window
        rt.screen_images([Image.new("RGB", (8, 8))], CTX)
        assert "CLIP weights not found" in (rt.output_fault() or "")
    assert builds == ["image_concepts"]
    monkeypatch.setattr(runtime_module, "IMAGE_RETRY_S", 0.0)  # the window has passed
    rt.screen_images([Image.new("RGB", (8, 8))], CTX)
    assert builds == ["image_concepts", "image_concepts"]


def test_policy_without_output_rules_allows_images() -> None:
    (screening,) = runtime().screen_images([Image.new("RGB", (8, 8))], CTX)
    assert screening.decision.action == "allow" and screening.decision.stage == "output"


def test_check_model_applies_the_allow_list() -> None:
    rt = runtime(BASE_POLICY + "models:\n  allowed: [demo]\n")
    assert rt.check_model(Context(model="demo")).decision.action == "allow"
    assert rt.check_model(Context(model="other")).decision.action == "block"


def test_prompt_storage_follows_the_team_when_it_is_more_private() -> None:
    rt = runtime(BASE_POLICY + "audit: {prompt_storage: hashed}\nteams:\n  legal: {prompt_storage: redacted}\n")
    assert rt.prompt_storage(CTX) == "hashed"
    assert rt.prompt_storage(Context(team="legal")) == "redacted"


def test_semantic_classifier_scores_best_exemplar_per_category() -> None:
    from policies.classifiers.semantic import SemanticClassifier
    from policies.schema import SemanticCategory

    categories = [SemanticCategory(id="violence", action="review", threshold=0.5,
                                   exemplars=["a man stabbing a man", "a bomb exploding"]),
                  SemanticCategory(id="cats", action="flag", threshold=0.5, exemplars=["a sleeping cat"])]
    encoder = FakeEncoder(["man", "stabbing", "bomb", "exploding", "sleeping", "cat"])
    (scores,) = SemanticClassifier(categories, encoder).score(["bomb exploding"])
    assert scores["violence"] > 0.99 and scores["cats"] < 0.01


def test_semantic_score_is_a_margin_over_neutral_exemplars_when_given() -> None:
    from policies.classifiers.semantic import NEUTRAL_LABEL, SemanticClassifier
    from policies.schema import SemanticCategory

    category = SemanticCategory(id="violence", action="review", threshold=0.1, exemplars=["man stabbing man"])
    encoder = FakeEncoder(["man", "stabbing", "cooking"])
    classifier = SemanticClassifier([category], encoder, neutral_exemplars=["man cooking"])
    harmful, ordinary = classifier.score(["man stabbing", "man cooking"])
    assert harmful["violence"] > 0.1 > ordinary["violence"]
    assert ordinary[NEUTRAL_LABEL] > 0.99
