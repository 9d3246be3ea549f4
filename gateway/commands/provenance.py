"""`llamagen-gateway provenance verify FILE`: C2PA verification in plain words, linked to our audit log."""

from __future__ import annotations

import argparse
import hashlib
import mimetypes
import sys
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from gateway.settings import Settings, get_settings

OK, FAILED, BAD_INPUT = 0, 1, 2


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    provenance = subparsers.add_parser("provenance", help="C2PA content credentials")
    sub = provenance.add_subparsers(dest="provenance_command", required=True)
    p = sub.add_parser("verify", help="check an image's C2PA manifest: signature, signer trust, integrity",
                       description="Exit status 0: valid signature, trusted signer, intact content; "
                                   "1: any of those is not so; 2: the file (or the trust anchors) cannot be read, "
                                   "or is not an image at all.")
    p.add_argument("file", type=Path)
    p.add_argument("--trust-anchors", type=Path, metavar="PEM",
                   help="trusted root certificates (default: LLAMAGEN_GATEWAY_TRUST_ANCHORS)")
    p.set_defaults(func=cmd_verify)


def sniff_mime(path: Path, data: bytes) -> str:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    return mimetypes.guess_type(path.name)[0] or "application/octet-stream"


def yes_no(value: bool | None) -> str:
    return "n/a" if value is None else "yes" if value else "NO"


def describe_audit_event(settings: Settings, event_id: str, data: bytes) -> list[str]:
    """Lines about the audit event the manifest names, looked up in our database when it is reachable."""
    from audit.db import make_engine, make_session_factory
    from audit.models import AuditEvent

    engine = make_engine(settings.database_url)
    try:
        with make_session_factory(engine)() as session:
            event = session.scalar(select(AuditEvent).where(AuditEvent.id == event_id))
    except SQLAlchemyError as exc:
        reason = f"audit database unavailable: {exc.__class__.__name__}"
        return [f"audit event:       {event_id} (not looked up: {reason})"]
    finally:
        engine.dispose()
    if event is None:
        return [f"audit event:       {event_id} (NOT in this gateway's audit log)"]
    lines = [f"audit event:       {event.id} (seq {event.seq}, {event.action}, {event.ts.isoformat()}, "
             f"team {event.team}, job {event.job_id})"]
    recorded: Any = event.payload.get("sha256")
    if recorded:
        matches = recorded == hashlib.sha256(data).hexdigest()
        verdict = "matches" if matches else "DIFFERS FROM"
        lines.append(f"file digest:       {verdict} the digest the event recorded")
    return lines


def cmd_verify(args: argparse.Namespace) -> int:
    from audit.checkpoints import CheckpointError, load_trust_anchors
    from audit.provenance import ProvenanceError, verify_image

    settings = get_settings()
    try:
        data = args.file.read_bytes()
    except OSError as exc:
        print(f"error: cannot read {args.file}: {exc.strerror or exc}", file=sys.stderr)
        return BAD_INPUT
    anchors_path: Path | None = args.trust_anchors or settings.trust_anchors
    anchors: bytes | None = None
    if anchors_path is not None:
        try:
            anchors = anchors_path.read_bytes()
        except OSError as exc:
            if args.trust_anchors is not None:
                reason = exc.strerror or exc
                print(f"error: cannot read the trust anchors {anchors_path}: {reason}", file=sys.stderr)
                return BAD_INPUT
            anchors_path = None  # the configured default does not exist (yet): verify without a trust list
    if anchors is not None:
        try:
            load_trust_anchors(anchors)
        except CheckpointError as exc:
            print(f"error: {anchors_path}: {exc}", file=sys.stderr)
            return BAD_INPUT
    try:
        report = verify_image(data, mime=sniff_mime(args.file, data), trust_anchors_pem=anchors)
    except ProvenanceError as exc:
        print(f"error: {args.file}: {exc}", file=sys.stderr)
        return BAD_INPUT
    if not report.readable:  # junk, not an image: the file cannot be read as one (2), not "unsigned" (1)
        print(f"error: {args.file}: {report.error}", file=sys.stderr)
        return BAD_INPUT
    print(f"{args.file}: {report.summary}")
    if report.has_manifest:
        print(f"signature valid:   {yes_no(report.signature_valid)}")
        trust_list = f" (trust anchors: {anchors_path})" if anchors_path else " (no trust anchors configured)"
        print(f"signer trusted:    {yes_no(report.signer_trusted)}{trust_list}")
        print(f"content intact:    {yes_no(report.content_intact)}")
        print(f"signer:            {report.signer.get('common_name')} (issuer {report.signer.get('issuer')}, "
              f"{report.signer.get('alg')})")
        print(f"manifest:          {report.manifest_id}")
        for failure in report.failures:
            print(f"  {failure['code']}: {failure['explanation']}")
        if report.audit_event_id:
            for line in describe_audit_event(settings, report.audit_event_id, data):
                print(line)
    return OK if report.ok else FAILED
