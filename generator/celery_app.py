"""The one Celery app, built from settings; GPU work goes to the `gpu` queue."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from typing import Any

from celery import Celery
from celery.signals import setup_logging, worker_init, worker_process_init, worker_process_shutdown
from celery.utils.log import get_multiprocessing_logger

from gateway.settings import Settings, get_settings
from generator.logs import configure_logging

log = logging.getLogger(__name__)
GPU_QUEUE = "gpu"
RUN_GENERATION = "generator.run_generation"


def make_celery(settings: Settings | None = None) -> Celery:
    """The app for `settings` (the environment's when None: the worker's `celery -A` entry point)."""
    settings = settings or get_settings()
    app = Celery("llamagen_gateway", broker=settings.broker_url or "memory://",
                 backend=settings.result_backend_url or None, include=["generator.tasks"])
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_default_queue=GPU_QUEUE,
        task_routes={RUN_GENERATION: {"queue": GPU_QUEUE}},
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_time_limit=settings.job_time_limit_s,
        task_soft_time_limit=settings.job_time_limit_s - min(30, settings.job_time_limit_s // 5),
        broker_connection_retry_on_startup=True,
        # An unacknowledged job (its worker died) is redelivered after this; the job lease stops a
        # redelivery from running a job that a live worker still holds.
        broker_transport_options={"visibility_timeout": settings.broker_visibility_timeout_s
                                  or settings.job_time_limit_s * 2},
        task_ignore_result=True,
        worker_hijack_root_logger=False,  # the worker logs like the gateway (`_setup_logging` below)
        # A new pool process reports for work only once `_init_worker_process` has loaded the default model;
        # Celery's default 4 s would kill (and fork again, and kill) any process loading a real checkpoint.
        worker_proc_alive_timeout=settings.worker_start_timeout_s,
    )
    return app


_app: Celery | None = None


def __getattr__(name: str) -> Any:
    """`app`: the worker's app (the `celery -A` entry point and the task decorators), built from the
    environment's settings on first use. Importing this module reads no settings: the gateway's dispatcher
    builds its own app from the settings it is given."""
    global _app
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _app is None:
        _app = make_celery()
    return _app


@setup_logging.connect
def _setup_logging(loglevel: int | None = None, **_: Any) -> None:
    """Celery configures no logging of its own when this signal has a receiver: keep the project's JSON lines."""
    configure_logging(get_settings().log_json, loglevel or logging.INFO)
    # The pool's own errors (a process killed at the time limit) go through billiard's logger, which does not
    # propagate by default; like Celery, pass on its errors only.
    pool_log = get_multiprocessing_logger()
    pool_log.propagate = True
    pool_log.setLevel(logging.ERROR)


_context: Any = None


def worker_context() -> Any:
    """The per-process pipeline context (database, registry, policies, signer); built on first use."""
    global _context
    if _context is None:
        from generator.pipeline import build_context

        _context = build_context(get_settings())
    return _context


_initialised_pid: int | None = None


@worker_init.connect
def _init_single_process_worker(sender: Any = None, **_: Any) -> None:
    """Solo and thread pools run tasks in this process: prepare it here (prefork children do it below)."""
    pool = str(getattr(sender, "pool_cls", "")).lower()
    if "solo" in pool or "thread" in pool:
        _init_worker_process()


@worker_process_init.connect
def _init_worker_process(**_: Any) -> None:
    """Prepare the process that runs tasks, once: Celery 5.7's solo pool sends worker_process_init after
    worker_init, and a second start would add a heartbeat thread and bind the metrics port twice."""
    global _initialised_pid
    if _initialised_pid == os.getpid():
        return
    _initialised_pid = os.getpid()  # a forked prefork child has its own pid and prepares itself
    from generator.llamagen import configure_runtime
    from generator.pipeline import freeze_heap

    configure_runtime()
    ctx = worker_context()
    settings = get_settings()
    if settings.worker_metrics_port:
        from prometheus_client import start_http_server

        start_http_server(settings.worker_metrics_port)
    try:
        ctx.registry.load(settings.default_model, ctx.device)
    except Exception:  # a worker can still serve other models; the failure is logged with its reason
        log.exception("could not preload the default model %s", settings.default_model)
    freeze_heap()
    if settings.broker_url and settings.broker_url.startswith("redis"):
        threading.Thread(target=_heartbeat, args=(settings.broker_url,), name="worker-heartbeat",
                         daemon=True).start()


WORKERS_KEY = "llamagen-gateway:workers:"
HEARTBEAT_S = 10


def _heartbeat(broker_url: str) -> None:
    """Announce this worker process and the models it holds, so `/readyz` can report what is served."""
    import redis

    from generator.registry import Registry

    client = redis.Redis.from_url(broker_url, socket_timeout=2, socket_connect_timeout=2)
    name = f"{WORKERS_KEY}{socket.gethostname()}:{os.getpid()}"
    started = time.time()
    while True:
        info = {"host": socket.gethostname(), "pid": os.getpid(), "models": Registry.loaded(),
                "started_at": started, "beat_at": time.time()}
        try:
            client.set(name, json.dumps(info), ex=3 * HEARTBEAT_S)
        except redis.RedisError:
            log.warning("worker heartbeat could not reach the broker; retrying")
        time.sleep(HEARTBEAT_S)


def registered_workers(broker_url: str) -> list[dict[str, Any]]:
    """Worker processes that announced themselves in the last few heartbeats."""
    import redis

    client = redis.Redis.from_url(broker_url, socket_timeout=2, socket_connect_timeout=2)
    values = [client.get(key) for key in client.scan_iter(f"{WORKERS_KEY}*", count=100)]
    return [json.loads(v) for v in values if v]


@worker_process_shutdown.connect
def _shutdown_worker_process(**_: Any) -> None:
    global _context
    _context = None
