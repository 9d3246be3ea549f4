"""Builds and tears down what the gateway holds: pipeline context, policy, dispatcher, checkpoint timer."""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime, timedelta

from audit.checkpoints import CheckpointTimer
from audit.db import upgrade_database
from gateway.dispatch import CeleryDispatcher, Dispatcher, LocalWorker
from gateway.limits import Limits, MemoryCounter, RedisCounter
from gateway.services import GatewayState, requeue_stale_jobs
from gateway.settings import Settings, with_dev_session_secret
from gateway.waiting import JobWaiters
from generator.intake import Intake
from generator.pipeline import build_context

log = logging.getLogger(__name__)


def build_state(settings: Settings, *, dispatcher: Dispatcher | None = None) -> GatewayState:
    """Open the database, load the registry and signer, activate the first policy, start the worker."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    settings = with_dev_session_secret(settings)
    if settings.embedded and settings.database_url.startswith("sqlite"):
        upgrade_database(settings.database_url)  # embedded: the gateway owns its file; PostgreSQL uses `migrate`
    ctx = build_context(settings)
    ctx.policies.bootstrap(settings.policy_file)
    # The in-process worker wakes long-polling requests; Celery workers cannot, so waiters re-read often.
    waiters = JobWaiters(recheck_s=5.0 if settings.embedded and dispatcher is None else 0.5)
    intake = Intake()
    if dispatcher is None:
        if settings.embedded:
            dispatcher = LocalWorker(ctx, batch_size=settings.worker_batch_size,
                                     batch_wait_s=settings.worker_batch_wait_ms / 1000, on_finished=waiters.notify,
                                     pending=intake.pending)
        else:
            assert settings.broker_url is not None
            dispatcher = CeleryDispatcher(settings)
    counter = MemoryCounter() if settings.embedded else RedisCounter(settings.broker_url or "")
    limits = Limits(counter, per_key_per_minute=settings.rate_limit_per_minute,
                    team_images_per_day=settings.team_quota_per_day,
                    per_team_per_minute=settings.team_rate_limit_per_minute,
                    key_images_per_day=settings.key_quota_per_day)
    state = GatewayState(settings=settings, ctx=ctx, dispatcher=dispatcher, limits=limits, waiters=waiters,
                         intake=intake)
    assert settings.signing_key is not None and settings.signing_cert is not None
    state.checkpoints = CheckpointTimer(ctx.sessions, settings.signing_key.read_bytes(),
                                        settings.signing_cert.read_bytes(),
                                        interval_s=settings.checkpoint_interval_s)
    state.checkpoints.start()
    state.sweeper = Sweeper(state, interval_s=min(settings.requeue_after_s, 30.0))
    state.sweeper.start()
    log.info("gateway ready", extra={"mode": "embedded" if settings.embedded else "distributed",
                                     "database": settings.database_url.split("@")[-1]})
    return state


def warm_up(state: GatewayState) -> None:
    """Load the prompt classifiers (and, for the in-process worker, the default model and the image
    classifier) before the first request needs them; the model loads in the sampler meanwhile."""
    from PIL import Image

    from policies.runtime import Context

    sampler = None
    if state.settings.embedded:
        sampler = threading.Thread(target=_warm_up_sampler, args=(state,), name="warm-up-sampler", daemon=True)
        sampler.start()
    try:
        runtime = state.ctx.policies.runtime()
        context = Context(team="warm-up", model=state.settings.default_model)
        runtime.screen_prompt("a red star on a white background", context)
        if state.settings.embedded:
            runtime.screen_images([Image.new("RGB", (64, 64), "white")], context)
    except Exception:  # the first request loads what is missing, and reports any real fault itself
        log.warning("warm-up did not complete", exc_info=True)
    if sampler is not None:
        sampler.join()


def _warm_up_sampler(state: GatewayState) -> None:
    try:
        state.ctx.sampler.load(state.ctx.registry.get(state.settings.default_model))
    except Exception:  # as above: the first run loads it and fails its jobs with the reason if it cannot
        log.warning("the default model did not load ahead of the first request", exc_info=True)


class Sweeper:
    """Re-sends stale jobs at start-up and then periodically (see `services.requeue_stale_jobs`)."""

    def __init__(self, state: GatewayState, interval_s: float) -> None:
        self._state = state
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="job-sweeper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        first = True
        while first or not self._stop.wait(self._interval_s):
            try:
                # At start-up every queued job is re-sent: an embedded gateway that stopped mid-queue resumes.
                now = datetime.now(UTC) + timedelta(seconds=self._state.settings.requeue_after_s) if first else None
                requeued = requeue_stale_jobs(state=self._state, now=now)
                if requeued:
                    log.warning("re-sent %d stale job(s) to the workers", len(requeued))
            except Exception:  # the database may be briefly down; try again next period
                log.exception("re-sending stale jobs failed")
            first = False


def close_state(state: GatewayState) -> None:
    """Stop the worker, write a final signed checkpoint of the audit chain."""
    if state.sweeper is not None:
        state.sweeper.stop()
    state.dispatcher.close()
    state.ctx.sampler.close()
    if state.checkpoints is not None:
        state.checkpoints.stop()
