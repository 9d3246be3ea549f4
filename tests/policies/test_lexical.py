"""policies/classifiers/lexical.py and normalize.py: word lists that survive common evasions."""

from __future__ import annotations

import pytest

from policies.classifiers.lexical import LengthClassifier, LexicalClassifier
from policies.classifiers.normalize import variants
from policies.schema import LexicalRule

RULES = [
    LexicalRule(id="nudity", action="block", words=["naked", "nude"]),
    LexicalRule(id="gore", action="block", words=["decapitat*", "pool of blood"]),
    LexicalRule(id="minors", action="block", all_of=[["child", "kid"], ["naked"]]),
    LexicalRule(id="pattern", action="flag", patterns=[r"\bbloody\b(?!\s+mary)"]),
]


def fired(text: str) -> set[str]:
    (scores,) = LexicalClassifier(RULES).score([text])
    return {rule for rule, score in scores.items() if score == 1.0}


@pytest.mark.parametrize("text", [
    "a NAKED man", "a n a k e d man", "a n.a.k.e.d man", "a n-a-k-e-d man", "a nak3d man", "a n@ked man",
    "a ｎａｋｅｄ man", "a nаkеd man", "a na\u200bked man", "a nakéd man",
])
def test_evasive_spellings_are_normalised_to_the_listed_word(text: str) -> None:
    assert "nudity" in fired(text)


def test_words_match_whole_words_only() -> None:
    assert fired("a nudeness study in snakes and nakedish colours") == set()


def test_plural_of_a_listed_word_matches() -> None:
    assert "nudity" in fired("two nudes on a beach")


def test_trailing_star_matches_any_ending() -> None:
    assert "gore" in fired("a decapitated statue")


def test_phrases_match_across_punctuation_and_spacing() -> None:
    assert "gore" in fired("lying in a pool-of-blood")


def test_all_of_requires_every_group() -> None:
    assert "minors" in fired("a naked child")
    assert "minors" not in fired("a child in a raincoat")


def test_patterns_run_on_the_normalised_text() -> None:
    assert "pattern" in fired("a BLOODY knife")
    assert "pattern" not in fired("a bloody mary cocktail")


def test_numbers_are_not_read_as_leetspeak() -> None:
    assert "1920s" in " ".join(variants("a 1920s street, 35mm film"))


def test_version_changes_when_the_word_lists_change() -> None:
    other = [LexicalRule(id="nudity", action="block", words=["naked"])]
    assert LexicalClassifier(RULES).version != LexicalClassifier(other).version


def test_length_counts_characters_after_nfkc() -> None:
    assert LengthClassifier().score(["ｎａｋｅｄ"]) == [{"chars": 5.0}]
