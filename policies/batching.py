"""Screenings that arrive together run together: one classifier call for the inputs of concurrent callers.

One screening per set of classifiers runs at a time per process (each model call already uses the cores it
is given, and more calls at once only oversubscribe them); prompt screening (request threads) and image
screening (the worker thread, which samples or screens, never both) take separate turns, so a request does
not wait for the worker's image batch. Callers that queue meanwhile are not run one by one: whoever takes
the turn next runs every queued request for the same classifiers as one batch (up to `MAX_BATCH_INPUTS`)
and hands each caller its share, so sixteen concurrent prompts cost one MiniLM forward of sixteen rather
than sixteen forwards of one. No thread is started and nothing waits for a batch to fill: a batch is what
queued while the previous one ran.

A classifier that fails on a combined batch is rerun on each caller's inputs alone, so one caller's bad
input cannot turn into error results (fail-closed decisions) for the others.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from policies.classifiers.base import Classifier, ClassifierResult, run_classifier

MAX_BATCH_INPUTS = 64  # bounds the latency one turn adds for the callers queued behind it


@dataclass(eq=False)
class _Request:
    classifiers: tuple[Classifier, ...]
    inputs: Sequence[Any]
    results: list[list[ClassifierResult]] = field(default_factory=list)  # per classifier, per input
    done: bool = False

    @property
    def key(self) -> tuple[int, ...]:
        return tuple(id(c) for c in self.classifiers)  # the same classifier objects (policy revision)


_QUEUE_LOCK = threading.Lock()
_QUEUE: list[_Request] = []
_TURNS: dict[tuple[int, ...], threading.Lock] = {}  # per classifier set: held while its batch runs


def _turn(key: tuple[int, ...]) -> threading.Lock:
    with _QUEUE_LOCK:
        return _TURNS.setdefault(key, threading.Lock())


def run_batched(classifiers: Sequence[Classifier], inputs: Sequence[Any]) -> list[list[ClassifierResult]]:
    """Run each classifier over `inputs`, batched with concurrent callers; results per classifier, per input."""
    if not classifiers or not inputs:
        return [run_classifier(c, inputs) for c in classifiers]
    request = _Request(tuple(classifiers), inputs)
    with _QUEUE_LOCK:
        _QUEUE.append(request)
    with _turn(request.key):
        if not request.done:  # nobody took it along: this caller leads a batch that starts with its own request
            _run(_take(request))
    return request.results


def _take(first: _Request) -> list[_Request]:
    """`first` and the queued requests for the same classifiers, in arrival order, within the batch limit."""
    with _QUEUE_LOCK:
        batch, size = [first], len(first.inputs)
        for request in _QUEUE:
            if request is not first and request.key == first.key and size + len(request.inputs) <= MAX_BATCH_INPUTS:
                batch.append(request)
                size += len(request.inputs)
        _QUEUE[:] = [request for request in _QUEUE if all(request is not taken for taken in batch)]
    first.results = []  # a batch that failed part-way may have left a share behind
    return batch


def _run(batch: list[_Request]) -> None:
    try:
        _run_classifiers(batch)
    except BaseException:  # the others were taken along but not served: each runs its own turn
        for request in batch[1:]:
            request.results = []
        raise


def _run_classifiers(batch: list[_Request]) -> None:
    inputs = [item for request in batch for item in request.inputs]
    for classifier in batch[0].classifiers:
        results = run_classifier(classifier, inputs)
        if len(batch) > 1 and any(r.error is not None for r in results):
            for request in batch:  # isolate the failure: each caller's inputs alone
                request.results.append(run_classifier(classifier, request.inputs))
            continue
        start = 0
        for request in batch:
            request.results.append(results[start:start + len(request.inputs)])
            start += len(request.inputs)
    for request in batch:
        request.done = True


def queued() -> int:
    """Requests waiting for a turn (tests and metrics)."""
    with _QUEUE_LOCK:
        return len(_QUEUE)
