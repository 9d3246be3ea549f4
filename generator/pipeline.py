"""The worker's plain functions: generate -> decode -> screen output -> sign -> store -> audit.

The Celery task (`generator.tasks`) and the embedded in-process worker both call `run_jobs`; tests call it
directly. Everything a job needs is re-read from its row, so a redelivered job is a no-op once finished.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import metadata
from pathlib import Path
from typing import Any

from PIL import Image
from prometheus_client import Counter, Histogram
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from audit.db import make_engine, make_session_factory
from audit.log import NewEvent, append_event, append_many
from audit.models import AuditEvent, Job, JobTransition
from audit.provenance import ProvenanceSigner, ensure_dev_ca, load_signer
from generator.artifacts import ArtifactStore, open_store
from generator.governance import PolicyStore
from generator.registry import GenRequest, LoadedModel, Registry
from policies.runtime import Context

log = logging.getLogger(__name__)

GATEWAY_NAME = "llamagen-gateway"
ACTION_ORDER = {"allow": 0, "flag": 1, "review": 2, "block": 3}
TERMINAL = {"completed", "blocked", "failed"}


BATCH_SIZE = Histogram("worker_batch_size", "Jobs per sampling run", buckets=(1, 2, 4, 8, 16, 32, 64))
BUSY_SECONDS = Counter("worker_busy_seconds_total", "Seconds spent sampling and decoding (utilisation)")
OUTPUT_DECISIONS = Counter("worker_output_decisions_total", "Output screening decisions", ["action", "model"])


class PipelineError(Exception):
    """A job could not be run; the message says which stage failed."""


@dataclass
class PipelineContext:
    """Everything a worker process holds once: database, registry, policies, signer, artifact store."""

    sessions: sessionmaker[Session]
    registry: Registry
    policies: PolicyStore
    signer: ProvenanceSigner
    artifacts: ArtifactStore
    device: str
    batch_size: int = 8
    lease_s: float = 600.0  # a running job untouched this long is presumed abandoned by a dead worker


def _version() -> str:
    """The installed distribution's version (the one pyproject.toml declares)."""
    try:
        return metadata.version(GATEWAY_NAME)
    except metadata.PackageNotFoundError:
        return "0+unknown"


def resolve_device(requested: str) -> str:
    import torch

    if requested != "auto":
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_context(settings: Any) -> PipelineContext:
    """Build the worker context from `gateway.settings.Settings` (passed in; generator never reads env)."""
    if settings.uses_dev_ca:
        ensure_dev_ca(Path(settings.signing_cert).parent)
    engine = make_engine(settings.database_url)
    sessions = make_session_factory(engine)
    device = resolve_device(settings.device)
    return PipelineContext(
        sessions=sessions,
        registry=Registry(settings.models_dir),
        policies=PolicyStore(sessions, settings.models_dir, device),
        signer=load_signer(settings.signing_cert, settings.signing_key, alg=settings.signing_alg),
        artifacts=open_store(settings.artifact_url, settings.s3_endpoint_url),
        device=device,
        batch_size=settings.worker_batch_size,
        lease_s=float(settings.job_time_limit_s),
    )


def strictest(decisions: Iterable[dict[str, Any]]) -> str:
    """The strictest action among decision dicts (allow < flag < review < block)."""
    return max((d["action"] for d in decisions), key=ACTION_ORDER.__getitem__, default="allow")


def transition(session: Session, job: Job, to_status: str, reason: str) -> None:
    session.add(JobTransition(job_id=job.id, at=datetime.now(UTC), from_status=job.status,
                              to_status=to_status, reason=reason))
    job.status = to_status
    job.updated_at = datetime.now(UTC)


def pixel_sha256(image: Image.Image) -> str:
    """Digest of the decoded RGB pixels: what `audit reproduce` compares, independent of PNG encoding."""
    rgb = image.convert("RGB")
    header = f"{rgb.width}x{rgb.height}:RGB:".encode()
    return hashlib.sha256(header + rgb.tobytes()).hexdigest()


