"""The worker's plain functions: generate -> decode -> screen output -> sign -> store -> audit.

The Celery task (`generator.tasks`) and the embedded in-process worker both call `run_jobs`; tests call it
directly. Everything a job needs is re-read from its row, so a redelivered job is a no-op once finished.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import io
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from celery.exceptions import SoftTimeLimitExceeded
from PIL import Image
from prometheus_client import Counter, Histogram
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from audit.db import make_engine, make_session_factory
from audit.group_commit import GroupCommitter
from audit.log import NewEvent, append_many
from audit.models import AuditEvent, Job, JobTransition
from audit.provenance import ProvenanceSigner, ensure_dev_ca, load_signer
from generator.artifacts import ArtifactStore, open_store
from generator.governance import PolicyStore
from generator.llamagen import gemv
from generator.llamagen.layout import DecodeLayout, apply_layout
from generator.logs import log_context
from generator.registry import GenOutput, GenRequest, LoadedModel, ModelCard, Registry, sampling_params
from generator.sampler import LocalSampler, Sampler, SamplerProcess, torch_threads
from policies.runtime import Context, Screening

log = logging.getLogger(__name__)

GATEWAY_NAME = "llamagen-gateway"
ACTION_ORDER = {"allow": 0, "flag": 1, "review": 2, "block": 3}
TERMINAL = {"completed", "blocked", "failed"}


BATCH_SIZE = Histogram("worker_batch_size", "Jobs per sampling run", buckets=(1, 2, 4, 8, 16, 32, 64))
BUSY_SECONDS = Counter("worker_busy_seconds_total", "Seconds spent sampling and decoding (utilisation)")
OUTPUT_DECISIONS = Counter("worker_output_decisions_total", "Output screening decisions", ["action", "model"])
# Each released job's stages as recorded on its row, except audit: here until its commit was durable (a row cannot
# hold its own commit's time). Prompt screening and the request's audit are the gateway's `gateway_stage_seconds`.
STAGE_SECONDS = Histogram("worker_stage_seconds", "Stage latency of each released job", ["stage"])
WORKER_STAGES = ("queue", "sampling", "decode", "output_screening", "signing", "store")


class PipelineError(Exception):
    """A job could not be run; the message says which stage failed."""


@dataclass
class PipelineContext:
    """Everything a worker process holds once: database, registry, policies, signer, artifact store."""

    sessions: sessionmaker[Session]
    registry: Registry
    sampler: Sampler  # where sampling runs: this process, or the embedded gateway's sampler process
    policies: PolicyStore
    signer: ProvenanceSigner
    artifacts: ArtifactStore
    device: str
    batch_size: int = 8
    lease_s: float = 600.0  # a running job untouched this long is presumed abandoned by a dead worker
    max_attempts: int = 5  # claims of one job; past this it fails instead of being run again
    # Audited writes of this process (requests and the worker) share transactions: concurrent writers queue
    # in the process instead of each taking the database write lock in turn.
    commits: GroupCommitter = field(init=False)

    def __post_init__(self) -> None:
        self.commits = GroupCommitter(self.sessions)


@functools.cache
def _version() -> str:
    """The installed distribution's version (the one pyproject.toml declares); read once per process."""
    try:
        return metadata.version(GATEWAY_NAME)
    except metadata.PackageNotFoundError:
        return "0+unknown"


