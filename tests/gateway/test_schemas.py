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