def encode_png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def gen_request(job: Job) -> GenRequest:
    params = job.params
    return GenRequest(prompt=job.prompt, class_id=job.class_id, seed=int(params["seed"]),
                      num_images=int(params["num_images"]))


def sampling_key(job: Job) -> tuple[Any, ...]:
    """Jobs with equal keys can share one sampling run (same model and sampling parameters)."""
    p = job.params
    return (job.model, p["cfg_scale"], p["temperature"], p["top_k"], p["top_p"])


def run_jobs(ctx: PipelineContext, job_ids: Sequence[str]) -> list[str]:
    """Run queued jobs, batching compatible ones into one sampling run; returns the ids actually run."""
    claimed: list[str] = []
    now = datetime.now(UTC)
    with ctx.sessions() as session, session.begin():
        for job_id in job_ids:
            job = session.get(Job, job_id, with_for_update=True)
            if job is None:
                log.warning("job %s does not exist; nothing to do", job_id)
                continue
            if job.status == "running" and now - job.updated_at < timedelta(seconds=ctx.lease_s):
                log.info("job %s is being run by another worker; nothing to do", job_id)
                continue
            if job.status not in ("queued", "running"):
                log.info("job %s is %s; nothing to do", job_id, job.status)
                continue
            job.attempts = (job.attempts or 0) + 1
            reason = "picked up by worker" if job.status == "queued" else "lease expired: taken over"
            transition(session, job, "running", reason)
            claimed.append(job_id)
    groups: dict[tuple[Any, ...], list[str]] = {}
    with ctx.sessions() as session:
        for job_id in claimed:
            job = session.get(Job, job_id)
            assert job is not None
            groups.setdefault(sampling_key(job), []).append(job_id)
    for ids in groups.values():
        for start in range(0, len(ids), ctx.batch_size):
            _run_group(ctx, ids[start:start + ctx.batch_size])
    return claimed


def run_with_companions(ctx: PipelineContext, job_id: str, wait_s: float) -> list[str]:
    """Dynamic batching for queue workers: run `job_id` together with compatible queued jobs.

    Waits up to `wait_s` for jobs of the same model and sampling parameters to fill `ctx.batch_size`. Their
    own queue messages arrive later and find them finished (or leased), so they are no-ops.
    """
    with ctx.sessions() as session:
        job = session.get(Job, job_id)
        if job is None or job.status != "queued":
            return run_jobs(ctx, [job_id])
        key = sampling_key(job)
        model = job.model
    ids = [job_id]
    deadline = time.monotonic() + wait_s
    while len(ids) < ctx.batch_size:
        with ctx.sessions() as session:
            candidates = session.scalars(select(Job).where(Job.status == "queued", Job.model == model,
                                                           Job.id.not_in(ids))
                                         .order_by(Job.created_at).limit(4 * ctx.batch_size)).all()
            ids += [c.id for c in candidates if sampling_key(c) == key][: ctx.batch_size - len(ids)]
        if len(ids) >= ctx.batch_size or time.monotonic() >= deadline:
            break
        time.sleep(min(0.01, max(deadline - time.monotonic(), 0.0)))
    return run_jobs(ctx, ids)


def _fail(ctx: PipelineContext, job_ids: Sequence[str], message: str) -> None:
    with ctx.sessions() as session, session.begin():
        for job_id in job_ids:
            job = session.get(Job, job_id)
            if job is None or job.status in TERMINAL:
                continue
            job.error = message
            transition(session, job, "failed", message)
            append_event(session, action="generation.failed", key_id=job.key_id, team=job.team,
                         job_id=job.id, payload={"error": message})


