"""The one small interface every classifier offers, and the timed, fail-closed way to run one."""

from __future__ import annotations

import hashlib
import logging
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

logger = logging.getLogger(__name__)


class ClassifierError(RuntimeError):
    """A classifier could not be loaded or could not score its input."""


@runtime_checkable
class Classifier(Protocol):
    """Scores inputs (prompts or images); it never decides. `version` identifies the weights."""

    name: str
    version: str

    def score(self, inputs: Sequence[Any]) -> list[dict[str, float]]:
        """One dict of label -> score per input, in order."""
        ...


@dataclass(frozen=True)
class ClassifierResult:
    """What one classifier said about one input: recorded with every decision."""

    name: str
    version: str
    scores: dict[str, float]
    latency_ms: float
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "scores": dict(self.scores),
                "latency_ms": round(self.latency_ms, 3), "error": self.error}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClassifierResult:
        return cls(name=str(data["name"]), version=str(data.get("version", "")),
                   scores={str(k): float(v) for k, v in (data.get("scores") or {}).items()},
                   latency_ms=float(data.get("latency_ms", 0.0)), error=data.get("error"))


class UnavailableClassifier:
    """Stands in for a classifier that failed to load, so every rule using it fails closed."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.version = "unavailable"
        self.reason = reason

    def score(self, inputs: Sequence[Any]) -> list[dict[str, float]]:
        raise ClassifierError(self.reason)


def run_classifier(classifier: Classifier, inputs: Sequence[Any]) -> list[ClassifierResult]:
    """Score a batch, timing it; any failure becomes an error result per input (fail closed downstream)."""
    start = time.perf_counter()
    try:
        scores = classifier.score(inputs)
        if len(scores) != len(inputs):
            raise ClassifierError(f"returned {len(scores)} results for {len(inputs)} inputs")
    except Exception as exc:  # noqa: BLE001 - any failure must turn into a recorded, fail-closed error
        elapsed = (time.perf_counter() - start) * 1000.0 / max(len(inputs), 1)
        message = f"{type(exc).__name__}: {exc}"
        logger.warning("classifier %s failed: %s", classifier.name, message)
        return [ClassifierResult(classifier.name, classifier.version, {}, elapsed, message) for _ in inputs]
    # Batched classifiers report their amortised per-input latency.
    elapsed = (time.perf_counter() - start) * 1000.0 / max(len(inputs), 1)
    return [ClassifierResult(classifier.name, classifier.version, s, elapsed) for s in scores]


_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, streamed; remembered per (path, size, mtime) so big weights hash once."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = _hash_file(path)
    return _DIGESTS[key]


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def trace(model: Any, example: Inputs, check: Inputs) -> Callable[..., Any]:
    """`model`'s forward as a TorchScript graph, which runs from start to end without the GIL. `example` and
    `check` are two sets of its inputs of different shapes: positional arguments, or keyword arguments
    (then the graph is called with those keywords).

    Classifiers run in the gateway's request and release threads, which share the interpreter with the
    server's other threads. An eager forward lets go of the GIL around each op and waits to get it back,
    up to a switch interval (5 ms) whenever another thread holds it. Measured with 1 torch thread, one
    prompt, next to a busy Python thread (alone in brackets): MiniLM 900 ms eager, 27 ms traced (10 ms);
    a BERT-base of Detoxify's size 1.5-1.8 s eager, 110 ms traced (75-82 ms).

    A trace records the ops that ran on `example`: a shape or a branch the forward took in Python would be
    fixed in the graph. So the graph must give the eager result on `check` too, or the model is refused
    (ClassifierError): fail closed. The weights stop requiring gradients, so that no call records autograd.

    On the CPU the model's float32 linears are first replaced by oneDNN-packed ones (`packing.pack_linears`,
    about 2x faster matmuls); the check compares the graph with the forward from before that replacement.
    """
    import torch

    from policies.classifiers import packing

    model.requires_grad_(False)
    with torch.inference_mode():
        eager = _call(model, check)
    with torch.no_grad():
        packing.pack_linears(model, lambda: _call(model, example))
    with warnings.catch_warnings(), torch.no_grad():
        # torch.jit is deprecated in favour of torch.compile/export, which need a compiler or Python per op.
        warnings.simplefilter("ignore", FutureWarning)
        # The tracer warns where a forward reads a tensor in Python; the check below decides instead.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # type: ignore[attr-defined]
        if isinstance(example, dict):
            graph = torch.jit.trace(model, example_kwarg_inputs=example, check_trace=False)  # type: ignore[no-untyped-call]
        else:
            graph = torch.jit.trace(model, example, check_trace=False)  # type: ignore[no-untyped-call]
    with torch.inference_mode():  # the executor profiles a graph's first run and optimises it on the second:
        for _ in range(2):  # both happen here (measured: 70 and 28 ms for MiniLM, then 11 ms), not on a request
            _call(graph, example)
        traced = _call(graph, check)
    for got, want in zip(_tensors(traced), _tensors(eager), strict=True):
        if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
            raise ClassifierError(f"the traced graph of {type(model).__name__} differs from its eager forward on "
                                  "inputs of another shape; refusing to serve it")
    return graph  # type: ignore[no-any-return]


Inputs = tuple[Any, ...] | dict[str, Any]


def _call(fn: Any, inputs: Inputs) -> Any:
    return fn(**inputs) if isinstance(inputs, dict) else fn(*inputs)


def _tensors(output: Any) -> list[Any]:
    return list(output) if isinstance(output, tuple | list) else [output]


# Prompts a text classifier is traced on (`trace`'s example) and checked on (another batch size and length).
TRACE_TEXTS = ["a traced example", "of two prompts"]
CHECK_TEXTS = ["a third prompt, longer than the two it was traced on", "a", "b"]


# A prompt joins a batch whose longest prompt has at most this many times its tokens. Measured with MiniLM
# at 1 thread: the e2e bench's mix of 9- to 16-token prompts, 7 at once, takes 33 ms padded as one batch and
# 36 ms as two (matmuls with fewer rows run less efficiently); one 75-token prompt with seven 9-token ones
# takes 185 ms padded and 50 ms as two batches.
MAX_PADDING_FACTOR = 2.0


def length_groups(lengths: list[int], factor: float = MAX_PADDING_FACTOR) -> list[list[int]]:
    """Indices of `lengths` grouped longest first; an index joins the current group while that group's
    longest is at most `factor` times its length, so no prompt is padded to more than `factor` times itself."""
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if groups and lengths[groups[-1][0]] <= factor * lengths[i]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def in_length_groups(forward: Callable[..., Any], batch: Mapping[str, Any]) -> Any:
    """`forward(**batch)` for a right-padded tokenizer batch, run once per `length_groups` group cut to that
    group's longest prompt, so that one long prompt does not pad the short ones; rows on the CPU, in order."""
    import torch

    lengths = batch["attention_mask"].sum(dim=1).tolist()
    groups = length_groups(lengths)
    parts = [forward(**{name: value[group, :lengths[group[0]]] for name, value in batch.items()}).cpu()
             for group in groups]
    order = torch.tensor([i for group in groups for i in group])
    return torch.cat(parts)[order.argsort()]
