"""Use cases of the gateway: plain functions over the pipeline context, shared by the API, dashboard and CLI."""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import secrets
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import anyio
from PIL import Image
from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from audit.db import describe_fault
from audit.export import ExportFilters, cut_short_line, iter_export
from audit.log import NewEvent, append_event, append_many, lock_chain_head
from audit.models import AuditEvent, Job, ModelCardRecord
from audit.privacy import commit_prompt
from audit.provenance import ProvenanceError, verify_image
from audit.verify import verify_database
from gateway import metrics
from gateway.auth import Principal
from gateway.dispatch import Dispatcher
from gateway.errors import (
    Conflict,
    ContentPolicyViolation,
    Forbidden,
    InvalidPolicy,
    InvalidRequest,
    NotFound,
    ServiceUnavailable,
    UnknownModel,
)
from gateway.limits import Limits
from gateway.schemas import GenerationCreate, ModerationCreate, PolicyPublic
from gateway.settings import Settings
from gateway.waiting import JobWaiters
from generator.governance import PolicyNotFoundError, StoredPolicy
from generator.intake import Intake
from generator.pipeline import PipelineContext, strictest, transition
from generator.registry import UnknownModelError
from policies.classifiers.base import UnavailableClassifier
from policies.loader import LoadedPolicy, PolicyError, load_policy_text
from policies.replay import REPLAYABLE_ACTIONS, HistoryItem, history_of_event, replay
from policies.runtime import Context

log = logging.getLogger(__name__)


@dataclass
class GatewayState:
    """What the service holds for its lifetime (built in the app lifespan or by the CLI)."""

    settings: Settings
    ctx: PipelineContext
    dispatcher: Dispatcher
    limits: Limits
    waiters: JobWaiters = field(default_factory=lambda: JobWaiters(recheck_s=0.5))
    # Content hashes of the model cards this process has seen committed: no lookup per request for them.
    recorded_cards: set[str] = field(default_factory=set)
    # Requests between prompt screening and the queue: the embedded worker waits for companions only then.
    intake: Intake = field(default_factory=Intake)
    checkpoints: Any = None
    sweeper: Any = None
    # Set once a served gateway has loaded its classifiers and default model (`state.warm_up`); until then it
    # is not ready, so that no first request waits seconds for them. None: nothing is warmed (tests, the CLI).
    warmed: threading.Event | None = None
    signer_ok_at: float = float("-inf")  # time.monotonic() of the signer's last successful probe (`_require_signer`)


def _card(state: GatewayState, name: str | None) -> Any:
    model = name or state.settings.default_model
    try:
        card = state.ctx.registry.get(model)
    except UnknownModelError as exc:
        known = ", ".join(c.name for c in state.ctx.registry.cards() if c.servable)
        raise UnknownModel(f"unknown model {model!r}; servable models: {known or 'none'}") from exc
    if not card.servable:
        raise UnknownModel(f"model {model!r} has a card but its checkpoints are not installed under "
                           f"the models directory")
    return card


def _context(principal: Principal, card: Any) -> Context:
    return Context(team=principal.team, model=card.name, lineage=card.lineage_dicts(), use=None)


def _condition_text(request: GenerationCreate, card: Any) -> str:
    """The text screened for a request: the prompt, or the class name of a class-conditional model."""
    if card.task == "t2i":
        if request.prompt is None:
            raise InvalidRequest(f"model {card.name} is text-to-image: give a prompt")
        if request.class_id is not None:
            raise InvalidRequest(f"model {card.name} is text-to-image: class_id is not accepted")
        return request.prompt
    if request.class_id is None:
        raise InvalidRequest(f"model {card.name} is class-conditional: give a class_id")
    if request.prompt is not None:
        raise InvalidRequest(f"model {card.name} is class-conditional: prompt is not accepted")
    names = card.class_names or []
    num_classes = _num_classes(card)
    if request.class_id >= num_classes:
        raise InvalidRequest(f"class_id {request.class_id} out of range: model {card.name} has "
                             f"{num_classes} classes (0..{num_classes - 1})")
    return names[request.class_id] if request.class_id < len(names) else f"class {request.class_id}"


def _num_classes(card: Any) -> int:
    spec = card.architecture.gpt
    if card.class_names:
        return len(card.class_names)
    return int(spec.get("num_classes", 1000)) if isinstance(spec, dict) else 1000