def _run_group(ctx: PipelineContext, job_ids: Sequence[str]) -> None:
    with ctx.sessions() as session:
        jobs = [job for job in (session.get(Job, j) for j in job_ids) if job is not None]
        session.expunge_all()
    if not jobs:
        return
    first = jobs[0]
    try:
        model = ctx.registry.load(first.model, ctx.device)
        if model.card.content_hash != first.model_card_hash:
            raise PipelineError(f"model card of {first.model} changed since the job was accepted "
                                f"({first.model_card_hash} -> {model.card.content_hash})")
        params = model.sampling_params(first.params)
        started = datetime.now(UTC)
        t0 = time.perf_counter()
        outputs = model.generate([gen_request(j) for j in jobs], params)
        sampling_s = time.perf_counter() - t0
        BATCH_SIZE.observe(len(jobs))
        BUSY_SECONDS.inc(sampling_s)
    except Exception as exc:  # any model fault fails the jobs, with the reason recorded and audited
        log.exception("generation failed for jobs %s", list(job_ids))
        _fail(ctx, job_ids, f"generation failed: {exc}")
        return
    for job, output in zip(jobs, outputs, strict=True):
        try:
            _release(ctx, job, model, output, sampling_s, started)
        except Exception as exc:
            log.exception("release failed for job %s", job.id)
            _fail(ctx, [job.id], f"release failed: {exc}")


def _release(ctx: PipelineContext, job: Job, model: LoadedModel, output: Any, sampling_s: float,
             started: datetime) -> None:
    """Screen, sign, store and audit one job's images in one transaction; nothing leaves unsigned or unaudited."""
    queued_s = (started - job.created_at).total_seconds()
    runtime = ctx.policies.runtime(job.policy_revision)
    card = model.card
    context = Context(team=job.team, model=job.model, lineage=card.lineage_dicts(), use=None)
    t0 = time.perf_counter()
    screenings = runtime.screen_images(output.images, context)
    screen_s = time.perf_counter() - t0
    # A reviewer who approved this job after output screening releases what screening sent to review.
    approved = bool(job.review and job.review.get("decision") == "approve" and job.review.get("stage") == "output")
    released: list[dict[str, Any]] = []
    stored: list[tuple[str, bytes]] = []
    sign_s = 0.0
    for index, (image, screening) in enumerate(zip(output.images, screenings, strict=True)):
        decision = screening.decision.to_dict()
        if decision["action"] == "block" or (decision["action"] == "review" and not approved):
            continue
        event_id = str(uuid.uuid4())
        t1 = time.perf_counter()
        signed = ctx.signer.sign_png(
            encode_png(image),
            title=f"{job.id}-{index}.png",
            software_agent=f"{GATEWAY_NAME}/{_version()} ({card.name} {card.version})",
            assertions={
                "com.llamagen-gateway.lineage": {"model": card.name, "version": card.version,
                                                  "model_card_hash": card.content_hash,
                                                  "checkpoints": card.checkpoint_digests(),
                                                  "lineage": card.lineage_dicts()},
                "com.llamagen-gateway.policy-decision": {"revision": job.policy_revision,
                                                         "prompt": job.decisions.get("prompt"),
                                                         "output": decision},
                "com.llamagen-gateway.audit": {"event_id": event_id, "job_id": job.id},
            },
        )
        sign_s += time.perf_counter() - t1
        key = f"{job.id}/{index}.png"
        stored.append((key, signed.data))
        released.append({"index": index, "sha256": hashlib.sha256(signed.data).hexdigest(),
                         "pixel_sha256": pixel_sha256(image), "uri": key, "manifest_id": signed.manifest_id,
                         "event_id": event_id, "width": image.width, "height": image.height,
                         "output_decision": decision})
    for key, data in stored:  # written before the commit; keys are deterministic, so a retry overwrites
        ctx.artifacts.put(key, data)
    output_decisions = [s.to_dict() for s in screenings]
    worst = strictest(s["decision"] for s in output_decisions) if output_decisions else "allow"
    OUTPUT_DECISIONS.labels(worst, job.model).inc()
    t_audit = time.perf_counter()
    with ctx.sessions() as session, session.begin():
        row = session.get(Job, job.id, with_for_update=True)
        if row is None or row.status != "running":
            return  # another delivery finished it first: idempotent
        events = [NewEvent(action="output.screened", key_id=row.key_id, team=row.team, job_id=row.id,
                           payload={"policy_revision": row.policy_revision, "screenings": output_decisions,
                                    "action": worst, "context": context.to_dict()})]
        events += [NewEvent(event_id=item["event_id"], action="image.released", key_id=row.key_id,
                            team=row.team, job_id=row.id,
                            payload={"index": item["index"], "sha256": item["sha256"],
                                     "pixel_sha256": item["pixel_sha256"], "manifest_id": item["manifest_id"],
                                     "model": card.name, "model_card_hash": card.content_hash,
                                     "checkpoints": card.checkpoint_digests(), "seed": row.params["seed"],
                                     "params": row.params, "policy_revision": row.policy_revision})
                   for item in released]
        decisions = dict(row.decisions)
        decisions["output"] = {"action": worst, "images": output_decisions}
        row.decisions = decisions
        row.images = [{k: v for k, v in item.items() if k != "output_decision"} for item in released]
        row.timings = {**(row.timings or {}), "queue_s": round(queued_s, 4), "sampling_s": round(sampling_s, 4),
                       "output_screening_s": round(screen_s, 4), "signing_s": round(sign_s, 4)}
        row.cost = {"tokens": output.tokens, "device_seconds": round(output.device_seconds, 4),
                    "device": ctx.device}
        if worst == "review" and not released:
            transition(session, row, "review", "output screening asks for human review")
        elif not released:
            row.error = "every image was withheld by the output policy"
            transition(session, row, "blocked", row.error)
        else:
            transition(session, row, "completed", f"{len(released)} image(s) released")
        if row.status in TERMINAL and decisions.get("prompt", {}).get("storage", "full") != "full":
            row.prompt = None  # the policy keeps no prompt text beyond what the job needed
        events.append(NewEvent(action=f"generation.{row.status}", key_id=row.key_id, team=row.team,
                               job_id=row.id, payload={"images": len(released), "timings": row.timings,
                                                       "cost": row.cost}))
        append_many(session, events)  # one INSERT: screening, each released image, the outcome
        # The audit stage's own time (events + job row), recorded on the job after the chain entry.
        row.timings = {**row.timings, "audit_s": round(time.perf_counter() - t_audit, 4)}


