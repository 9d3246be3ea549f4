"""Builders of audit history for dashboard tests: jobs parked for review and signed released images.

They write what `services.submit_generation` and `pipeline._release` write (job row, the same audit events,
a C2PA-signed PNG in the artifact store) without running a model, so the dashboard can be tested on its own.
"""

from __future__ import annotations

import hashlib
import io
import uuid
from datetime import UTC, datetime
from typing import Any

from PIL import Image

from audit.log import append_event
from audit.models import Job

MODEL = "demo-shapes-t2i"


def reason(rule_id: str, action: str, *, classifier: str = "semantic", score: float = 0.71,
           threshold: float = 0.5) -> dict[str, Any]:
    return {"rule_id": rule_id, "classifier": classifier, "label": rule_id, "score": score,
            "threshold": threshold, "action": action, "message": f"{rule_id} fired"}


def screening(action: str, revision: str, reasons: list[dict[str, Any]],
              stage: str = "prompt") -> dict[str, Any]:
    decision = {"action": action, "stage": stage, "revision": revision, "reasons": reasons, "shadow": []}
    scores = {r["rule_id"]: r["score"] for r in reasons}
    return {"stage": stage, "decision": decision,
            "results": [{"name": "semantic", "version": "minilm-test", "scores": scores, "latency_ms": 1.0,
                         "error": None}]}


def _job(state: Any, *, team: str, key_id: str, prompt: str, status: str, decisions: dict[str, Any]) -> Job:
    now = datetime.now(UTC)
    revision = state.ctx.policies.active_revision().revision
    return Job(id=str(uuid.uuid4()), created_at=now, updated_at=now, status=status, team=team, key_id=key_id,
               model=MODEL, model_card_hash="sha256:" + "0" * 64, task="t2i", prompt=prompt,
               prompt_sha256=hashlib.sha256(prompt.encode()).hexdigest(), class_id=None,
               params={"cfg_scale": 3.0, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": 7,
                       "num_images": 1},
               policy_revision=revision, decisions=decisions, images=[], error=None, timings={}, cost={},
               review=None, request_id="test", attempts=0)


def park_for_review(state: Any, *, team: str = "ads", key_id: str = "creator0001",
                    prompt: str = "a portrait of a famous senator", rule_id: str = "public_figures") -> str:
    """A generation whose prompt screening asked for human review; returns the job id."""
    revision = state.ctx.policies.active_revision().revision
    screened = [screening("review", revision, [reason(rule_id, "review")])]
    with state.ctx.sessions() as session, session.begin():
        job = _job(state, team=team, key_id=key_id, prompt=prompt, status="review",
                   decisions={"prompt": {"action": "review", "screenings": screened}})
        session.add(job)
        session.flush()
        append_event(session, action="generation.requested", key_id=key_id, team=team, job_id=job.id,
                     payload={"model": MODEL, "prompt": {"mode": "full", "text": prompt},
                              "policy_revision": revision})
        append_event(session, action="prompt.screened", key_id=key_id, team=team, job_id=job.id,
                     payload={"policy_revision": revision, "action": "review", "screenings": screened,
                              "context": {"team": team, "model": MODEL, "use": None}})
        append_event(session, action="generation.review", key_id=key_id, team=team, job_id=job.id,
                     payload={"stage": "prompt", "action": "review"})
        return job.id


def _signed_image(state: Any, job_id: str, event_id: str, uri: str) -> dict[str, Any]:
    """Image 0 of a job, C2PA-signed and stored at `uri`: its entry in the job row's images."""
    signed = state.ctx.signer.sign_png(
        png_bytes(), title=f"{job_id}-0.png", software_agent="llamagen-gateway/test (demo-shapes-t2i)",
        assertions={"com.llamagen-gateway.audit": {"event_id": event_id, "job_id": job_id}})
    state.ctx.artifacts.put(uri, signed.data)
    return {"index": 0, "sha256": hashlib.sha256(signed.data).hexdigest(), "uri": uri,
            "manifest_id": signed.manifest_id, "event_id": event_id, "width": 32, "height": 32}


