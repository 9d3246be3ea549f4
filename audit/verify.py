"""Chain verification of the database, of a JSONL export, or of an evidence pack (no database)."""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import IO, Any

from cryptography import x509
from sqlalchemy import select
from sqlalchemy.orm import Session

from audit.chain import Anchor, ChainReport, Link, event_body, verify_fragment_links, verify_links
from audit.checkpoints import CheckedCheckpoints, check_checkpoints, load_trust_anchors
from audit.export import EXPORT_FORMAT, iter_checkpoint_records, iter_event_links
from audit.log import HEAD_ROW_ID
from audit.models import ChainHead


class ExportFileError(ValueError):
    """The file is not an audit export or evidence pack this version can read."""


def _finish(report: ChainReport, checked: CheckedCheckpoints) -> ChainReport:
    report.checkpoints = checked.count
    report.checkpoint_problems = checked.problems
    report.checkpoints_valid = not checked.problems
    report.checkpoint_signers = checked.signers
    report.signers_trusted = checked.signers_trusted
    if report.ok and checked.problems:
        report.ok = False
        report.first_bad_seq = None
        report.reason = checked.problems[0]
    return report


def _anchors(trust_anchors_pem: bytes | str | None) -> list[x509.Certificate] | None:
    return None if trust_anchors_pem is None else load_trust_anchors(trust_anchors_pem)


def verify_database(session: Session, trust_anchors_pem: bytes | str | None = None) -> ChainReport:
    """Verify every event in the database against its neighbours, the signed checkpoints and the head row;
    with `trust_anchors_pem`, checkpoint signers must be issued by one of those roots."""
    checkpoints = list(iter_checkpoint_records(session))
    checked = check_checkpoints(checkpoints, _anchors(trust_anchors_pem))
    anchors: list[Anchor] = list(checked.anchors)
    head = session.scalars(select(ChainHead).where(ChainHead.id == HEAD_ROW_ID)).one_or_none()
    if head is not None and head.seq > 0:
        anchors.append(Anchor(head.seq, head.hash, "the chain_head row"))
    report = verify_links(iter_event_links(session), anchors)
    return _finish(report, checked)


def _records(lines: Iterable[bytes | str], source: str) -> Iterator[dict[str, Any]]:
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        yield _record(line, source, number)


def _record(line: bytes | str, source: str, number: int) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ExportFileError(f"{source} line {number} is not JSON: {exc}") from exc
    if not isinstance(record, dict):
        raise ExportFileError(f"{source} line {number} is not a JSON object")
    return record


# An event line as `event_line` writes it: {"body":<canonical body>,"hash":"<64>","prev_hash":"<64>","type":"event"}
_EVENT_HEAD = b'{"body":'
_HASH_KEY = b',"hash":"'
_PREV_KEY = b'","prev_hash":"'
_EVENT_TAIL = b'","type":"event"}'
_TAIL_LEN = len(_HASH_KEY) + 64 + len(_PREV_KEY) + 64 + len(_EVENT_TAIL)
_SEQ_KEY = b',"seq":'


def _fast_link(line: bytes) -> Link | None:
    """The link of an event line in the exact layout we write, without parsing its JSON; else None.

    Slices are taken as offsets into the line (no copies): this runs once per event of a large export.
    """
    n = len(line)
    body_end = n - _TAIL_LEN
    if not (
        body_end > len(_EVENT_HEAD)
        and line.startswith(_EVENT_HEAD)
        and line.endswith(_EVENT_TAIL)
        and line.startswith(_HASH_KEY, body_end)
        and line.startswith(_PREV_KEY, body_end + 73)
    ):
        return None
    # The top-level seq is the last `,"seq":` in a canonical body: only team and ts (strings, where a quote
    # is always escaped) follow it.
    at = line.rfind(_SEQ_KEY, len(_EVENT_HEAD), body_end)
    end = line.find(b",", at + 7, body_end)
    try:
        seq = int(line[at + 7 : end])
        this_hash = line[body_end + 9 : body_end + 73].decode("ascii")
        prev_hash = line[body_end + 88 : body_end + 152].decode("ascii")
    except (ValueError, UnicodeDecodeError):
        return None
    return Link(seq, prev_hash, this_hash, memoryview(line)[len(_EVENT_HEAD) : body_end], None)


def _slow_link(record: Mapping[str, Any]) -> Link:
    body = record.get("body")
    if not isinstance(body, dict):
        raise ExportFileError(f"event record without a body object: {str(record)[:80]}")
    return Link(body.get("seq"), record.get("prev_hash"), record.get("hash"), None, partial(event_body, body))