def reproduce_event(session: Session, event_id: str, settings: Any) -> dict[str, Any]:
    """Regenerate the image an `image.released` event records and compare pixel digests."""
    event = session.scalar(select(AuditEvent).where(AuditEvent.id == event_id))
    if event is None or event.action != "image.released":
        raise PipelineError(f"{event_id} is not an image.released audit event")
    payload = event.payload
    registry = Registry(settings.models_dir)
    model = registry.load(payload["model"], resolve_device(settings.device))
    if model.card.content_hash != payload["model_card_hash"]:
        raise PipelineError(f"model card {payload['model']} differs from the recorded one "
                            f"({payload['model_card_hash']})")
    job = session.get(Job, event.job_id)
    if job is None:
        raise PipelineError(f"job {event.job_id} of event {event_id} is gone")
    if job.prompt is None and job.task == "t2i":
        raise PipelineError("the prompt text of this job was erased; the image cannot be regenerated")
    params = model.sampling_params(payload["params"])
    output = model.generate([gen_request(job)], params)[0]
    image = output.images[int(payload["index"])]
    digest = pixel_sha256(image)
    return {"event_id": event_id, "recorded_pixel_sha256": payload["pixel_sha256"],
            "regenerated_pixel_sha256": digest, "match": digest == payload["pixel_sha256"],
            "device": model.device}