def resolve_device(requested: str) -> str:
    import torch

    if requested != "auto":
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def freeze_heap() -> int:
    """Take everything loaded so far (models, classifiers, libraries) out of the garbage collector's scans.

    A serving process holds ~600k long-lived objects after warm-up; every full collection walked them all,
    ~400 ms with the GIL held, which stalled whichever request was in flight at random. Objects made later
    are collected as usual. Returns how many objects were frozen.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def build_context(settings: Any) -> PipelineContext:
    """Build the worker context from `gateway.settings.Settings` (passed in; generator never reads env)."""
    if settings.uses_dev_ca:
        ensure_dev_ca(Path(settings.signing_cert).parent)
    engine = make_engine(settings.database_url)
    sessions = make_session_factory(engine)
    device = resolve_device(settings.device)
    registry = Registry(settings.models_dir, settings.decode_layout)
    sampler: Sampler = (
        SamplerProcess(settings.models_dir, device, torch_threads(settings.torch_threads), settings.decode_layout)
        if settings.embedded and settings.sampler_process
        else LocalSampler(registry, device)
    )
    return PipelineContext(
        sessions=sessions,
        registry=registry,
        sampler=sampler,
        policies=PolicyStore(sessions, settings.models_dir, device),
        signer=load_signer(settings.signing_cert, settings.signing_key, alg=settings.signing_alg),
        artifacts=open_store(settings.artifact_url, settings.s3_endpoint_url),
        device=device,
        batch_size=settings.worker_batch_size,
        lease_s=float(settings.job_time_limit_s),
        max_attempts=settings.job_max_attempts,
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


class RunInterrupted(Exception):
    """A fault stopped `run_jobs` after it leased `job_ids`: a retry passes them back as `reclaim`."""

    def __init__(self, job_ids: list[str], cause: Exception) -> None:
        super().__init__(f"interrupted after leasing jobs {job_ids}: {cause}")
        self.job_ids = job_ids


def run_jobs(ctx: PipelineContext, job_ids: Sequence[str], reclaim: Iterable[str] = ()) -> list[str]:
    """Run queued jobs, batching compatible ones into one sampling run; returns the ids actually run.

    A fault after the claim (the database lost mid-run) raises `RunInterrupted` naming the leased jobs, so
    that the task's retry can take them back at once (`reclaim`) instead of waiting for their lease.
    """
    claimed, runs = sample_jobs(ctx, job_ids, reclaim)
    try:
        for run in runs:
            release_run(ctx, run)
    except Exception as exc:
        raise RunInterrupted(claimed, exc) from exc
    return claimed


def sample_jobs(ctx: PipelineContext, job_ids: Sequence[str],
                reclaim: Iterable[str] = ()) -> tuple[list[str], Iterator[SampledRun]]:
    """Claim queued jobs -> (the ids claimed, their sampling runs, sampled one at a time as iterated).

    Every run must then go through `release_run` (`run_jobs` does both). The embedded worker calls
    `claim_jobs`, `sample_run` and `release_run` from three threads, so that the three overlap.
    """
    claimed, groups = claim_jobs(ctx, job_ids, reclaim)
    runs = (run for ids in groups if (run := sample_run(ctx, ids)) is not None)
    return claimed, runs


def claim_jobs(ctx: PipelineContext, job_ids: Sequence[str],
               reclaim: Iterable[str] = ()) -> tuple[list[str], list[list[str]]]:
    """Lease the runnable jobs (one transaction) -> their ids, and sampling groups of at most `batch_size`
    (each is then sampled with `sample_run`).

    A running job is left to its worker until its lease expires, except the jobs in `reclaim`: this task's
    own leases, taken back by its retry after a fault. A job claimed `ctx.max_attempts` times already
    fails instead: each attempt ended without a result (its worker died, ran out of time, or a fault stopped
    it), and another would most likely end the same way.
    """
    ids, retaken = list(dict.fromkeys(job_ids)), set(reclaim)
    worker = f"{socket.gethostname()}:{os.getpid()}"  # recorded with each lease: which process ran the job
    claimed: list[str] = []
    exhausted: list[str] = []
    groups: dict[tuple[Any, ...], list[str]] = {}
    now = datetime.now(UTC)
    with ctx.sessions() as session, session.begin():
        connection = session.connection()
        if connection.dialect.name == "sqlite" and ids:
            # No row locks on SQLite (FOR UPDATE is ignored): a no-op UPDATE of the rows takes the database
            # write lock before they are read, so two workers cannot both see a job queued and lease it.
            connection.execute(update(Job).where(Job.id.in_(ids)).values(status=Job.status))
        # Every row locked by one statement, in id order: two workers claiming overlapping jobs (each its own
        # job first, then companions) take the locks in the same order, so neither waits for the other in turn.
        rows = {job.id: job for job in session.scalars(
            select(Job).where(Job.id.in_(ids)).order_by(Job.id).with_for_update())}
        for job_id in ids:
            job = rows.get(job_id)
            if job is None:
                log.warning("job %s does not exist; nothing to do", job_id)
                continue
            leased = now - job.updated_at < timedelta(seconds=ctx.lease_s)
            if job.status == "running" and leased and job_id not in retaken:
                log.info("job %s is being run by another worker; nothing to do", job_id)
                continue
            if job.status not in ("queued", "running"):
                log.info("job %s is %s; nothing to do", job_id, job.status)
                continue
            if (job.attempts or 0) >= ctx.max_attempts:
                job.updated_at = now  # another delivery of a running one leaves it alone while it is failed below
                exhausted.append(job_id)
                continue
            job.attempts = (job.attempts or 0) + 1
            how = ("picked up" if job.status == "queued"
                   else "taken back after a fault" if job_id in retaken else "lease expired: taken over")
            transition(session, job, "running", f"{how} by worker {worker}")
            claimed.append(job_id)
            groups.setdefault(("held", job_id) if resumes_held(job) else sampling_key(job), []).append(job_id)
    if exhausted:
        try:  # the claimed jobs are leased whatever happens here: their runs must not be lost to this fault
            fail_jobs(ctx, exhausted, f"gave up after {ctx.max_attempts} attempts: none ended with a result (the "
                      "worker died, ran out of time or memory, or a fault interrupted it)")
        except Exception:
            log.exception("could not fail jobs %s, which used up their attempts; the sweeper re-sends them", exhausted)
    runs = [group[start:start + ctx.batch_size] for group in groups.values()
            for start in range(0, len(group), ctx.batch_size)]
    return claimed, runs


def approved_at_output(job: Job) -> bool:
    """A reviewer approved this job after output screening sent (some of) its images to review."""
    review = job.review or {}
    return review.get("decision") == "approve" and review.get("stage") == "output"


def resumes_held(job: Job) -> bool:
    """A reviewer approved the images this job held at output screening: it releases them, sampling nothing.
    (A job parked before images were held has none: it samples again.)"""
    return approved_at_output(job) and bool(job.images)


def run_with_companions(ctx: PipelineContext, job_id: str, wait_s: float, reclaim: Sequence[str] = ()) -> list[str]:
    """Dynamic batching for queue workers: run `job_id` together with compatible queued jobs.

    Waits up to `wait_s` for jobs of the same model and sampling parameters to fill `ctx.batch_size`. Their
    own queue messages arrive later and find them finished (or leased), so they are no-ops. `reclaim`: the
    jobs an interrupted earlier try of this task leased (`RunInterrupted`), run again now. What is logged
    meanwhile carries the job's id and its request's id.
    """
    with ctx.sessions() as session:
        job = session.get(Job, job_id)
        request_id = job.request_id if job is not None else ""
        queued = job is not None and job.status == "queued" and not reclaim
        key, model = (sampling_key(job), job.model) if job is not None else (None, None)
    with log_context(job_id=job_id, request_id=request_id):
        if not queued:
            return run_jobs(ctx, [job_id, *reclaim], reclaim)
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


def fail_jobs(ctx: PipelineContext, job_ids: Sequence[str], message: str) -> None:
    """Fail the jobs that are not finished, with `message` as their error, audited (one transaction)."""
    retried: list[tuple[str, set[str]]] = []  # jobs claimed more than once, and the images their rows record

    def work(session: Session) -> None:
        events = []
        retried.clear()
        for job_id in sorted(job_ids):  # rows in id order, as a claim locks them
            job = session.get(Job, job_id)
            if job is None or job.status not in ("queued", "running"):  # finished, or parked for a reviewer
                continue
            job.error = message
            transition(session, job, "failed", message)
            events.append(NewEvent(action="generation.failed", key_id=job.key_id, team=job.team, job_id=job.id,
                                   payload={"error": message}))
            if (job.attempts or 0) > 1:
                retried.append((job_id, {str(image["uri"]) for image in job.images or ()}))
        append_many(session, events)

    ctx.commits.run(work)
    for job_id, recorded in retried:  # e.g. the images a job held for review stay: image.held names them
        _remove_leftovers(ctx, job_id, keep=recorded)


def _remove_leftovers(ctx: PipelineContext, job_id: str, keep: set[str]) -> None:
    """Delete what earlier attempts of a job stored but never audited: a worker killed between storing its
    signed images and committing their audit record leaves them behind. Only once this attempt's outcome is
    recorded (finished, or parked for review): no other delivery can record images for it then. Best effort:
    a leftover that cannot be deleted is logged."""
    try:
        for key in ctx.artifacts.keys(job_id):
            if key not in keep:
                log.info("removing artifact %s: stored by an earlier attempt of job %s, never audited", key, job_id)
                ctx.artifacts.delete(key)
    except Exception:
        log.exception("could not remove the unaudited artifacts of earlier attempts of job %s", job_id)


@dataclass
class _Release:
    """One job of a sampling run on its way out: its screenings, signed images, and the first fault if any."""

    job: Job
    output: Any
    context: Context | None = None
    screenings: list[Screening] = field(default_factory=list)
    released: list[dict[str, Any]] = field(default_factory=list)
    held: list[dict[str, Any]] = field(default_factory=list)  # signed, kept for a reviewer, not released
    indexes: list[int] | None = None  # of the output's images in the job (held images resumed: a subset)
    stored: list[tuple[str, bytes]] = field(default_factory=list)
    written: list[str] = field(default_factory=list)  # keys in the artifact store
    recorded: bool = False  # its audit record is committed
    error: str | None = None


@dataclass
class SampledRun:
    """The jobs of one sampling run and their images, not yet released: nothing of it has left the worker."""

    releases: list[_Release]
    card: ModelCard
    sampling_s: float  # conditioning and token sampling (in the sampler, as this process waited for it)
    decode_s: float  # codes to pixels
    started: datetime
    resumed: bool = False  # held images released after a review: nothing was sampled

    @property
    def job_ids(self) -> list[str]:
        return [release.job.id for release in self.releases]


def sample_run(ctx: PipelineContext, job_ids: Sequence[str]) -> SampledRun | None:
    """Generate the images of claimed jobs in one sampling run; None if there is nothing to release.

    A model fault fails the jobs, with the reason recorded and audited.
    """
    with ctx.sessions() as session:
        jobs = [job for job in (session.get(Job, j) for j in job_ids) if job is not None]
        session.expunge_all()
    if not jobs:
        return None
    if len(jobs) == 1 and resumes_held(jobs[0]):
        return _held_run(ctx, jobs[0])
    first = jobs[0]
    try:
        card = _accepted_card(ctx, first)
        params = sampling_params(card, first.params)
        started = datetime.now(UTC)
        t0 = time.perf_counter()
        outputs = ctx.sampler.generate(card, [gen_request(j) for j in jobs], params)
        run_s = time.perf_counter() - t0
        BATCH_SIZE.observe(len(jobs))
        BUSY_SECONDS.inc(run_s)
    except Exception as exc:  # any model fault fails the jobs, with the reason recorded and audited
        log.exception("generation failed for jobs %s", list(job_ids))
        fail_jobs(ctx, job_ids, f"generation failed: {job_error(exc)}")
        return None
    decode_s = outputs[0].decode_seconds
    return SampledRun([_Release(job, output) for job, output in zip(jobs, outputs, strict=True)], card,
                      run_s - decode_s, decode_s, started)


def _accepted_card(ctx: PipelineContext, job: Job) -> ModelCard:
    """The model card the job was accepted under: its manifests and audit record must name what made it."""
    card = ctx.registry.get(job.model)
    if card.content_hash != job.model_card_hash:
        raise PipelineError(f"model card of {job.model} changed since the job was accepted "
                            f"({job.model_card_hash} -> {card.content_hash})")
    return card


def _held_run(ctx: PipelineContext, job: Job) -> SampledRun | None:
    """The images an approved job held for review, read back from the store, each checked against the digests
    its audit record holds; a missing or changed one fails the job."""
    try:
        card = _accepted_card(ctx, job)
        images = []
        for item in job.images:
            data = ctx.artifacts.get(item["uri"])
            if hashlib.sha256(data).hexdigest() != item["sha256"]:
                raise PipelineError(f"held image {item['index']} in the store is not the one audited")
            image = Image.open(io.BytesIO(data)).convert("RGB")
            if pixel_sha256(image) != item["pixel_sha256"]:
                raise PipelineError(f"held image {item['index']} does not decode to the audited pixels")
            images.append(image)
    except Exception as exc:
        log.exception("could not read back the held images of job %s", job.id)
        fail_jobs(ctx, [job.id], f"release after review failed: {job_error(exc)}")
        return None
    first = job.images[0]
    output = GenOutput(images=images, tokens=0, device_seconds=0.0, torch_threads=int(first["torch_threads"]),
                       decode_seconds=0.0, decode_layout=str(first["decode_layout"]))
    release = _Release(job, output, indexes=[int(item["index"]) for item in job.images])
    return SampledRun([release], card, 0.0, 0.0, datetime.now(UTC), resumed=True)


def release_run(ctx: PipelineContext, run: SampledRun) -> None:
    """Release a sampling run; a fault that escapes the stages fails its jobs that are not finished.

    Only a failure to record even that (database down) is raised: the jobs stay leased until their lease
    expires and the sweeper re-sends them.
    """
    try:
        _release(ctx, run)
    except Exception as exc:
        log.exception("releasing jobs %s failed", run.job_ids)
        fail_jobs(ctx, run.job_ids, f"release failed: {job_error(exc)}")


@dataclass(frozen=True)
class _CardFacts:
    """What a run's manifests and audit events say about its model card, gathered once per run (the lineage
    dicts and digest map are built here, not per image; the card caches its own content hash)."""

    name: str
    version: str
    content_hash: str
    checkpoints: dict[str, str | None]
    lineage: list[dict[str, Any]]

    @classmethod
    def of(cls, card: Any) -> _CardFacts:
        return cls(card.name, card.version, card.content_hash, card.checkpoint_digests(), card.lineage_dicts())


def job_error(exc: BaseException) -> str:
    """A fault as a job's error says it: a queue worker's soft time limit interrupts whatever is running."""
    return "the job's time limit was reached" if isinstance(exc, SoftTimeLimitExceeded) else str(exc)


def _each(releases: Sequence[_Release], stage: str, fn: Callable[[_Release], None]) -> None:
    """Run one stage for each job still going; a fault stops only that job (it fails, with its reason)."""
    for release in releases:
        if release.error is not None:
            continue
        try:
            with log_context(job_id=release.job.id, request_id=release.job.request_id):
                fn(release)
        except Exception as exc:
            log.exception("%s failed for job %s", stage, release.job.id)
            release.error = f"release failed: {job_error(exc)}"


def _release(ctx: PipelineContext, run: SampledRun) -> None:
    """Screen, sign, store and audit the images of one sampling run; nothing leaves unsigned or unaudited.

    Each stage runs once for the whole run (one classifier batch for every image, one audit transaction for
    every job), and every job records the stage's full time: it waited for all of it before it was done.
    """
    releases, started = run.releases, run.started
    card = _CardFacts.of(run.card)
    t0 = time.perf_counter()
    by_revision: dict[str, list[_Release]] = {}
    for release in releases:
        release.context = Context(team=release.job.team, model=release.job.model, lineage=card.lineage, use=None)
        by_revision.setdefault(release.job.policy_revision, []).append(release)
    for revision, group in by_revision.items():
        try:
            _screen_outputs(ctx, revision, group)
        except Exception as exc:  # e.g. the revision's runtime cannot be built: its jobs fail, with the reason
            log.exception("output screening failed for jobs %s", [r.job.id for r in group])
            for release in group:
                release.error = f"release failed: {job_error(exc)}"
    screen_s = time.perf_counter() - t0
    _each(releases, "signing", lambda release: _sign(ctx, release, card))
    sign_s = time.perf_counter() - t0 - screen_s
    _each(releases, "storing", lambda release: _store(ctx, release))
    store_s = time.perf_counter() - t0 - screen_s - sign_s
    stages = {"output_screening_s": round(screen_s, 4), "signing_s": round(sign_s, 4), "store_s": round(store_s, 4)}
    if not run.resumed:  # a resumed job keeps the sampling figures of the run that made its images
        stages = {"sampling_s": round(run.sampling_s, 4), "decode_s": round(run.decode_s, 4), **stages}
    ready = [release for release in releases if release.error is None]
    try:
        _record(ctx, ready, card, stages, started, run.resumed)
    except Exception:  # one job's record may be at fault: record each alone, so that only it fails
        log.exception("recording jobs %s together failed; recording each alone", [r.job.id for r in ready])
        for release in ready:
            _each([release], "audit", lambda one: _record(ctx, [one], card, stages, started, run.resumed))
    audited = {id(release) for release in ready}  # their audit transactions ran
    for release in releases:  # every release first: failing a job below needs the database, which may be down
        if not release.recorded:
            _withdraw(ctx, release, attempted=id(release) in audited)
        elif (release.job.attempts or 0) > 1:  # taken over: an earlier attempt may have stored images
            recorded = [*release.released, *release.held, *(release.job.images if run.resumed else ())]
            _remove_leftovers(ctx, release.job.id, keep={str(item["uri"]) for item in recorded})
    for release in releases:
        if release.error is not None:
            fail_jobs(ctx, [release.job.id], release.error)


def _screen_outputs(ctx: PipelineContext, revision: str, group: list[_Release]) -> None:
    """Every image of the jobs screened under one policy revision, in one classifier batch."""
    runtime = ctx.policies.runtime(revision)
    sets = runtime.screen_image_sets([(r.output.images, r.context or Context()) for r in group])
    for release, screenings in zip(group, sets, strict=True):
        release.screenings = screenings
        faults = [fault for screening in screenings if (fault := screening.fault()) is not None]
        if faults:  # a classifier that failed decided nothing about these images: the job fails, saying why
            release.error = f"output screening is unavailable: {faults[0]}"


def _sign(ctx: PipelineContext, release: _Release, card: _CardFacts) -> None:
    """Sign every image the output policy does not block (C2PA manifest with lineage, decisions and audit ids).

    If any image is sent to review, the job holds all of them for a reviewer: signed, stored and audited as
    held, and released only once a reviewer approves (`resumes_held`). A reviewer's approval after output
    screening releases what screening sent to review.
    """
    job = release.job
    approved = approved_at_output(job)
    holds = not approved and any(s.decision.action == "review" for s in release.screenings)
    indexes = release.indexes or list(range(len(release.output.images)))
    for index, image, screening in zip(indexes, release.output.images, release.screenings, strict=True):
        decision = screening.decision.to_dict()
        if decision["action"] == "block":
            continue
        event_id = str(uuid.uuid4())
        verdict = {"revision": job.policy_revision, "prompt": job.decisions.get("prompt"), "output": decision}
        if holds:
            verdict["held_for_review"] = True
        elif approved:
            verdict["review"] = job.review
        signed = ctx.signer.sign_png(
            encode_png(image),
            title=f"{job.id}-{index}.png",
            software_agent=f"{GATEWAY_NAME}/{_version()} ({card.name} {card.version})",
            assertions={
                "com.llamagen-gateway.lineage": {"model": card.name, "version": card.version,
                                                  "model_card_hash": card.content_hash,
                                                  "checkpoints": card.checkpoints, "lineage": card.lineage},
                "com.llamagen-gateway.policy-decision": verdict,
                "com.llamagen-gateway.audit": {"event_id": event_id, "job_id": job.id},
            },
        )
        # One key per attempt: a late duplicate cannot overwrite. Held images live apart until released.
        key = f"{job.id}/{'held/' if holds else ''}{index}-{event_id}.png"
        release.stored.append((key, signed.data))
        (release.held if holds else release.released).append({
            "index": index, "sha256": hashlib.sha256(signed.data).hexdigest(), "pixel_sha256": pixel_sha256(image),
            "uri": key, "manifest_id": signed.manifest_id, "event_id": event_id, "width": image.width,
            "height": image.height, "output_decision": decision})


def _store(ctx: PipelineContext, release: _Release) -> None:
    for key, data in release.stored:  # written before the commit; `_withdraw` removes them if it fails
        ctx.artifacts.put(key, data)
        release.written.append(key)


def _withdraw(ctx: PipelineContext, release: _Release, attempted: bool) -> None:
    """Delete what a release stored when its audit record was not committed (it failed before its audit, its
    commit failed, or another delivery of the job was recorded first): no signed image stays in the store
    without its audit record.

    attempted: its audit transaction ran. A commit can fail after it took effect (a connection lost during
    COMMIT), so the job's row is read first and the keys it references are kept; if it cannot be read, all are
    kept and logged: an orphaned image is removable later, deleted audited evidence is not.
    """
    referenced: set[str] = set()
    if attempted and release.written:
        try:
            with ctx.sessions() as session:
                row = session.get(Job, release.job.id)
                referenced = {str(image["uri"]) for image in (row.images if row is not None else [])}
        except Exception:
            log.exception("cannot tell whether the artifacts %s of job %s are audited; keeping them",
                          release.written, release.job.id)
            return
    for key in release.written:
        if key in referenced:
            continue
        try:
            ctx.artifacts.delete(key)
        except Exception:  # the job already fails or is done; the object is unreferenced and is logged
            log.exception("could not delete unaudited artifact %s of job %s", key, release.job.id)
    release.written.clear()


def _record(ctx: PipelineContext, releases: Sequence[_Release], card: _CardFacts, stages: dict[str, float],
            started: datetime, resumed: bool = False) -> None:
    """Audit the jobs' outcomes and update their rows in one transaction (one chain head lock, one commit)."""
    if not releases:
        return
    t_audit = time.perf_counter()
    recorded: list[_Release] = []
    timings: list[dict[str, Any]] = []  # of the recorded jobs' rows

    def work(session: Session) -> None:  # runs with the chain head locked: the job rows cannot change under us
        recorded.clear()
        timings.clear()
        # Every row in one SELECT before any is changed: a get per job would flush the previous job's changes.
        locked = {row.id: row for row in session.scalars(
            select(Job).where(Job.id.in_([release.job.id for release in releases])).order_by(Job.id)
            .with_for_update())}
        events: list[NewEvent] = []
        rows = []
        for release in releases:
            row = _record_one(session, release, locked.get(release.job.id), card, stages, started, ctx.device,
                              events, resumed)
            if row is not None:
                rows.append(row)
                recorded.append(release)
        append_many(session, events)  # one INSERT: every job's screening, released images and outcome
        # The audit stage's time (queueing for the audit log, events, job rows), recorded on the jobs after
        # their chain entries; a job's audit time adds what its request's audit transaction took.
        release_audit_s = round(time.perf_counter() - t_audit, 4)
        for row in rows:
            request_audit_s = float(row.timings.get("request_audit_s", 0.0))
            row.timings = {**row.timings, "release_audit_s": release_audit_s,
                           "audit_s": round(request_audit_s + release_audit_s, 4)}
            timings.append(row.timings)

    ctx.commits.run(work)
    audit_s = time.perf_counter() - t_audit
    for release in recorded:  # committed
        release.recorded = True
    ran = [stage for stage in WORKER_STAGES if f"{stage}_s" in stages or (stage == "queue" and not resumed)]
    for row_timings in timings:  # the stages this run went through (a release after review samples nothing)
        for stage in ran:
            STAGE_SECONDS.labels(stage).observe(float(row_timings.get(f"{stage}_s", 0.0)))
        STAGE_SECONDS.labels("audit").observe(audit_s)


