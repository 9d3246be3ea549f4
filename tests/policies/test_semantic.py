"""policies/classifiers/semantic.py: category scores are margins over each category's contrast set."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from policies.classifiers.base import ClassifierError
from policies.classifiers.semantic import NEUTRAL_LABEL, SemanticClassifier
from policies.schema import SemanticCategory

from .conftest import FakeEncoder

VOCABULARY = ["child", "woman", "posing", "nude", "cooking", "blood", "cut"]


class CountingEncoder(FakeEncoder):
    """FakeEncoder that records how many texts each encode() call embedded."""

    def __init__(self, vocabulary: Sequence[str]) -> None:
        super().__init__(vocabulary)
        self.calls: list[int] = []

    def encode(self, texts: Sequence[str]) -> Any:
        self.calls.append(len(texts))
        return super().encode(texts)


def category(cid: str, exemplars: list[str], **fields: Any) -> SemanticCategory:
    return SemanticCategory(id=cid, action="block", threshold=0.1, exemplars=exemplars, **fields)


def cosine(encoder: FakeEncoder, a: str, b: str) -> float:
    x, y = encoder.encode([a, b])
    return float(x @ y)


def test_score_is_best_exemplar_cosine_minus_best_contrast_cosine() -> None:
    encoder = FakeEncoder(VOCABULARY)
    minors = category("minors", ["child posing"], contrast=["woman posing"])
    (scores,) = SemanticClassifier([minors], encoder).score(["woman posing nude"])
    similarity = cosine(encoder, "woman posing nude", "child posing")
    contrast = cosine(encoder, "woman posing nude", "woman posing")
    assert scores["minors.contrast"] == pytest.approx(contrast, abs=1e-6)
    assert scores["minors"] == pytest.approx(similarity - contrast, abs=1e-6)
    assert scores["minors"] < 0  # closer to the adult contrast than to the child exemplar


def test_prompt_closer_to_the_exemplars_than_to_the_contrast_scores_above_zero() -> None:
    classifier = SemanticClassifier([category("minors", ["child posing"], contrast=["woman posing"])],
                                    FakeEncoder(VOCABULARY))
    child, adult = classifier.score(["child posing nude", "woman posing nude"])
    assert child["minors"] > 0.1 > adult["minors"]


def test_contrast_categories_lend_their_exemplars_to_the_contrast_set() -> None:
    encoder = FakeEncoder(VOCABULARY)
    minors = category("minors", ["child posing"], contrast_categories=["adult"])
    adult = category("adult", ["woman nude"])
    (scores,) = SemanticClassifier([minors, adult], encoder).score(["woman posing nude"])
    contrast = cosine(encoder, "woman posing nude", "woman nude")
    assert scores["minors.contrast"] == pytest.approx(contrast, abs=1e-6)
    assert scores["adult"] == pytest.approx(contrast, abs=1e-6)  # the named category itself is unchanged
    assert "adult.contrast" not in scores


def test_neutral_exemplars_are_part_of_every_contrast_set() -> None:
    encoder = FakeEncoder(VOCABULARY)
    categories = [category("minors", ["child posing"], contrast=["woman posing"]), category("gore", ["blood cut"])]
    (scores,) = SemanticClassifier(categories, encoder, neutral_exemplars=["child cooking"]).score(["child cooking"])
    assert scores[NEUTRAL_LABEL] == pytest.approx(1.0, abs=1e-6)
    # The neutral cosine beats the category's own contrast, so it is the one subtracted.
    assert scores["minors.contrast"] == scores[NEUTRAL_LABEL]
    assert scores["minors"] == pytest.approx(cosine(encoder, "child cooking", "child posing") - 1.0, abs=1e-6)
    # A category without its own contrast set is a margin over the neutral exemplars and reports no contrast
    # label (a stored score without one was computed without a category contrast set).
    assert scores["gore"] == pytest.approx(cosine(encoder, "child cooking", "blood cut") - 1.0, abs=1e-6)
    assert "gore.contrast" not in scores


def test_category_without_any_contrast_scores_its_raw_cosine_and_reports_no_contrast() -> None:
    encoder = FakeEncoder(VOCABULARY)
    (scores,) = SemanticClassifier([category("gore", ["blood cut"])], encoder).score(["blood"])
    assert scores == {"gore": pytest.approx(cosine(encoder, "blood", "blood cut"), abs=1e-6)}


def test_exemplars_and_contrast_are_embedded_once_and_each_batch_once() -> None:
    encoder = CountingEncoder(VOCABULARY)
    categories = [category("minors", ["child posing", "child nude"], contrast=["woman posing"],
                           contrast_categories=["adult"]), category("adult", ["woman nude"])]
    classifier = SemanticClassifier(categories, encoder, neutral_exemplars=["cooking"])
    built = list(encoder.calls)
    assert sorted(built) == [1, 1, 3]  # neutral, own contrast phrases, exemplars; named categories reuse rows
    classifier.score(["a", "b"])
    classifier.score(["c"])
    assert encoder.calls[len(built):] == [2, 1]


def test_contrast_category_missing_from_the_classifier_is_a_classifier_error() -> None:
    with pytest.raises(ClassifierError, match="contrast category 'adult' is not another semantic category"):
        SemanticClassifier([category("minors", ["child posing"], contrast_categories=["adult"])],
                           FakeEncoder(VOCABULARY))
