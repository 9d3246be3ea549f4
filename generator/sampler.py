"""Where a worker's sampling runs: in the worker's own process, or in a child process of the embedded gateway.

A sampling run calls into torch once per operation and lets go of the GIL around each call. In a process
whose other threads run Python (the gateway's request handlers, the releaser), every call then waits for
the GIL to come back, up to a switch interval (5 ms) each time: a run of 8 demo images that takes 0.25 s
alone took 36 s next to one busy Python thread. A queue worker process runs only its task, so it samples in
its own process (`LocalSampler`); the embedded gateway samples in a child process (`SamplerProcess`), which
it starts on first use and again after a crash. Both end in `LoadedModel.generate`.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol

from generator.llamagen.sampling import SamplingParams
from generator.registry import GenOutput, GenRequest, LoadedModel, ModelCard, Registry

log = logging.getLogger(__name__)

# How long a closing sampler process may take to finish its run before it is terminated.
CLOSE_TIMEOUT_S = 30.0


def torch_threads(requested: int = 0) -> int:
    """CPU threads per torch call for a process that shares the cores: `requested`, or half of them.

    Each calling thread gets a team of this many threads: at one per core, two concurrent calls (the
    sampler and a screening classifier) oversubscribe the cores and spin-waiting teams slow both.
    """
    return requested or max(1, (os.cpu_count() or 2) // 2)


class SamplerError(RuntimeError):
    """Sampling could not run: the model failed to load or generate, or the sampler process died."""


class Sampler(Protocol):
    def generate(self, card: ModelCard, requests: list[GenRequest], params: SamplingParams) -> list[GenOutput]:
        """Images for `requests` from the model `card` describes (the card the jobs were accepted under)."""
        ...

    def load(self, card: ModelCard) -> None:
        """Load the model ahead of its first run."""
        ...

    def loaded(self) -> list[dict[str, str]]:
        """The models loaded for sampling (name, version, device): what a worker reports it serves."""
        ...

    def close(self) -> None: ...


def _load(registry: Registry, name: str, content_hash: str, device: str) -> LoadedModel:
    model = registry.load(name, device)
    if model.card.content_hash != content_hash:
        raise SamplerError(f"model card of {name} changed since the job was accepted "
                           f"({content_hash} -> {model.card.content_hash})")
    return model


class LocalSampler:
    """Samples in this process (a queue worker, the CLI, tests)."""

    def __init__(self, registry: Registry, device: str) -> None:
        self._registry = registry
        self._device = device

    def generate(self, card: ModelCard, requests: list[GenRequest], params: SamplingParams) -> list[GenOutput]:
        return _load(self._registry, card.name, card.content_hash, self._device).generate(requests, params)

    def load(self, card: ModelCard) -> None:
        _load(self._registry, card.name, card.content_hash, self._device)

    def loaded(self) -> list[dict[str, str]]:
        return Registry.loaded()

    def close(self) -> None:
        pass


class SamplerProcess:
    """Samples in a child process (spawned, so it shares no threads or locks with this one), one run at a
    time; a child that died is replaced (see `_call`)."""

    def __init__(self, models_dir: Path, device: str, threads: int, decode_layout: str = "auto") -> None:
        self._args = (Path(models_dir), device, threads, decode_layout)
        self._lock = threading.Lock()
        self._process: Any = None  # multiprocessing's SpawnProcess
        self._conn: Connection | None = None
        self._loaded: list[dict[str, str]] = []

    def generate(self, card: ModelCard, requests: list[GenRequest], params: SamplingParams) -> list[GenOutput]:
        outputs: list[GenOutput] = self._call("generate", card, requests, params)
        return outputs

    def load(self, card: ModelCard) -> None:
        self._call("load", card, [], None)

    def loaded(self) -> list[dict[str, str]]:
        return list(self._loaded)

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def close(self) -> None:
        with self._lock:
            if self._process is None or self._conn is None:
                return
            try:
                self._conn.send(None)
            except OSError:
                pass
            self._process.join(CLOSE_TIMEOUT_S)
            self._stop()

    def _call(self, op: str, card: ModelCard, requests: list[GenRequest], params: SamplingParams | None) -> Any:
        """Run `op` in the child; a child that dies (killed, out of memory) is replaced and the call made once
        more: sampling has no side effects, and one that kills its process twice is failed, not retried."""
        with self._lock:
            for attempt in (1, 2):
                if self._process is None or not self._process.is_alive():
                    self._start()
                assert self._conn is not None
                try:
                    self._conn.send((op, card.name, card.content_hash, requests, params))
                    status, value, self._loaded = self._conn.recv()
                    break
                except (EOFError, OSError) as exc:
                    self._process.join(1.0)
                    code = self._process.exitcode
                    self._stop()
                    if attempt == 2:
                        raise SamplerError(f"the sampler process died twice (exit code {code}): {exc!r}") from exc
                    log.warning("the sampler process died (exit code %s); running again in a new one", code)
        if status == "error":
            raise SamplerError(value)
        return value

    def _start(self) -> None:
        self._stop()
        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe()
        process = context.Process(target=serve, args=(child, *self._args), name="llamagen-sampler", daemon=True)
        process.start()
        child.close()  # the child's end lives in the child alone: its exit ends our recv() with EOFError
        self._process, self._conn = process, parent
        log.info("started sampler process %s", process.pid)

    def _stop(self) -> None:
        if self._conn is not None:
            self._conn.close()
        if self._process is not None and self._process.is_alive():
            self._process.terminate()
            self._process.join(5.0)
        self._process = self._conn = None
        self._loaded = []


def serve(conn: Connection, models_dir: Path, device: str, threads: int, decode_layout: str = "auto") -> None:
    """The sampler process: load and run models as asked until told to stop (None) or the parent is gone."""
    from generator.llamagen import configure_runtime

    # Ctrl-C in a terminal reaches the whole process group: the parent stops this process when it shuts down
    # (None, or the pipe closing), so a sampling run is not cut off mid-batch with a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_runtime(num_threads=threads)  # as a worker process would (threads; TF32 on CUDA)
    registry = Registry(models_dir, decode_layout)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        op, name, content_hash, requests, params = message
        reply: tuple[str, Any, list[dict[str, str]]]
        try:
            model = _load(registry, name, content_hash, device)
            reply = ("ok", model.generate(requests, params) if op == "generate" else None, Registry.loaded())
        except Exception as exc:  # reported to the caller, which fails the jobs with this reason
            reply = ("error", str(exc) or type(exc).__name__, Registry.loaded())
        try:
            conn.send(reply)
        except OSError:  # the gateway is gone
            return