def _record_card(session: Session, card: Any, content_hash: str) -> None:
    """Keep the card as served, by content hash, so evidence packs carry the exact lineage."""
    if session.get(ModelCardRecord, content_hash) is not None:
        return
    try:
        with session.begin_nested():
            session.add(ModelCardRecord(content_hash=content_hash, name=card.name, version=card.version,
                                        card=card.model_dump(mode="json"), recorded_at=datetime.now(UTC)))
    except IntegrityError:
        pass  # recorded concurrently by another request: same content, same key


def _params(state: GatewayState, request: GenerationCreate, card: Any) -> dict[str, Any]:
    p = request.params
    if p.num_images > state.settings.max_images_per_request:
        raise InvalidRequest(f"num_images {p.num_images} exceeds the limit of "
                             f"{state.settings.max_images_per_request}")
    defaults = card.defaults
    return {
        "cfg_scale": p.cfg_scale if p.cfg_scale is not None else defaults.cfg_scale,
        "temperature": p.temperature if p.temperature is not None else defaults.temperature,
        "top_k": p.top_k if p.top_k is not None else defaults.top_k,
        "top_p": p.top_p if p.top_p is not None else defaults.top_p,
        "seed": p.seed if p.seed is not None else secrets.randbelow(2**31),
        "num_images": p.num_images,
    }


def _screen(state: GatewayState, text: str, context: Context, *, principal: Principal, request_id: str,
            generates: bool = False) -> tuple[Any, list[dict[str, Any]], str]:
    """Prompt and model screening under the active policy -> (runtime, screenings, strictest action).

    generates: the request is for images, so output screening must be able to run too (fail closed before
    anything is generated). Only a process that loaded the image classifier can tell (an embedded gateway);
    a distributed gateway's workers fail such a job, saying why."""
    reason = None
    try:
        runtime = state.ctx.policies.runtime()
        output_fault = runtime.output_fault() if generates else None
        if output_fault is not None:
            reason = f"output screening is unavailable: {output_fault}; nothing was screened or generated"
        else:
            screened = [runtime.screen_prompt(text, context), runtime.check_model(context)]
            # A classifier that failed on this prompt decided nothing about it: 503, not 400.
            fault = next((f for f in (s.fault() for s in screened) if f is not None), None)
            if fault is not None:
                reason = f"prompt screening is unavailable: {fault}"
    except Exception as exc:  # a classifier that cannot run stops the request: fail closed
        reason = f"prompt screening is unavailable: {exc}"
    if reason is not None:
        _audit_unscreened(state, principal, request_id, context, text, reason)
        raise ServiceUnavailable(reason)
    screenings = [screening.to_dict() for screening in screened]
    return runtime, screenings, strictest(s["decision"] for s in screenings)


SIGNER_RECHECK_S = 10.0


def _require_signer(state: GatewayState) -> None:
    """Fail closed before anything is screened or generated: a job whose images cannot be signed would only
    fail after sampling. The signer signs for real at most every SIGNER_RECHECK_S while it works, and on every
    request while it does not."""
    now = time.monotonic()
    if now - state.signer_ok_at < SIGNER_RECHECK_S:
        return
    try:
        _probe_signer(state)
    except Exception as exc:
        log.warning("the signer cannot sign: %s", exc)
        raise ServiceUnavailable(f"the signer is unavailable ({type(exc).__name__}; see the gateway log); "
                                 "nothing was generated") from exc
    state.signer_ok_at = now


def _audit_unscreened(state: GatewayState, principal: Principal, request_id: str, context: Context, text: str,
                      reason: str) -> None:
    """Record a request refused because screening could not run (best effort: the database may be the fault)."""
    try:
        with state.ctx.sessions() as session, session.begin():
            append_event(session, action="prompt.unscreened", key_id=principal.key_id, team=principal.team,
                         payload={"request_id": request_id, "model": context.model, "reason": reason,
                                  "prompt_sha256": hashlib.sha256(text.encode()).hexdigest()})
    except Exception as exc:
        log.warning("could not audit the unscreened request %s: %s", request_id, exc)


def submit_generation(*, state: GatewayState, principal: Principal, request: GenerationCreate,
                      request_id: str) -> Job:
    """Screen and audit a request, then queue it, park it for review, or refuse it (400)."""
    principal.require("creator")
    state.limits.check(key_id=principal.key_id, team=principal.team)
    if request.prompt is not None and len(request.prompt) > state.settings.max_prompt_chars:
        raise InvalidRequest(f"prompt is longer than {state.settings.max_prompt_chars} characters")
    card = _card(state, request.model)
    text = _condition_text(request, card)
    params = _params(state, request, card)
    _require_signer(state)
    # Valid and about to be screened: only now do its images count against the quotas (a 422 costs nothing),
    # and a request that is then refused (blocked, or a 503) gives them back, as does one a reviewer rejects
    # before generation (decide_review).
    images = {"key_id": principal.key_id, "team": principal.team, "images": params["num_images"]}
    state.limits.charge_images(**images)
    try:
        return _admit(state, principal, request, request_id, card, text, params)
    except Exception:
        state.limits.refund_images(**images)
        raise


