"""The worker's Celery app: per-process start-up."""

from __future__ import annotations

from types import SimpleNamespace

from celery.concurrency.solo import TaskPool as SoloPool
from celery.signals import worker_init

from generator import celery_app
from tests.conftest import make_settings


class SoloWorker:
    pool_cls = SoloPool


def test_a_solo_worker_prepares_its_process_once(tmp_path, monkeypatch) -> None:
    loads: list[str] = []
    servers: list[int] = []
    settings = make_settings(tmp_path / "var", worker_metrics_port=9109)
    context = SimpleNamespace(registry=SimpleNamespace(load=lambda name, device: loads.append(name)), device="cpu")
    monkeypatch.setattr(celery_app, "_initialised_pid", None)
    monkeypatch.setattr(celery_app, "get_settings", lambda: settings)
    monkeypatch.setattr(celery_app, "worker_context", lambda: context)
    monkeypatch.setattr("generator.llamagen.configure_runtime", lambda: None)
    monkeypatch.setattr("generator.pipeline.freeze_heap", lambda: 0)
    monkeypatch.setattr("prometheus_client.start_http_server", lambda port, *a, **k: servers.append(port))

    # What a solo worker does: worker_init from the worker, then worker_process_init from the pool (Celery 5.7).
    worker_init.send(sender=SoloWorker())
    SoloPool()

    assert loads == [settings.default_model]
    assert servers == [9109]
