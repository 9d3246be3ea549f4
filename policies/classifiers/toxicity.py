"""Toxicity: a Detoxify checkpoint loaded fully offline from a local file and a local HF config directory.

Detoxify's own loader calls `from_pretrained(model_type)` with the name stored in the checkpoint
("bert-base-uncased"), which needs the network. We verify the pinned SHA-256 first (the checkpoint is
unpickled), then build the model with Detoxify's `get_model_and_tokenizer` pointed at the local directory.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from policies.classifiers.base import CHECK_TEXTS, TRACE_TEXTS, ClassifierError, file_sha256, in_length_groups, trace
from policies.schema import DetoxifyModel

logger = logging.getLogger(__name__)

NAME = "toxicity"
# Detoxify standardises the label names of its original model; so do we.
_RENAMED = {"toxic": "toxicity", "identity_hate": "identity_attack", "severe_toxic": "severe_toxicity"}


class _LoadedDetoxify:
    def __init__(self, model: Any, tokenizer: Any, labels: list[str], device: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.labels = labels
        self.device = device
        self.max_tokens = int(getattr(model.config, "max_position_embeddings", 512))
        model.config.return_dict = False  # logits as a tuple's first item: what a traced graph can return
        self.logits = trace(model, dict(self.tokens(TRACE_TEXTS)), check=dict(self.tokens(CHECK_TEXTS)))

    def tokens(self, texts: list[str]) -> Any:
        """The tokenizer's tensors (input_ids, attention_mask and, for BERT, token_type_ids) on the device."""
        return self.tokenizer(texts, return_tensors="pt", truncation=True, padding=True,
                              max_length=self.max_tokens).to(self.device)


_MODELS: dict[tuple[str, str], _LoadedDetoxify] = {}
_MODELS_LOCK = threading.Lock()


def _load(spec: DetoxifyModel, models_dir: Path, device: str) -> _LoadedDetoxify:
    import torch
    from detoxify.detoxify import get_model_and_tokenizer

    checkpoint = models_dir / spec.checkpoint
    config_dir = models_dir / spec.config_dir
    if not checkpoint.is_file():
        raise ClassifierError(f"Detoxify checkpoint not found: {checkpoint} (prompt.toxicity.model.checkpoint)")
    if not (config_dir / "config.json").is_file():
        raise ClassifierError(f"Detoxify config directory {config_dir} has no config.json "
                              f"(prompt.toxicity.model.config_dir)")
    digest = file_sha256(checkpoint)
    if digest != spec.sha256:
        raise ClassifierError(f"Detoxify checkpoint {checkpoint} has SHA-256 {digest}, but the policy pins "
                              f"{spec.sha256}; refusing to unpickle it")
    key = (digest, device)
    with _MODELS_LOCK:
        if key in _MODELS:
            return _MODELS[key]
        logger.info("loading Detoxify %s (sha256 %s) on %s", spec.variant, digest[:12], device)
        # Safe to unpickle: the file's hash matched the pin above.
        loaded = torch.load(checkpoint, map_location=device, weights_only=False)
        try:
            arch = dict(loaded["config"]["arch"]["args"])
            classes = list(loaded["config"]["dataset"]["args"]["classes"])
            state_dict = loaded["state_dict"]
        except (KeyError, TypeError) as exc:
            raise ClassifierError(f"{checkpoint} is not a Detoxify checkpoint (missing {exc})") from exc
        arch["model_type"] = str(config_dir)
        model, tokenizer = get_model_and_tokenizer(**arch, state_dict=state_dict,
                                                   huggingface_config_path=str(config_dir))
        model.to(device).eval()
        tokenizer.padding_side = "right"  # `score` cuts a group's padding off the end
        _MODELS[key] = _LoadedDetoxify(model, tokenizer, [_RENAMED.get(c, c) for c in classes], device)
        return _MODELS[key]


class DetoxifyClassifier:
    """Detoxify label probabilities (sigmoid per label) for each prompt."""

    name = NAME

    def __init__(self, spec: DetoxifyModel, models_dir: Path, device: str = "cpu") -> None:
        self._detox = _load(spec, models_dir, device)
        self.version = "sha256:" + spec.sha256

    def score(self, inputs: Sequence[str]) -> list[dict[str, float]]:
        import torch

        if not inputs:
            return []
        detox = self._detox

        def probabilities(**batch: Any) -> Any:
            return torch.sigmoid(detox.logits(**batch)[0])

        with torch.inference_mode():
            probs = in_length_groups(probabilities, detox.tokens(list(inputs)))
        return [{label: round(p, 6) for label, p in zip(detox.labels, row, strict=True)} for row in probs.tolist()]
