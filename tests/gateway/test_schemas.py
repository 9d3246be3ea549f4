"""Request validation: bad input is a clear 422 long before any model runs."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from gateway.schemas import GenerationCreate, ReviewDecisionIn


def test_a_prompt_or_a_class_is_required() -> None:
    with pytest.raises(ValidationError, match="give a prompt"):
        GenerationCreate.model_validate({"model": "m"})


@pytest.mark.parametrize("prompt", ["a cat\x00", "bell\x07", "esc\x1b[31m", "   "])
def test_prompts_with_control_characters_or_blank_are_rejected(prompt: str) -> None:
    with pytest.raises(ValidationError):
        GenerationCreate.model_validate({"prompt": prompt})


def test_newlines_and_tabs_are_ordinary_text() -> None:
    assert GenerationCreate.model_validate({"prompt": "a red star\n\ton white"}).prompt


@pytest.mark.parametrize("params", [{"cfg_scale": 0.5}, {"cfg_scale": 100}, {"temperature": 0},
                                    {"top_p": 0}, {"top_p": 1.5}, {"top_k": -1}, {"seed": -3},
                                    {"num_images": 0}, {"num_images": 99}, {"steps": 3}])
def test_out_of_range_or_unknown_parameters_are_rejected(params: dict) -> None:
    with pytest.raises(ValidationError):
        GenerationCreate.model_validate({"prompt": "a red star", "params": params})


def test_unknown_top_level_fields_are_rejected() -> None:
    with pytest.raises(ValidationError):
        GenerationCreate.model_validate({"prompt": "a red star", "negative_prompt": "x"})


def test_review_needs_a_reason() -> None:
    with pytest.raises(ValidationError):
        ReviewDecisionIn.model_validate({"decision": "approve", "reason": ""})


@pytest.fixture(scope="module")
def openapi(tmp_path_factory) -> dict:
    from gateway.main import create_app
    from tests.conftest import make_settings

    return create_app(make_settings(tmp_path_factory.mktemp("openapi") / "var")).openapi()


def test_openapi_declares_the_bearer_scheme_and_every_v1_operation_uses_it(openapi: dict) -> None:
    schemes = openapi["components"]["securitySchemes"]
    assert [scheme for scheme in schemes.values() if scheme == {**scheme, "type": "http", "scheme": "bearer"}]
    name = next(iter(schemes))
    operations = [(path, op) for path, ops in openapi["paths"].items() for op in ops.values()]
    for path, op in operations:
        if path.startswith("/v1/"):
            assert op.get("security") == [{name: []}], path
        else:
            assert "security" not in op, path  # /healthz, /readyz and /metrics need no key


@pytest.mark.parametrize("path,model", [("/v1/moderations", "ModerationCreate"),
                                        ("/v1/review/{job_id}", "ReviewDecisionIn"),
                                        ("/v1/generations", "GenerationCreate")])
def test_json_request_bodies_carry_examples_that_validate(openapi: dict, path: str, model: str) -> None:
    from gateway import schemas

    body = openapi["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    examples = openapi["components"]["schemas"][body["$ref"].split("/")[-1]]["examples"]
    assert examples
    for example in examples:
        getattr(schemas, model).model_validate(example)


@pytest.mark.parametrize("path", ["/v1/policies", "/v1/policies/dry-run"])
def test_policy_bodies_carry_an_example_that_is_a_valid_policy(openapi: dict, path: str) -> None:
    from policies.loader import load_policy_text

    example = openapi["paths"][path]["post"]["requestBody"]["content"]["application/yaml"]["example"]
    assert load_policy_text(example, name="example").policy.id


def test_readiness_documents_its_503(openapi: dict) -> None:
    responses = openapi["paths"]["/readyz"]["get"]["responses"]
    assert set(responses) == {"200", "503"}
    assert responses["503"]["content"]["application/json"]["example"]["status"] == "not_ready"