def _admit(state: GatewayState, principal: Principal, request: GenerationCreate, request_id: str, card: Any,
           text: str, params: dict[str, Any]) -> Job:
    """Screen the request, record it with its decision, and queue it or park it (or refuse it: 400)."""
    card_hash, checkpoints = card.content_hash, card.checkpoint_digests()  # cached on the card
    context = _context(principal, card)
    with state.intake.admitting():  # until its job is recorded: queued (below), parked or refused
        t0 = time.perf_counter()
        runtime, screenings, action = _screen(state, text, context, principal=principal, request_id=request_id,
                                              generates=True)
        screening_s = time.perf_counter() - t0
        metrics.observe_decision("prompt", action, principal.team, card.name)
        metrics.STAGE_SECONDS.labels("prompt_screening").observe(screening_s)
        revision = runtime.revision
        now = datetime.now(UTC)
        job = Job(id=str(uuid.uuid4()), created_at=now, updated_at=now, status="queued", team=principal.team,
                  key_id=principal.key_id, model=card.name, model_card_hash=card_hash, task=card.task,
                  prompt=request.prompt, prompt_sha256=hashlib.sha256(text.encode()).hexdigest(),
                  class_id=request.class_id, params=params, policy_revision=revision,
                  decisions={"prompt": {"action": action, "screenings": screenings}}, images=[], error=None,
                  timings={"prompt_screening_s": round(screening_s, 4)}, cost={}, review=None,
                  request_id=request_id, attempts=0)
        t_audit = time.perf_counter()

        def record(session: Session) -> None:  # one unit of the process's shared audit transaction
            stored_prompt = commit_prompt(session, text, runtime.prompt_storage(context))
            job.prompt_commitment = stored_prompt.get("commitment")
            if card_hash not in state.recorded_cards:
                _record_card(session, card, card_hash)
            job.decisions = {"prompt": {**job.decisions["prompt"], "storage": stored_prompt["storage"]}}
            session.add(job)
            session.flush()
            events = [
                NewEvent(action="generation.requested", key_id=principal.key_id, team=principal.team,
                         job_id=job.id, payload={
                             "request_id": request_id, "model": card.name, "model_version": card.version,
                             "model_card_hash": card_hash, "checkpoints": checkpoints,
                             "task": card.task, "prompt": stored_prompt, "class_id": request.class_id,
                             "params": params, "seed": params["seed"], "policy_revision": revision}),
                NewEvent(action="prompt.screened", key_id=principal.key_id, team=principal.team,
                         job_id=job.id, payload={"policy_revision": revision, "action": action,
                                                 "screenings": screenings, "context": context.to_dict()}),
            ]
            if action == "block":
                job.error = "the prompt was blocked by the content policy"
                transition(session, job, "blocked", "prompt blocked by policy")
            elif action == "review":
                transition(session, job, "review", "prompt needs human review")
            else:
                transition(session, job, "queued", f"prompt {action}")
            events.append(NewEvent(action=f"generation.{job.status}", key_id=principal.key_id,
                                   team=principal.team, job_id=job.id, payload={"stage": "prompt", "action": action}))
            append_many(session, events)  # one INSERT for the request's three events
            # The request's audit work (prompt commitment, card, job row, events), in the job's audit time.
            job.timings = {**job.timings, "request_audit_s": round(time.perf_counter() - t_audit, 4)}

        try:
            state.ctx.commits.run(record)
            # Until the commit was durable (the row holds the time in the transaction: `request_audit_s`).
            metrics.STAGE_SECONDS.labels("request_audit").observe(time.perf_counter() - t_audit)
        except Exception as exc:  # no audit record -> no generation
            job = _committed_anyway(state, job.id, exc)
    state.recorded_cards.add(card_hash)  # committed with this request (or before it)
    if job.status == "blocked":
        raise ContentPolicyViolation("the prompt was blocked by the content policy",
                                     details={"id": job.id, "decision": job.decisions["prompt"],
                                              "policy_revision": revision})
    if job.status == "queued":
        _dispatch(state, job.id)
    return job