def park_with_held_image(state: Any, *, team: str = "ads", key_id: str = "creator0004") -> str:
    """A generation whose output screening sent its one image to review: signed and stored as held."""
    revision = state.ctx.policies.active_revision().revision
    review = [screening("review", revision, [reason("test_red_star", "review", classifier="image_concepts")])]
    event_id = str(uuid.uuid4())
    with state.ctx.sessions() as session, session.begin():
        job = _job(state, team=team, key_id=key_id, prompt="a red star", status="review",
                   decisions={"prompt": {"action": "allow", "screenings": [screening("allow", revision, [])]},
                              "output": {"action": "review", "images": review}})
        job.images = [_signed_image(state, job.id, event_id, f"{job.id}/held/0-{event_id}.png")]  # held there
        session.add(job)
        session.flush()
        append_event(session, event_id=event_id, action="image.held", key_id=key_id, team=team, job_id=job.id,
                     payload={"index": 0, "sha256": job.images[0]["sha256"], "model": MODEL})
        append_event(session, action="generation.review", key_id=key_id, team=team, job_id=job.id,
                     payload={"images": 0, "held": 1})
        return job.id


def png_bytes(colour: tuple[int, int, int] = (200, 30, 30), size: int = 32) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def released_image(state: Any, *, team: str = "design", key_id: str = "creator0002",
                   prompt: str = "a red square") -> tuple[str, str]:
    """A completed generation with one C2PA-signed image in the artifact store: (job id, image event id)."""
    revision = state.ctx.policies.active_revision().revision
    allowed = [screening("allow", revision, [])]
    event_id = str(uuid.uuid4())
    with state.ctx.sessions() as session, session.begin():
        job = _job(state, team=team, key_id=key_id, prompt=prompt, status="completed",
                   decisions={"prompt": {"action": "allow", "screenings": allowed},
                              "output": {"action": "allow", "images": allowed}})
        job.images = [_signed_image(state, job.id, event_id, f"{job.id}/0-{event_id}.png")]  # as the pipeline stores it
        digest = job.images[0]["sha256"]
        session.add(job)
        session.flush()
        append_event(session, action="generation.requested", key_id=key_id, team=team, job_id=job.id,
                     payload={"model": MODEL, "prompt": {"mode": "full", "text": prompt},
                              "policy_revision": revision})
        append_event(session, action="prompt.screened", key_id=key_id, team=team, job_id=job.id,
                     payload={"policy_revision": revision, "action": "allow", "screenings": allowed,
                              "context": {"team": team, "model": MODEL, "use": None}})
        append_event(session, action="output.screened", key_id=key_id, team=team, job_id=job.id,
                     payload={"policy_revision": revision, "action": "allow", "screenings": allowed})
        append_event(session, event_id=event_id, action="image.released", key_id=key_id, team=team,
                     job_id=job.id, payload={"index": 0, "sha256": digest, "manifest_id": job.images[0]["manifest_id"],
                                             "model": MODEL, "policy_revision": revision})
        append_event(session, action="generation.completed", key_id=key_id, team=team, job_id=job.id,
                     payload={"images": 1})
        return job.id, event_id


def blocked_prompt(state: Any, *, team: str = "ads", key_id: str = "creator0003",
                   rule_id: str = "graphic_violence") -> str:
    """A prompt blocked by `rule_id`; returns the job id."""
    revision = state.ctx.policies.active_revision().revision
    screened = [screening("block", revision, [reason(rule_id, "block", classifier="lexical", score=1.0)])]
    with state.ctx.sessions() as session, session.begin():
        job = _job(state, team=team, key_id=key_id, prompt="a gory scene", status="blocked",
                   decisions={"prompt": {"action": "block", "screenings": screened}})
        session.add(job)
        session.flush()
        append_event(session, action="prompt.screened", key_id=key_id, team=team, job_id=job.id,
                     payload={"policy_revision": revision, "action": "block", "screenings": screened,
                              "context": {"team": team, "model": MODEL, "use": None}})
        append_event(session, action="generation.blocked", key_id=key_id, team=team, job_id=job.id,
                     payload={"stage": "prompt", "action": "block"})
        return job.id