def _lines(stream: IO[bytes], chunk_size: int = 1 << 22) -> Iterator[tuple[int, bytes]]:
    """Numbered non-blank lines without their line ending; read in large chunks (fewer calls per line)."""
    number = 0
    rest = b""
    while chunk := stream.read(chunk_size):
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        for line in lines:
            number += 1
            if line.endswith(b"\r"):
                line = line[:-1]
            if line and not line.isspace():
                yield number, line
    if rest and not rest.isspace():
        yield number + 1, rest.rstrip(b"\r")


def _verify_jsonl(
    stream: IO[bytes],
    source: str,
    extra_checkpoints: list[dict[str, Any]],
    trust_anchors: list[x509.Certificate] | None,
) -> ChainReport:
    """One pass: the header, the checkpoints (written before the events), then the events streamed."""
    numbered = _lines(stream)
    first = next(numbered, None)
    header = _record(first[1], source, first[0]) if first is not None else None
    if header is None or header.get("type") != "header" or header.get("format") != EXPORT_FORMAT:
        raise ExportFileError(f"{source} is not a {EXPORT_FORMAT} JSONL file (its first line is no header)")
    checkpoints: list[dict[str, Any]] = list(extra_checkpoints)
    pending: Link | None = None
    for number, line in numbered:
        link = _fast_link(line)
        record = None if link is not None else _record(line, source, number)
        if record is not None and record.get("type") == "checkpoint":
            record.pop("type")
            if record not in checkpoints:
                checkpoints.append(record)
            continue
        pending = link if link is not None else _event_or_fail(record, source, number)
        break
    checked = check_checkpoints(checkpoints, trust_anchors)

    def links() -> Iterator[Link]:
        if pending is None:
            return
        yield pending
        fast_link = _fast_link  # the per-event loop of a large export: keep it lean
        for number, line in numbered:
            yield fast_link(line) or _event_or_fail(_record(line, source, number), source, number)

    if header.get("filters"):
        report = verify_fragment_links(links(), checked.anchors)
    else:
        report = verify_links(links(), checked.anchors)
    return _finish(report, checked)


def _event_or_fail(record: Mapping[str, Any] | None, source: str, number: int) -> Link:
    kind = record.get("type") if record is not None else None
    if record is None or kind != "event":
        where = f"{source} line {number}"
        if kind == "checkpoint":
            raise ExportFileError(f"{where}: a checkpoint after the events (not written by this version)")
        raise ExportFileError(f"{where}: unknown record type {kind!r}")
    return _slow_link(record)


def _manifest_problems(pack: zipfile.ZipFile) -> list[str]:
    try:
        manifest = pack.read("MANIFEST.sha256").decode("utf-8")
    except KeyError:
        return ["the evidence pack has no MANIFEST.sha256"]
    problems = []
    for line in manifest.splitlines():
        digest, _, name = line.partition("  ")
        try:
            actual = hashlib.sha256(pack.read(name)).hexdigest()
        except KeyError:
            problems.append(f"{name} is listed in MANIFEST.sha256 but missing from the pack")
            continue
        if actual != digest:
            problems.append(f"{name} does not match its MANIFEST.sha256 digest")
    return problems


def verify_export(path: Path, trust_anchors_pem: bytes | str | None = None) -> ChainReport:
    """Verify a JSONL export or an evidence pack (zip) with no database; with `trust_anchors_pem`,
    checkpoint signers must be issued by one of those roots (use your own, not the pack's certs/)."""
    trust_anchors = _anchors(trust_anchors_pem)
    if not path.is_file():
        raise ExportFileError(f"{path} does not exist or is not a file")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as pack:
            if "events.jsonl" not in pack.namelist():
                raise ExportFileError(f"{path} is a zip without events.jsonl: not an evidence pack")
            extra: list[dict[str, Any]] = []
            if "checkpoints.jsonl" in pack.namelist():
                with pack.open("checkpoints.jsonl") as stream:
                    extra = list(_records(stream, f"{path.name}:checkpoints.jsonl"))
            with pack.open("events.jsonl") as stream:
                report = _verify_jsonl(stream, f"{path.name}:events.jsonl", extra, trust_anchors)
            problems = _manifest_problems(pack)
        if report.ok and problems:
            report.ok = False
            report.reason = problems[0]
        return report
    with path.open("rb") as stream:
        return _verify_jsonl(stream, path.name, [], trust_anchors)
