"""The policy at run time: classifiers loaded once per revision, prompts/models/images screened into Screenings.

A classifier that cannot be loaded (missing weights, wrong hash) does not crash the process: it is replaced
by an `UnavailableClassifier`, so every rule that needs it fails closed with a message naming the file.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from policies.batching import run_batched
from policies.classifiers.base import (
    Classifier,
    ClassifierError,
    ClassifierResult,
    UnavailableClassifier,
)
from policies.classifiers.lexical import LengthClassifier, LexicalClassifier
from policies.decisions import Context, Decision, Stage, decide
from policies.loader import LoadedPolicy
from policies.schema import STORAGE_ORDER, Policy

__all__ = ["Context", "PolicyRuntime", "Screening", "text_classifier_names"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Screening:
    """One screened input: the decision and every classifier result behind it (for the audit log)."""

    decision: Decision
    results: tuple[ClassifierResult, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.decision.stage, "decision": self.decision.to_dict(),
                "results": [r.to_dict() for r in self.results]}

    def fault(self) -> str | None:
        """The classifier errors, when a rule blocked because its classifier failed and no rule blocked on real
        scores: the input could not be screened (the service is unavailable), rather than it broke the
        policy. A rule whose `on_error` is review or flag says itself what a failure does."""
        failed = {result.name: result.error for result in self.results if result.error is not None}
        blocks = [reason for reason in self.decision.reasons if reason.action == "block"]
        if not blocks or any(reason.score is not None or reason.classifier not in failed for reason in blocks):
            return None
        return "; ".join(f"classifier {name!r} failed: {error}" for name, error in failed.items())


def text_classifier_names(policy: Policy) -> list[str]:
    """The prompt classifiers a policy needs, in the order they run."""
    names = []
    if policy.prompt.max_length is not None:
        names.append("length")
    if policy.prompt.lexical or any(t.lexical for t in policy.teams.values()):
        names.append("lexical")
    if policy.prompt.semantic is not None:
        names.append("semantic")
    if policy.prompt.toxicity is not None:
        names.append("toxicity")
    return names


def _build(name: str, policy: Policy, models_dir: Path, device: str) -> Classifier:
    teams = list(policy.teams.values())
    if name == "length":
        return LengthClassifier()
    if name == "lexical":
        return LexicalClassifier(list(policy.prompt.lexical) + [r for t in teams for r in t.lexical])
    if name == "semantic":
        from policies.classifiers.semantic import SemanticClassifier, load_minilm

        assert policy.prompt.semantic is not None
        categories = list(policy.prompt.semantic.categories) + [c for t in teams for c in t.semantic]
        return SemanticClassifier(categories, load_minilm(device), policy.prompt.semantic.neutral_exemplars)
    if name == "toxicity":
        from policies.classifiers.toxicity import DetoxifyClassifier

        assert policy.prompt.toxicity is not None
        return DetoxifyClassifier(policy.prompt.toxicity.model, models_dir, device)
    if name == "image_concepts":
        from policies.classifiers.image_concepts import ImageConceptClassifier

        section = policy.output.image_concepts
        assert section is not None
        return ImageConceptClassifier(section.concepts, section.model, models_dir, device, section.neutral_prompts)
    raise ClassifierError(f"unknown classifier {name!r}")


# Classifiers are cached per (revision, classifier, models_dir, device): exemplar and prompt embeddings are
# computed once per policy revision; the heavy models underneath are cached by weights hash.
_CACHE: dict[tuple[str, str, str, str], Classifier] = {}
IMAGE_RETRY_S = 10.0  # an image classifier that could not be loaded is tried again at most this often
_CACHE_LOCK = threading.Lock()


def _cached(loaded: LoadedPolicy, name: str, models_dir: Path, device: str) -> Classifier:
    key = (loaded.revision, name, str(models_dir.resolve()), device)
    with _CACHE_LOCK:
        if key in _CACHE:
            return _CACHE[key]
        try:
            classifier = _build(name, loaded.policy, models_dir, device)
        except Exception as exc:  # noqa: BLE001 - any load failure must fail closed, not crash the process
            reason = str(exc) if isinstance(exc, ClassifierError) else f"{type(exc).__name__}: {exc}"
            logger.error("classifier %s unavailable for policy %s: %s", name, loaded.revision, reason)
            return UnavailableClassifier(name, f"classifier {name!r} is unavailable: {reason}")
        _CACHE[key] = classifier
        return classifier


class PolicyRuntime:
    """Screens prompts, models and images with one policy revision."""

    def __init__(self, loaded: LoadedPolicy, models_dir: str | Path, device: str = "cpu", *,
                 classifiers: Mapping[str, Classifier] | None = None) -> None:
        """`classifiers` replaces built classifiers by name (tests pass fakes with scripted scores)."""
        self.loaded = loaded
        self.models_dir = Path(models_dir)
        self.device = device
        self._given = dict(classifiers or {})
        self._text = [self._classifier(name) for name in text_classifier_names(loaded.policy)]
        self._image: Classifier | None = None
        self._image_tried = float("-inf")  # time.monotonic() of the last load of the image classifier
        self._image_lock = threading.Lock()

    @property
    def revision(self) -> str:
        return self.loaded.revision

    def _classifier(self, name: str) -> Classifier:
        if name in self._given:
            return self._given[name]
        return _cached(self.loaded, name, self.models_dir, self.device)

    @property
    def text_classifiers(self) -> list[Classifier]:
        return list(self._text)

    def screen_prompt(self, prompt: str, ctx: Context) -> Screening:
        """Screen one prompt."""
        return self.screen_prompts([prompt], ctx)[0]

    def screen_prompts(self, prompts: Sequence[str], ctx: Context) -> list[Screening]:
        """Screen a batch of prompts; each classifier runs once over the whole batch."""
        return self._screen(prompts, [ctx] * len(prompts), "prompt", self._text)

    def check_model(self, ctx: Context) -> Screening:
        """Model rules: the allow-list and conditions on the model's training lineage."""
        return Screening(decide(self.loaded, [], ctx, "model"), ())

    def screen_images(self, images: Sequence[Any], ctx: Context) -> list[Screening]:
        """Screen output images (PIL) with the image concept classifier; one Screening per image."""
        return self.screen_image_sets([(images, ctx)])[0]

    def screen_image_sets(self, sets: Sequence[tuple[Sequence[Any], Context]]) -> list[list[Screening]]:
        """Screen the images of several jobs in one classifier batch; each set is decided in its own context."""
        images = [image for batch, _ in sets for image in batch]
        contexts = [ctx for batch, ctx in sets for _ in batch]
        classifiers = [] if self.loaded.policy.output.image_concepts is None else [self._image_classifier()]
        screenings = self._screen(images, contexts, "output", classifiers)
        out, start = [], 0
        for batch, _ in sets:
            out.append(screenings[start:start + len(batch)])
            start += len(batch)
        return out

    def output_fault(self) -> str | None:
        """Why output screening cannot run, when this process loaded its image classifier and it is unavailable
        (missing or wrong weights); None when it works, is not needed, or was never loaded here."""
        if self._image is None:
            return None
        image = self._image_classifier()
        return image.reason if isinstance(image, UnavailableClassifier) else None

    def _image_classifier(self) -> Classifier:
        # Loaded on first use: the API process screens prompts only and never needs CLIP. One that could not
        # be loaded is tried again at most every IMAGE_RETRY_S (installing its weights heals it), not on every
        # call: a weights file with the wrong digest would be hashed again for each batch.
        with self._image_lock:
            retry = isinstance(self._image, UnavailableClassifier) and \
                time.monotonic() - self._image_tried >= IMAGE_RETRY_S
            if self._image is None or retry:
                self._image_tried = time.monotonic()
                self._image = self._classifier("image_concepts")
            return self._image

    def _screen(self, inputs: Sequence[Any], contexts: Sequence[Context], stage: Stage,
                classifiers: Sequence[Classifier]) -> list[Screening]:
        # One screening per classifier set at a time; concurrent callers share one classifier batch.
        per_classifier = run_batched(classifiers, inputs)
        screenings = []
        for i in range(len(inputs)):
            results = tuple(batch[i] for batch in per_classifier)
            screenings.append(Screening(decide(self.loaded, results, contexts[i], stage), results))
        return screenings

    def prompt_storage(self, ctx: Context) -> str:
        """How this request's prompt is stored: 'full', 'hashed' or 'redacted'."""
        audit = self.loaded.policy.audit
        overlay = self.loaded.policy.teams.get(ctx.team) if ctx.team is not None else None
        wanted = overlay.prompt_storage if overlay is not None else None
        if wanted is None:
            return audit.prompt_storage
        if audit.overridable or STORAGE_ORDER[wanted] >= STORAGE_ORDER[audit.prompt_storage]:
            return wanted
        return audit.prompt_storage


