"""Concurrent screenings share one classifier call; one caller's failing input fails only that caller."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from policies import batching
from policies.classifiers.base import ClassifierError, ClassifierResult


class Gated:
    """A fake classifier: the first call waits for a gate (so others queue), then scores text lengths."""

    name = "gated"
    version = "test"

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.gate = threading.Event()

    def score(self, inputs: Sequence[str]) -> list[dict[str, float]]:
        self.calls.append(list(inputs))
        if len(self.calls) == 1:
            assert self.gate.wait(10)
        if "bad" in inputs:
            raise ClassifierError("cannot score 'bad'")
        return [{"length": float(len(text))} for text in inputs]


def screen_concurrently(classifier: Gated, first: str, others: list[str]) -> dict[str, list[ClassifierResult]]:
    results: dict[str, list[ClassifierResult]] = {}

    def call(text: str) -> None:
        (results[text],) = batching.run_batched([classifier], [text])

    leader = threading.Thread(target=call, args=(first,))
    leader.start()
    while not classifier.calls:  # the leader is inside its classifier call
        time.sleep(0.001)
    followers = [threading.Thread(target=call, args=(text,)) for text in others]
    for thread in followers:
        thread.start()
    deadline = time.monotonic() + 10
    while batching.queued() < len(others) and time.monotonic() < deadline:
        time.sleep(0.001)
    classifier.gate.set()
    for thread in [leader, *followers]:
        thread.join(10)
    return results


def test_callers_that_queue_meanwhile_are_screened_in_one_classifier_call() -> None:
    classifier = Gated()
    results = screen_concurrently(classifier, "first", ["a", "bb", "ccc", "dddd"])
    assert [len(call) for call in classifier.calls] == [1, 4]
    assert {text: r[0].scores["length"] for text, r in results.items()} == {
        "first": 5.0, "a": 1.0, "bb": 2.0, "ccc": 3.0, "dddd": 4.0}
    assert all(r[0].error is None for r in results.values())


def test_a_failing_input_in_a_shared_call_fails_only_its_own_caller() -> None:
    classifier = Gated()
    results = screen_concurrently(classifier, "first", ["ok", "bad", "fine"])
    assert results["bad"][0].error is not None and "cannot score" in results["bad"][0].error
    assert results["ok"][0].scores == {"length": 2.0} and results["ok"][0].error is None
    assert results["fine"][0].scores == {"length": 4.0} and results["fine"][0].error is None


def test_a_call_alone_runs_at_once_and_queues_nothing() -> None:
    classifier = Gated()
    classifier.gate.set()
    (results,) = batching.run_batched([classifier], ["solo", "pair"])
    assert [r.scores["length"] for r in results] == [4.0, 4.0]
    assert classifier.calls == [["solo", "pair"]] and batching.queued() == 0