def _committed_anyway(state: GatewayState, job_id: str, exc: Exception) -> Job:
    """The job, when its audit commit was reported failed but took effect (a connection lost while COMMIT's
    acknowledgement was on its way): it goes on as recorded. Otherwise a 503: nothing was recorded, or, when
    the database cannot say, the job id to poll (if it was recorded, the gateway re-sends it to the queue)."""
    try:
        with state.ctx.sessions() as session:
            job = session.get(Job, job_id)
    except Exception as lookup:
        log.warning("request audit failed (%s) and its job %s cannot be looked up: %s", exc, job_id, lookup)
        raise ServiceUnavailable(f"the audit log did not confirm the request, which may have been recorded as job "
                                 f"{job_id}: poll it before sending the request again ({type(exc).__name__}; "
                                 "see the gateway log)", details={"id": job_id}) from exc
    if job is None:
        log.warning("request audit failed: %s", exc)
        fault = describe_fault(exc)
        raise ServiceUnavailable(f"nothing was generated: the audit log could not record the request ({fault.message})",
                                 headers=fault.headers) from exc
    log.warning("request audit of job %s was reported failed but took effect: %s", job_id, exc)
    return job


def _dispatch(state: GatewayState, job_id: str) -> None:
    try:
        state.dispatcher.submit(job_id)
    except Exception as exc:
        # The broker's own text names hosts and ports: it goes to the log, the caller and the job get its kind.
        log.warning("could not enqueue job %s: %s", job_id, exc)
        reason = f"the job queue is unavailable ({type(exc).__name__}; see the gateway log)"
        with state.ctx.sessions() as session, session.begin():
            job = session.get(Job, job_id)
            if job is not None and job.status == "queued":
                job.error = f"could not enqueue: {reason}"
                transition(session, job, "failed", job.error)
                append_event(session, action="generation.failed", key_id=job.key_id, team=job.team,
                             job_id=job.id, payload={"error": job.error})
        raise ServiceUnavailable(reason) from exc


def get_generation(*, session: Session, principal: Principal, job_id: str) -> Job:
    principal.require("creator", "auditor", "reviewer")
    job = session.get(Job, job_id)
    if job is None or not principal.can_see_team(job.team):
        raise NotFound(f"no generation {job_id}")
    return job


PENDING = ("queued", "running")


async def wait_for_generation(*, state: GatewayState, principal: Principal, job_id: str, wait_s: float) -> Job:
    """The job as `get_generation` reads it, once it is no longer queued or running or `wait_s` has passed.

    Long-polling: the request sleeps until the worker reports the job done (or `state.waiters.recheck_s`
    passes), so a client that waits costs one read per change instead of one request per poll.
    """
    def read() -> Job:
        with state.ctx.sessions() as session:
            return get_generation(session=session, principal=principal, job_id=job_id)

    deadline = time.monotonic() + wait_s
    with state.waiters.watch(job_id) as changed:  # registered before the read: a finish cannot slip between
        while True:
            job = await anyio.to_thread.run_sync(read)
            remaining = deadline - time.monotonic()
            if job.status not in PENDING or remaining <= 0:
                return job
            try:
                await asyncio.wait_for(changed.wait(), timeout=min(remaining, state.waiters.recheck_s))
            except TimeoutError:
                pass
            changed.clear()


def list_generations(*, session: Session, principal: Principal, status: str | None, limit: int,
                     offset: int, before: str | None = None) -> tuple[list[Job], int]:
    """Newest first. `before` (a job id the caller can see) starts the page after that job: a client paging
    with it sees each job once while new ones arrive, which offsets cannot promise. `count` is every match."""
    principal.require("creator", "auditor", "reviewer")
    query = select(Job)
    if not principal.can_see_team("*"):
        query = query.where(Job.team == principal.team)
    if status:
        query = query.where(Job.status == status)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    if before is not None:
        cursor = session.get(Job, before)
        if cursor is None or not principal.can_see_team(cursor.team):
            raise InvalidRequest(f"before: no generation {before!r} to page from")
        query = query.where(or_(Job.created_at < cursor.created_at,
                                and_(Job.created_at == cursor.created_at, Job.id < cursor.id)))
    rows = session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit).offset(offset)).all()
    return list(rows), total


def released_images(job: Job) -> list[dict[str, Any]]:
    """The images a job released: only a completed job released any (a row can hold the images of a run that
    a later decision overruled)."""
    return list(job.images) if job.status == "completed" else []


