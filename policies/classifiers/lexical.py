"""Lexical rules: word lists and regular expressions matched on normalised spellings of the prompt."""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

from policies.classifiers.normalize import NORMALISER_VERSION, variants
from policies.schema import LexicalRule

NAME = "lexical"


def _phrase_regex(phrase: str) -> str:
    """One list entry as a regex: whole words, optional separators between words, plural or '*' ending."""
    wildcard = phrase.endswith("*")
    words = variants(phrase.rstrip("*"))[0].split()
    if not words:
        raise ValueError(f"word list entry {phrase!r} has no letters or digits")
    body = r"\s*".join(re.escape(word) for word in words)
    ending = r"\w*" if wildcard else r"(?:s|es)?"
    return body + ending


def _words_regex(phrases: Sequence[str]) -> re.Pattern[str] | None:
    if not phrases:
        return None
    alternatives = sorted({_phrase_regex(p) for p in phrases}, key=len, reverse=True)
    return re.compile(r"\b(?:" + "|".join(alternatives) + r")\b")


@dataclass(frozen=True)
class _CompiledRule:
    rule_id: str
    any_of: tuple[re.Pattern[str], ...]
    all_of: tuple[re.Pattern[str], ...]

    def matches(self, spellings: tuple[str, ...]) -> bool:
        if any(p.search(s) for p in self.any_of for s in spellings):
            return True
        return bool(self.all_of) and all(any(p.search(s) for s in spellings) for p in self.all_of)


def _compile(rule: LexicalRule) -> _CompiledRule:
    any_of = [re.compile(p) for p in rule.patterns]
    words = _words_regex(rule.words)
    if words is not None:
        any_of.append(words)
    groups = tuple(g for g in (_words_regex(group) for group in rule.all_of) if g is not None)
    return _CompiledRule(rule.id, tuple(any_of), groups)


class LexicalClassifier:
    """Scores 1.0 for each lexical rule that matches a prompt, 0.0 otherwise."""

    name = NAME

    def __init__(self, rules: Sequence[LexicalRule]) -> None:
        self._rules = tuple(_compile(rule) for rule in rules)
        definition = json.dumps(
            {"normaliser": NORMALISER_VERSION,
             "rules": [r.model_dump(include={"id", "words", "patterns", "all_of"}) for r in rules]},
            sort_keys=True,
        )
        self.version = "sha256:" + hashlib.sha256(definition.encode()).hexdigest()

    def score(self, inputs: Sequence[str]) -> list[dict[str, float]]:
        out = []
        for text in inputs:
            spellings = variants(text)
            out.append({r.rule_id: 1.0 if r.matches(spellings) else 0.0 for r in self._rules})
        return out


class LengthClassifier:
    """Reports the prompt length (characters after NFKC), for the max_length rule."""

    name = "length"
    version = "nfkc-chars-1"

    def score(self, inputs: Sequence[str]) -> list[dict[str, float]]:
        return [{"chars": float(len(unicodedata.normalize("NFKC", text)))} for text in inputs]