def _record_one(session: Session, release: _Release, row: Job | None, card: _CardFacts, stages: dict[str, float],
                started: datetime, device: str, events: list[NewEvent], resumed: bool = False) -> Job | None:
    """Update one job's locked row and add its audit events to `events`; None if another delivery finished it.

    resumed: the run released images held for review, so the row keeps its queue time and cost."""
    job, output, context = release.job, release.output, release.context or Context()
    output_decisions = [s.to_dict() for s in release.screenings]
    worst = strictest(s["decision"] for s in output_decisions) if output_decisions else "allow"
    if row is None or row.status != "running":
        return None  # another delivery finished it first: idempotent
    OUTPUT_DECISIONS.labels(worst, job.model).inc()
    released, held = release.released, release.held
    events.append(NewEvent(action="output.screened", key_id=row.key_id, team=row.team, job_id=row.id,
                           payload={"policy_revision": row.policy_revision, "screenings": output_decisions,
                                    "action": worst, "context": context.to_dict(),
                                    **({"indexes": release.indexes} if release.indexes else {})}))
    events += [NewEvent(event_id=item["event_id"], action="image.held" if held else "image.released",
                        key_id=row.key_id,
                        team=row.team, job_id=row.id,
                        payload={"index": item["index"], "sha256": item["sha256"],
                                 "pixel_sha256": item["pixel_sha256"], "manifest_id": item["manifest_id"],
                                 "model": card.name, "model_card_hash": card.content_hash,
                                 "checkpoints": card.checkpoints, "seed": row.params["seed"],
                                 "params": row.params, "policy_revision": row.policy_revision,
                                 "torch_threads": output.torch_threads, "decode_layout": output.decode_layout})
               for item in held or released]
    decisions = dict(row.decisions)
    decisions["output"] = {"action": worst, "images": output_decisions,
                           **({"indexes": release.indexes} if release.indexes else {})}
    row.decisions = decisions
    # Held images keep how they were sampled: their release after review records it as a run would.
    row.images = [{**{k: v for k, v in item.items() if k != "output_decision"},
                   **({"torch_threads": output.torch_threads, "decode_layout": output.decode_layout} if held else {})}
                  for item in held or released]
    timings = dict(row.timings or {})
    if resumed:
        row.timings = {**timings, **stages}
    else:
        # Queued from the end of the request's audit transaction until its sampling run started.
        queued_s = (started - job.created_at).total_seconds() - float(timings.get("request_audit_s", 0.0))
        row.timings = {**timings, "queue_s": round(max(queued_s, 0.0), 4), **stages}
        row.cost = {"tokens": output.tokens, "device_seconds": round(output.device_seconds, 4), "device": device}
    if held:
        transition(session, row, "review", f"output screening asks for human review: {len(held)} image(s) held")
    elif not released:
        row.error = "every image was withheld by the output policy"
        transition(session, row, "blocked", row.error)
    else:
        transition(session, row, "completed", f"{len(released)} image(s) released")
    if row.status in TERMINAL and decisions.get("prompt", {}).get("storage", "full") != "full":
        row.prompt = None  # the policy keeps no prompt text beyond what the job needed
    events.append(NewEvent(action=f"generation.{row.status}", key_id=row.key_id, team=row.team, job_id=row.id,
                           payload={"images": len(released), "held": len(held), "timings": row.timings,
                                    "cost": row.cost}))
    return row


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
    threads, layout = torch.get_num_threads(), model.gpt.decode_layout
    recorded = _recorded_layout(payload, model)
    torch.set_num_threads(int(payload.get("torch_threads") or threads))  # as the worker ran (older events: ours)
    try:
        if recorded is not None:
            apply_layout(model.gpt, recorded)
        output = model.generate([gen_request(job)], params)[0]
    finally:
        torch.set_num_threads(threads)
        if recorded is not None:
            apply_layout(model.gpt, DecodeLayout.parse(layout))
    image = output.images[int(payload["index"])]
    digest = pixel_sha256(image)
    return {"event_id": event_id, "recorded_pixel_sha256": payload["pixel_sha256"],
            "regenerated_pixel_sha256": digest, "match": digest == payload["pixel_sha256"],
            "device": model.device, "decode_layout": output.decode_layout}


def _recorded_layout(payload: dict[str, Any], model: LoadedModel) -> DecodeLayout | None:
    """The decode layout the worker sampled with, where this process can run it too (older events and other
    devices: None, this process's own layout)."""
    text = payload.get("decode_layout")
    if not text or text == model.gpt.decode_layout:
        return None
    weight = model.gpt.tok_embeddings.weight
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return None  # layouts are a CPU float32 matter; elsewhere the model runs as it is
    layout = DecodeLayout.parse(text)
    if layout.native_up_to_rows is not None and not gemv.available():
        raise PipelineError(f"the image was sampled with gemv.c ({text}), which cannot be built here "
                            "(no C compiler): it cannot be regenerated bit for bit")
    return layout