def _released_image(session: Session, principal: Principal, job_id: str, index: int) -> dict[str, Any]:
    job = get_generation(session=session, principal=principal, job_id=job_id)
    for image in released_images(job):
        if int(image["index"]) == index:
            return image
    raise NotFound(f"generation {job_id} has no released image {index}")


def stored_image(*, state: GatewayState, session: Session, principal: Principal, job_id: str,
                 index: int) -> bytes:
    """The stored bytes of a released image, whatever they are (an auditor's view checks them itself)."""
    return state.ctx.artifacts.get(_released_image(session, principal, job_id, index)["uri"])


def image_bytes(*, state: GatewayState, session: Session, principal: Principal, job_id: str,
                index: int) -> bytes:
    """A released image, only if its stored bytes are the ones its audit record names."""
    return _audited_bytes(state, _released_image(session, principal, job_id, index), f"image {index}", job_id)


def _audited_bytes(state: GatewayState, image: dict[str, Any], what: str, job_id: str) -> bytes:
    data = state.ctx.artifacts.get(image["uri"])
    if hashlib.sha256(data).hexdigest() != image["sha256"]:
        raise ServiceUnavailable(f"the stored {what} of generation {job_id} does not match its audit record; "
                                 "it is withheld")
    return data


def held_images(job: Job) -> list[dict[str, Any]]:
    """The images a job parked at output screening holds for its reviewer (none once it is decided)."""
    return list(job.images) if job.status == "review" else []


def held_image_bytes(*, state: GatewayState, session: Session, principal: Principal, job_id: str,
                     index: int) -> bytes:
    """An image held for review, for a reviewer to look at before deciding (its manifest says it is held),
    only if its stored bytes are the ones its audit record names."""
    principal.require("reviewer")
    job = session.get(Job, job_id)
    if job is None or job.status != "review":
        raise NotFound(f"generation {job_id} is not waiting for review")
    image = next((i for i in held_images(job) if int(i["index"]) == index), None)
    if image is None:
        raise NotFound(f"generation {job_id} holds no image {index} for review")
    return _audited_bytes(state, image, f"held image {index}", job_id)


def moderate(*, state: GatewayState, principal: Principal, request: ModerationCreate,
             request_id: str) -> dict[str, Any]:
    """Screen a prompt only (nothing generated); the screening is audited like any other."""
    principal.require("creator")
    state.limits.check(key_id=principal.key_id, team=principal.team)
    card = _card(state, request.model)
    context = _context(principal, card)
    runtime, screenings, action = _screen(state, request.prompt, context, principal=principal, request_id=request_id)
    try:
        with state.ctx.sessions() as session, session.begin():
            stored_prompt = commit_prompt(session, request.prompt, runtime.prompt_storage(context))
            event = append_event(session, action="moderation.screened", key_id=principal.key_id,
                                 team=principal.team, payload={
                                     "request_id": request_id, "prompt": stored_prompt, "model": card.name,
                                     "policy_revision": runtime.revision, "action": action,
                                     "screenings": screenings, "context": context.to_dict()})
            event_id = event.id
    except Exception as exc:
        log.warning("moderation audit failed: %s", exc)
        raise ServiceUnavailable(f"the audit log is unavailable ({type(exc).__name__}; see the gateway log)") from exc
    return {"decision": {"action": action}, "classifiers": screenings, "policy_revision": runtime.revision,
            "audit_event_id": event_id}


def list_review(*, session: Session, principal: Principal, limit: int, offset: int) -> tuple[list[Job], int]:
    principal.require("reviewer")
    query = select(Job).where(Job.status == "review")
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.scalars(query.order_by(Job.created_at, Job.id).limit(limit).offset(offset)).all()
    return list(rows), total


