"""Image concepts: raw cosine between an open_clip image embedding and each concept's text prompts.

Each concept has its own threshold on the raw cosine, or on the margin over neutral prompts when the policy
gives some (no softmax across concepts: a softmax always elects a winner, even for an innocent image).
Text prompts are embedded once per policy revision.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from policies.classifiers.base import ClassifierError, file_sha256, trace
from policies.schema import ClipModel, ImageConcept

logger = logging.getLogger(__name__)

NAME = "image_concepts"
NEUTRAL_LABEL = "_neutral"


class _LoadedClip:
    def __init__(self, model: Any, preprocess: Any, tokenizer: Any, device: str) -> None:
        from PIL import Image

        self.model = model
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = device
        pixels = preprocess(Image.new("RGB", (64, 64), "red")).unsqueeze(0).to(device)
        self.encode_image = trace(_image_embedding(model), (pixels.repeat(2, 1, 1, 1),),
                                  check=(pixels.repeat(3, 1, 1, 1),))


def _image_embedding(model: Any) -> Any:
    """open_clip's `encode_image` as a module's forward, for tracing (CoCa's image tower, `model.visual`,
    returns more than the embedding)."""
    import torch

    class ImageEmbedding(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.clip = model

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            return self.clip.encode_image(pixels)  # type: ignore[no-any-return]

    return ImageEmbedding()


_MODELS: dict[tuple[str, str, str], _LoadedClip] = {}
_MODELS_LOCK = threading.Lock()


def load_clip(spec: ClipModel, models_dir: Path, device: str = "cpu") -> tuple[_LoadedClip, str]:
    """The open_clip model of `spec`, loaded once per process (keyed by weights hash); returns its digest."""
    import open_clip

    weights = models_dir / spec.weights
    if not weights.is_file():
        raise ClassifierError(f"CLIP weights not found: {weights} (output.image_concepts.model.weights)")
    config = models_dir / spec.config if spec.config is not None else None
    if config is not None and not config.is_file():
        raise ClassifierError(f"CLIP config not found: {config} (output.image_concepts.model.config)")
    digest = file_sha256(weights)
    if spec.sha256 is not None and digest != spec.sha256:
        raise ClassifierError(f"CLIP weights {weights} have SHA-256 {digest}, but the policy pins {spec.sha256}")
    key = (spec.architecture, digest, device)
    with _MODELS_LOCK:
        if key not in _MODELS:
            if config is not None:
                open_clip.add_model_config(config)
            logger.info("loading open_clip %s (sha256 %s) on %s", spec.architecture, digest[:12], device)
            try:
                model, _, preprocess = open_clip.create_model_and_transforms(
                    spec.architecture, pretrained=str(weights), device=device)
                tokenizer = open_clip.get_tokenizer(spec.architecture)
            except (RuntimeError, ValueError, KeyError, OSError) as exc:
                raise ClassifierError(f"cannot load open_clip {spec.architecture!r} from {weights}: {exc}") from exc
            model.eval()
            _MODELS[key] = _LoadedClip(model, preprocess, tokenizer, device)
        return _MODELS[key], digest


class ImageConceptClassifier:
    """Scores each concept with the best raw cosine between the image and any of its prompts."""

    name = NAME

    def __init__(self, concepts: Sequence[ImageConcept], spec: ClipModel, models_dir: Path,
                 device: str = "cpu", neutral_prompts: Sequence[str] = ()) -> None:
        self._clip, digest = load_clip(spec, models_dir, device)
        self.version = "sha256:" + digest
        self._ids = [c.id for c in concepts]
        self._owner: list[int] = [i for i, c in enumerate(concepts) for _ in c.prompts]
        self._text = self._embed_text([p for c in concepts for p in c.prompts])  # (n_prompts, D)
        self._neutral = self._embed_text(list(neutral_prompts)) if neutral_prompts else None  # (n_neutral, D)

    def _embed_text(self, prompts: list[str]) -> Any:
        import torch

        with torch.inference_mode():
            tokens = self._clip.tokenizer(prompts).to(self._clip.device)
            return torch.nn.functional.normalize(self._clip.model.encode_text(tokens).float(), dim=-1)

    def score(self, inputs: Sequence[Any]) -> list[dict[str, float]]:
        import torch

        if not inputs:
            return []
        clip = self._clip
        pixels = torch.stack([clip.preprocess(image.convert("RGB")) for image in inputs]).to(clip.device)
        with torch.inference_mode():
            images = torch.nn.functional.normalize(clip.encode_image(pixels).float(), dim=-1)  # (B, D)
            sims = (images @ self._text.T).cpu()  # (B, n_prompts)
            neutral = ((images @ self._neutral.T).max(dim=1).values.cpu().tolist()  # (B,)
                       if self._neutral is not None else None)
        out = []
        for i, row in enumerate(sims.tolist()):
            best: dict[str, float] = {}
            for owner, value in zip(self._owner, row, strict=True):
                concept = self._ids[owner]
                best[concept] = max(best.get(concept, -1.0), value)
            if neutral is None:
                out.append({k: round(v, 6) for k, v in best.items()})
            else:
                out.append({NEUTRAL_LABEL: round(neutral[i], 6),
                            **{k: round(v - neutral[i], 6) for k, v in best.items()}})
        return out
