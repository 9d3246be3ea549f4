"""`llamagen-gateway audit ...`: verify, export, evidence, checkpoint, erase, reproduce."""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from gateway.settings import Settings, get_settings

OK, FAILED, BAD_INPUT = 0, 1, 2


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    audit = subparsers.add_parser("audit", help="verify, export and prove the audit log")
    sub = audit.add_subparsers(dest="audit_command", required=True)

    p = sub.add_parser("verify", help="verify the hash chain and signed checkpoints")
    p.add_argument("--export", type=Path, metavar="FILE",
                   help="verify a JSONL export or evidence pack (zip) instead; needs no database")
    p.add_argument("--trust-anchors", type=Path, metavar="PEM",
                   help="roots that must have issued the checkpoint signer (default: LLAMAGEN_GATEWAY_TRUST_ANCHORS)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("export", help="stream the audit events as JSONL or CSV")
    p.add_argument("--format", choices=["jsonl", "csv"], default="jsonl")
    p.add_argument("--since", type=parse_time, help="ISO-8601 date or time (UTC unless it says otherwise)")
    p.add_argument("--until", type=parse_time, help="ISO-8601 date or time, exclusive")
    p.add_argument("--team")
    p.add_argument("--action")
    p.add_argument("--job", dest="job_id")
    p.add_argument("-o", "--output", type=Path, help="file to write (default: standard output)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("evidence", help="write an offline-verifiable evidence pack (zip)")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="FILE.zip")
    p.set_defaults(func=cmd_evidence)

    p = sub.add_parser("checkpoint", help="sign the chain head now")
    p.set_defaults(func=cmd_checkpoint)

    p = sub.add_parser("erase", help="erase a prompt's text (GDPR); the erasure is audited")
    p.add_argument("commitment", help="the prompt commitment recorded in the audit events")
    p.add_argument("--reason", required=True, help="e.g. the data subject request reference")
    p.add_argument("--team", default="compliance", help="team recorded as the erasing principal")
    p.set_defaults(func=cmd_erase)

    p = sub.add_parser("reproduce", help="regenerate an image.released event and compare pixel digests")
    p.add_argument("event_id")
    p.set_defaults(func=cmd_reproduce)


def parse_time(value: str) -> datetime:
    """ISO-8601 date or date-time; naive values are UTC."""
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{value!r} is not an ISO-8601 date or time") from exc
    try:
        return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
    except OverflowError as exc:  # 9999-12-31T23:59-05:00 is past the last UTC date Python can hold
        raise argparse.ArgumentTypeError(f"{value!r} is out of range in UTC") from exc


def fail(message: str, code: int = BAD_INPUT) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


@contextmanager
def open_session(settings: Settings) -> Iterator[Session]:
    from audit.db import make_engine, make_session_factory

    engine = make_engine(settings.database_url)
    try:
        with make_session_factory(engine)() as session:
            yield session
    finally:
        engine.dispose()


def principal_key_id() -> str:
    return f"cli:{getpass.getuser()}"


def print_report(report: Any) -> None:
    print(report.summary)
    if report.checkpoint_problems:
        for problem in report.checkpoint_problems:
            print(f"  checkpoint problem: {problem}")
    if report.reason and report.ok:
        print(f"  note: {report.reason}")


def trust_anchors(explicit: Path | None, settings: Settings) -> bytes | None:
    """The PEM bundle checkpoint signers must chain to: --trust-anchors, else the configured file if present."""
    if explicit is not None:
        return explicit.read_bytes()  # a missing explicit file is an error the caller reports
    configured = settings.trust_anchors
    return configured.read_bytes() if configured is not None and configured.is_file() else None


def cmd_verify(args: argparse.Namespace) -> int:
    import sqlite3

    import psycopg

    from audit.checkpoints import CheckpointError
    from audit.verify import ExportFileError, verify_database, verify_export

    settings = get_settings()
    try:
        anchors = trust_anchors(args.trust_anchors, settings)
        if args.export is not None:
            report = verify_export(args.export, anchors)
        else:
            with open_session(settings) as session:
                report = verify_database(session, anchors)
    except (ExportFileError, CheckpointError) as exc:
        return fail(str(exc))
    except OSError as exc:
        return fail(f"cannot read {exc.filename}: {exc.strerror}")
    except SQLAlchemyError as exc:
        return fail(f"cannot read the audit database: {exc.__class__.__name__}: {exc}", FAILED)
    except (ValueError, OverflowError) as exc:  # a stored value the driver cannot convert (say, ts='garbage')
        return fail(f"the audit database holds a value that cannot be read: {exc.__class__.__name__}: {exc}",
                    FAILED)
    except (sqlite3.Error, psycopg.Error) as exc:  # the fast path reads through the driver itself
        return fail(f"cannot read the audit database: {exc.__class__.__name__}: {exc}", FAILED)
    print_report(report)
    return OK if report.ok else FAILED


def cmd_export(args: argparse.Namespace) -> int:
    """Stream the export to stdout, or into `--output` through a temporary sibling renamed at the end: an export
    the database failed part-way leaves no file that could pass for a whole one (on stdout, a JSONL export
    ends with the error line the verifiers report)."""
    from audit.export import ExportFilters, cut_short_line, iter_export

    filters = ExportFilters(since=args.since, until=args.until, team=args.team, action=args.action,
                            job_id=args.job_id)
    partial = None if args.output is None else args.output.with_name(f".{args.output.name}.partial")
    try:
        with open_session(get_settings()) as session:
            chunks = iter_export(session, args.format, filters)
            if partial is None:
                try:
                    for chunk in chunks:
                        sys.stdout.write(chunk)
                except SQLAlchemyError:
                    if args.format == "jsonl":
                        sys.stdout.write(cut_short_line("the audit database failed part-way; see stderr"))
                    raise
            else:
                with partial.open("w", encoding="utf-8", newline="") as out:
                    for chunk in chunks:
                        out.write(chunk)
                partial.replace(args.output)
                print(f"wrote {args.output}", file=sys.stderr)
    except SQLAlchemyError as exc:
        return fail(f"cannot read the audit database: {exc}", FAILED)
    except OSError as exc:
        return fail(f"cannot write {args.output}: {exc.strerror or exc}")
    finally:
        if partial is not None:
            partial.unlink(missing_ok=True)
    return OK


def _public_certs(settings: Settings) -> list[Path]:
    candidates = [settings.signing_cert, settings.trust_anchors]
    return [path for path in candidates if path is not None and path.is_file()]


def cmd_evidence(args: argparse.Namespace) -> int:
    from audit.export import write_evidence_pack
    from audit.verify import verify_export

    settings = get_settings()
    try:
        with open_session(settings) as session:
            path = write_evidence_pack(session, args.output, _public_certs(settings))
    except SQLAlchemyError as exc:
        return fail(f"cannot read the audit database: {exc}", FAILED)
    except OSError as exc:
        return fail(f"cannot write {args.output}: {exc.strerror or exc}")
    report = verify_export(path, trust_anchors(None, settings))
    print(f"wrote {path}")
    print_report(report)
    return OK if report.ok else FAILED


def _ensure_signing_files(settings: Settings) -> tuple[Path, Path]:
    if settings.uses_dev_ca:
        from audit.provenance import ensure_dev_ca

        ensure_dev_ca(settings.dev_ca_dir, settings.signing_alg)
    if settings.signing_cert is None or settings.signing_key is None:
        raise ValueError("LLAMAGEN_GATEWAY_SIGNING_CERT and LLAMAGEN_GATEWAY_SIGNING_KEY are not set")
    return settings.signing_cert, settings.signing_key


def cmd_checkpoint(args: argparse.Namespace) -> int:
    from audit.checkpoints import CheckpointError, write_checkpoint

    settings = get_settings()
    try:
        cert, key = _ensure_signing_files(settings)
        cert_pem, key_pem = cert.read_bytes(), key.read_bytes()
        with open_session(settings) as session, session.begin():
            checkpoint = write_checkpoint(session, key_pem, cert_pem)
    except (CheckpointError, ValueError) as exc:
        return fail(str(exc))
    except OSError as exc:
        return fail(f"cannot read the signing files: {exc}")
    except SQLAlchemyError as exc:
        return fail(f"cannot write to the audit database: {exc}", FAILED)
    print(f"signed checkpoint at seq {checkpoint.seq} (head {checkpoint.head_hash[:16]}…, {checkpoint.alg})")
    return OK


def cmd_erase(args: argparse.Namespace) -> int:
    from audit.privacy import PrivacyError, erase_prompt

    try:
        with open_session(get_settings()) as session, session.begin():
            event = erase_prompt(session, args.commitment, key_id=principal_key_id(), team=args.team,
                                 reason=args.reason)
    except PrivacyError as exc:
        return fail(str(exc))
    except SQLAlchemyError as exc:
        return fail(f"cannot write to the audit database: {exc}", FAILED)
    print(f"erased prompt {args.commitment}; recorded as audit event {event.id} (seq {event.seq})")
    return OK


def cmd_reproduce(args: argparse.Namespace) -> int:
    from generator.llamagen import configure_runtime
    from generator.pipeline import PipelineError, reproduce_event

    configure_runtime()  # torch as the workers set it (TF32 matmuls on CUDA); threads come from the event
    settings = get_settings()
    try:
        with open_session(settings) as session:
            result = reproduce_event(session, args.event_id, settings)
    except PipelineError as exc:
        return fail(str(exc))
    except SQLAlchemyError as exc:
        return fail(f"cannot read the audit database: {exc}", FAILED)
    print(f"event {result['event_id']}")
    print(f"  recorded pixel digest:    {result['recorded_pixel_sha256']}")
    print(f"  regenerated pixel digest: {result['regenerated_pixel_sha256']}")
    if result.get("decode_layout"):
        print(f"  decode layout:            {result['decode_layout']}")
    if result["match"]:
        print(f"MATCH: the image was regenerated bit for bit on {result.get('device', 'this device')}")
        return OK
    print("MISMATCH: the regenerated pixels differ (different hardware class or altered record)")
    return FAILED