def decide_review(*, state: GatewayState, principal: Principal, job_id: str, decision: str,
                  reason: str) -> Job:
    """Approve (resume generation or release) or reject (end) a parked job; every step is audited."""
    principal.require("reviewer")
    with state.ctx.sessions() as session, session.begin():
        # The chain head first, then the job: the order the worker's release takes them in, so that the two
        # cannot deadlock. Then take the job out of review atomically: of two reviewers deciding at once, the
        # second waits for the first's commit and then matches no row.
        lock_chain_head(session)
        taken = session.execute(update(Job).where(Job.id == job_id, Job.status == "review")
                                .values(updated_at=datetime.now(UTC)))
        job = session.get(Job, job_id)
        if job is None:
            raise NotFound(f"no generation {job_id}")
        if taken.rowcount != 1:  # type: ignore[attr-defined]
            raise Conflict(f"generation {job_id} is {job.status}, not waiting for review")
        if job.key_id == principal.key_id:
            raise Forbidden("a requester cannot review its own generation")
        stage = "output" if "output" in (job.decisions or {}) else "prompt"
        job.review = {"decision": decision, "reason": reason, "reviewer": principal.key_id, "stage": stage,
                      "at": datetime.now(UTC).isoformat()}
        decided = NewEvent(action="review.decided", key_id=principal.key_id, team=job.team, job_id=job.id,
                           payload={"decision": decision, "reason": reason, "stage": stage})
        if decision == "approve":
            job.attempts = 0  # a new phase: the claims that parked it do not count against the next ones
            transition(session, job, "queued", f"approved by reviewer {principal.key_id}: {reason}")
        else:
            job.error = f"rejected by reviewer: {reason}"
            transition(session, job, "blocked", job.error)
        append_many(session, [decided, NewEvent(action=f"generation.{job.status}", key_id=principal.key_id,
                                                team=job.team, job_id=job.id,
                                                payload={"stage": "review", "decision": decision})])
    if job.status == "queued":
        _dispatch(state, job.id)
    elif stage == "prompt":  # refused before anything was generated: its images go back to the quotas
        state.limits.refund_images(key_id=job.key_id, team=job.team, images=int(job.params["num_images"]))
    return job


def list_models(*, state: GatewayState) -> list[dict[str, Any]]:
    return [card.public() for card in state.ctx.registry.cards()]


def get_model(*, state: GatewayState, name: str) -> dict[str, Any]:
    try:
        public: dict[str, Any] = state.ctx.registry.get(name).public()
        return public
    except UnknownModelError as exc:
        raise NotFound(f"no model card {name!r}") from exc



def _policy_public(stored: StoredPolicy, *, with_source: bool = True) -> PolicyPublic:
    return PolicyPublic(revision=stored.revision, policy_id=stored.policy_id, version=stored.version,
                        author=stored.author, reason=stored.reason, created_at=stored.created_at,
                        active=stored.active, source=stored.source if with_source else None)


def active_policy(*, state: GatewayState) -> PolicyPublic:
    try:
        return _policy_public(state.ctx.policies.active_revision())
    except PolicyNotFoundError as exc:
        raise ServiceUnavailable(str(exc)) from exc


def policy_history(*, state: GatewayState, principal: Principal, limit: int,
                   offset: int) -> tuple[list[PolicyPublic], int]:
    principal.require("auditor", "policy_admin")
    rows, total = state.ctx.policies.history(limit=limit, offset=offset)
    return [_policy_public(r, with_source=False) for r in rows], total


def get_policy(*, state: GatewayState, principal: Principal, revision: str) -> PolicyPublic:
    principal.require("auditor", "policy_admin")
    try:
        return _policy_public(state.ctx.policies.get(revision))
    except PolicyNotFoundError as exc:
        raise NotFound(str(exc)) from exc


def _parse_policy(source: str) -> LoadedPolicy:
    """Validate a candidate policy; a 422 lists each problem with its dotted field path and line."""
    try:
        return load_policy_text(source, name="request body")
    except PolicyError as exc:
        problems = [{"field": field, "line": line, "message": message} for field, line, message in exc.problems]
        raise InvalidPolicy(str(exc), details={"problems": problems}) from exc


def validate_policy(*, principal: Principal, source: str) -> str:
    """Validate without storing; returns the revision the policy would get."""
    principal.require("policy_admin", "auditor")
    return _parse_policy(source).revision


def create_policy(*, state: GatewayState, principal: Principal, source: str, activate: bool,
                  reason: str) -> PolicyPublic:
    principal.require("policy_admin")
    loaded = _parse_policy(source)
    stored = state.ctx.policies.store(loaded, author=principal.key_id, reason=reason, activate=activate,
                                      key_id=principal.key_id, team=principal.team)
    return _policy_public(stored)


def activate_policy(*, state: GatewayState, principal: Principal, revision: str, reason: str) -> PolicyPublic:
    principal.require("policy_admin")
    try:
        stored = state.ctx.policies.activate(revision, author=principal.key_id, reason=reason,
                                             key_id=principal.key_id, team=principal.team)
    except PolicyNotFoundError as exc:
        raise NotFound(str(exc)) from exc
    return _policy_public(stored)


def _event_public(event: AuditEvent) -> dict[str, Any]:
    return {"seq": event.seq, "id": event.id, "ts": event.ts.isoformat(), "action": event.action,
            "key_id": event.key_id, "team": event.team, "job_id": event.job_id, "payload": event.payload,
            "prev_hash": event.prev_hash, "hash": event.hash}


