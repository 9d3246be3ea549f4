"""The sampler process of the embedded gateway: the images of sampling in process, faults as errors that name
their cause, and a crashed process replaced (its run made once more)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest
import torch

from generator.registry import GenRequest, Registry, sampling_params
from generator.sampler import LocalSampler, SamplerError, SamplerProcess
from tests.conftest import DEMO_MODELS

PROMPTS = ["a small red star above a large blue circle on a white background", "a green square on a black background"]


@pytest.fixture(scope="module")
def process() -> Iterator[SamplerProcess]:
    sampler = SamplerProcess(DEMO_MODELS, "cpu", torch.get_num_threads())
    yield sampler
    sampler.close()


def test_the_sampler_process_draws_the_images_of_sampling_in_process(process: SamplerProcess) -> None:
    registry = Registry(DEMO_MODELS)
    card = registry.get("demo-shapes-t2i")
    requests = [GenRequest(prompt=PROMPTS[i % 2], seed=i, num_images=1 + i % 2) for i in range(4)]
    remote = process.generate(card, requests, sampling_params(card))
    local = LocalSampler(registry, "cpu").generate(card, requests, sampling_params(card))
    assert [[im.tobytes() for im in o.images] for o in remote] == [[im.tobytes() for im in o.images] for o in local]
    assert [(o.tokens, o.torch_threads) for o in remote] == [(o.tokens, o.torch_threads) for o in local]
    assert {"name": "demo-shapes-t2i", "version": card.version, "device": "cpu"} in process.loaded()


def test_a_pinned_decode_layout_reaches_the_sampler_process_and_its_outputs() -> None:
    sampler = SamplerProcess(DEMO_MODELS, "cpu", torch.get_num_threads(), "streaming")
    try:
        card = Registry(DEMO_MODELS).get("demo-shapes-t2i")
        (output,) = sampler.generate(card, [GenRequest(prompt=PROMPTS[1], seed=3)], sampling_params(card))
    finally:
        sampler.close()
    assert output.decode_layout == "streaming"


def test_a_model_fault_in_the_sampler_process_is_an_error_with_its_reason(process: SamplerProcess) -> None:
    card = Registry(DEMO_MODELS).get("demo-shapes-t2i")
    with pytest.raises(SamplerError, match="text-to-image: give a prompt"):
        process.generate(card, [GenRequest(class_id=3)], sampling_params(card))
    assert process.generate(card, [GenRequest(prompt=PROMPTS[0])], sampling_params(card))  # still serving


def test_a_card_edited_after_the_jobs_were_accepted_is_refused(process: SamplerProcess) -> None:
    card = Registry(DEMO_MODELS).get("demo-shapes-c2i")
    accepted = card.model_copy(update={"version": "0.9"})  # what the jobs were accepted under
    assert accepted.content_hash != card.content_hash
    with pytest.raises(SamplerError, match="changed since the job was accepted"):
        process.generate(accepted, [GenRequest(class_id=1)], sampling_params(card))


def kill_each_new_process(process: SamplerProcess, times: int, after_s: float = 0.2) -> threading.Thread:
    """Kill the sampler's child `after_s` after each (re)start, `times` times."""

    def killer() -> None:
        killed: set[int] = set()
        deadline = time.monotonic() + 120
        while len(killed) < times and time.monotonic() < deadline:
            pid = process.pid
            if pid is None or pid in killed:
                time.sleep(0.01)
                continue
            time.sleep(after_s)
            os.kill(pid, signal.SIGKILL)
            killed.add(pid)

    thread = threading.Thread(target=killer)
    thread.start()
    return thread


def test_a_sampler_process_killed_mid_run_is_replaced_and_the_run_made_again(process: SamplerProcess) -> None:
    card = Registry(DEMO_MODELS).get("demo-shapes-c2i")
    process.load(card)
    first = process.pid
    killer = kill_each_new_process(process, times=1)
    (output,) = process.generate(card, [GenRequest(class_id=1, num_images=64)], sampling_params(card))  # > 0.2 s
    killer.join()
    assert len(output.images) == 64 and process.pid not in (None, first)


def test_a_run_that_kills_its_sampler_process_twice_fails_with_the_reason(process: SamplerProcess) -> None:
    card = Registry(DEMO_MODELS).get("demo-shapes-c2i")
    process.load(card)
    killer = kill_each_new_process(process, times=2)
    with pytest.raises(SamplerError, match="sampler process died twice"):
        process.generate(card, [GenRequest(class_id=1, num_images=64)], sampling_params(card))
    killer.join()
    (output,) = process.generate(card, [GenRequest(class_id=1)], sampling_params(card))  # a new one serves
    assert len(output.images) == 1