def list_events(*, session: Session, principal: Principal, action: str | None, team: str | None,
                job_id: str | None, since: datetime | None, until: datetime | None, limit: int,
                offset: int) -> tuple[list[dict[str, Any]], int]:
    principal.require("auditor")
    query = select(AuditEvent)
    if action:
        query = query.where(AuditEvent.action == action)
    if team:
        query = query.where(AuditEvent.team == team)
    if job_id:
        query = query.where(AuditEvent.job_id == job_id)
    if since:
        query = query.where(AuditEvent.ts >= since)
    if until:
        query = query.where(AuditEvent.ts < until)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.scalars(query.order_by(AuditEvent.seq.desc()).limit(limit).offset(offset)).all()
    return [_event_public(e) for e in rows], total


def export_events(*, state: GatewayState, principal: Principal, fmt: Literal["jsonl", "csv"], action: str | None,
                  team: str | None, since: datetime | None, until: datetime | None) -> Iterator[str]:
    """A generator of text chunks that owns its own session (the response streams after the handler).

    The database is asked once here, so that one that cannot start the export gives the caller a 503, not a
    200 with an empty body. A fault after that ends a JSONL export with an error line (`cut_short_line`, which
    the verifiers report) and, in both formats, ends the response without its last chunk, so the client sees
    the transfer fail rather than a complete file.
    """
    principal.require("auditor")
    filters = ExportFilters(action=action, team=team, since=since, until=until)
    with state.ctx.sessions() as probe:  # closed at once: a stream the client never starts holds nothing
        probe.scalar(select(func.max(AuditEvent.seq)))

    def stream() -> Iterator[str]:
        with state.ctx.sessions() as session:
            try:
                yield from iter_export(session, fmt=fmt, filters=filters)
            except Exception as exc:
                log.error("audit export cut short: %s", exc)
                if fmt == "jsonl":
                    yield cut_short_line("the server could not read the rest of the audit log; see the gateway log")
                raise ExportCutShort("the audit export was cut short; see the error above") from exc

    return stream()


class ExportCutShort(RuntimeError):
    """Raised into the server once a streamed export has failed, to end the response without its last chunk."""


def verify_audit(*, state: GatewayState, session: Session, principal: Principal) -> dict[str, Any]:
    """The chain, and the checkpoint signers checked against the configured trust anchors."""
    principal.require("auditor")
    result: dict[str, Any] = verify_database(session, trust_anchors_pem=_trust_anchors(state)).to_dict()
    return result


def _trust_anchors(state: GatewayState) -> str | None:
    anchors = state.settings.trust_anchors
    return anchors.read_text() if anchors is not None and anchors.is_file() else None


def verify_provenance(*, state: GatewayState, principal: Principal, data: bytes) -> dict[str, Any]:
    """The C2PA report of `data`; with the audit event its manifest names, when the manifest is valid and from a
    trusted signer (anyone can write an event id into a manifest of their own) and the caller may see its team."""
    # The bytes decide the type (a declared Content-Type can be wrong); anything else is a clear 422.
    mime = "image/png" if data.startswith(b"\x89PNG\r\n\x1a\n") else "image/jpeg" if data[:3] == b"\xff\xd8\xff" else ""
    if not mime:
        raise InvalidRequest("the upload is not a PNG or JPEG image")
    try:
        report = verify_image(data, mime=mime, trust_anchors_pem=_trust_anchors(state))
    except ProvenanceError as exc:
        raise InvalidRequest(f"cannot read this image: {exc}") from exc
    if not report.readable:  # junk behind an image signature: nothing to report on
        raise InvalidRequest(report.error or f"not a readable {mime} file")
    result: dict[str, Any] = report.to_dict()
    if not report.audit_event_id:
        return result
    result["audit_event"] = None
    if not (report.signature_valid and report.signer_trusted):
        result["audit_event_withheld"] = "the manifest is not validly signed by a trusted signer"
        return result
    with state.ctx.sessions() as session:
        event = session.scalar(select(AuditEvent).where(AuditEvent.id == report.audit_event_id))
        if event is None:
            result["audit_event_withheld"] = "no such event in this gateway's audit log"
        elif not principal.can_see_team(event.team):
            result["audit_event_withheld"] = "the event belongs to a team this key cannot see"
        else:
            result["audit_event"] = _event_public(event)
            if event.action == "image.released":
                result["matches_audit_record"] = event.payload.get("sha256") == hashlib.sha256(data).hexdigest()
    return result


def _probe_signer(state: GatewayState) -> str:
    """Sign a 1x1 PNG for real: a signer that cannot sign must make the gateway not ready."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    state.ctx.signer.sign_png(buf.getvalue(), title="readiness probe", software_agent="llamagen-gateway readyz",
                              assertions={})
    return state.ctx.signer.description


def _workers(state: GatewayState) -> list[dict[str, Any]] | str:
    """Which worker processes are up and which models each holds (informational: jobs queue meanwhile)."""
    workers = state.dispatcher.workers()
    return workers or "no worker has registered yet; jobs wait in the queue until one does"


def _probe_policy(state: GatewayState) -> str:
    """The active policy is loaded and every prompt classifier it needs is available (fail closed)."""
    runtime = state.ctx.policies.runtime()
    missing = [c.name for c in runtime.text_classifiers if isinstance(c, UnavailableClassifier)]
    if missing:
        raise ServiceUnavailable(f"classifiers unavailable: {', '.join(missing)}")
    output_fault = runtime.output_fault()
    if output_fault is not None:
        raise ServiceUnavailable(f"output screening is unavailable: {output_fault}")
    return runtime.revision


def readiness(*, state: GatewayState) -> dict[str, dict[str, Any]]:
    """Each dependency the release path needs, checked for real."""
    checks: dict[str, dict[str, Any]] = {}

    def check(name: str, fn: Any) -> None:
        try:
            detail = fn()
            checks[name] = {"ok": True, **({"detail": detail} if detail else {})}
        except Exception as exc:
            checks[name] = {"ok": False, "error": str(exc)}

    def database() -> None:
        with state.ctx.sessions() as session:
            session.execute(select(1))

    check("database", database)
    check("broker", state.dispatcher.ping)
    check("workers", lambda: _workers(state))
    check("signer", lambda: _probe_signer(state))
    check("policy", lambda: _probe_policy(state))
    if state.warmed is not None:
        checks["warm_up"] = {"ok": True} if state.warmed.is_set() else \
            {"ok": False, "error": "still loading the default model and the classifiers"}
    return checks


def requeue_stale_jobs(*, state: GatewayState, now: datetime | None = None) -> list[str]:
    """Re-send jobs the queue may have lost (broker restart) or whose worker died (lease expired).

    The database is the source of truth; a duplicate delivery is a no-op because tasks are idempotent.
    """
    now = now or datetime.now(UTC)
    queued_cutoff = now - timedelta(seconds=state.settings.requeue_after_s)
    lease_cutoff = now - timedelta(seconds=state.settings.job_time_limit_s)
    with state.ctx.sessions() as session, session.begin():
        stale = session.scalars(select(Job).where(
            ((Job.status == "queued") & (Job.updated_at < queued_cutoff))
            | ((Job.status == "running") & (Job.updated_at < lease_cutoff)))
            .order_by(Job.created_at).limit(1000)).all()
        for job in stale:
            if job.status == "queued":
                job.updated_at = now  # re-sent now: wait another period before sending again
        ids = [job.id for job in stale]
    for job_id in ids:
        state.dispatcher.submit(job_id)
    return ids


def dry_run_policy(*, state: GatewayState, principal: Principal, source: str, limit: int) -> dict[str, Any]:
    """Replay a candidate policy over the most recent stored decisions: what would change, by rule."""
    principal.require("policy_admin", "auditor")
    candidate = _parse_policy(source)

    def history() -> Iterator[HistoryItem]:
        with state.ctx.sessions() as session:
            events = session.scalars(select(AuditEvent).where(AuditEvent.action.in_(REPLAYABLE_ACTIONS))
                                     .order_by(AuditEvent.seq.desc()).limit(limit))
            for event in events:
                yield from history_of_event(event.id, event.team, event.payload)

    report = replay(candidate, history())
    return {**report.to_dict(), "summary": report.summary()}


def refresh_queue_metrics(*, state: GatewayState) -> None:
    """Job counts by status for /metrics (queued is the queue depth). While the database is down they are left
    out, not kept at their last value (Prometheus marks the series stale), and gateway_jobs_up is 0."""
    try:
        with state.ctx.sessions() as session:
            counts = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
    except Exception:
        metrics.JOBS.clear()
        metrics.JOBS_UP.set(0)
        return
    metrics.JOBS_UP.set(1)
    for status in ("queued", "review", "running", "completed", "blocked", "failed"):
        metrics.JOBS.labels(status).set(counts.get(status, 0))
