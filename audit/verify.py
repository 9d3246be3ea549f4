"""Chain verification of the database, of a JSONL export, or of an evidence pack (no database)."""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from audit.chain import Anchor, ChainReport, verify_chain, verify_fragments
from audit.checkpoints import check_checkpoints
from audit.export import EXPORT_FORMAT, iter_checkpoint_records, iter_event_records
from audit.log import HEAD_ROW_ID
from audit.models import ChainHead


class ExportFileError(ValueError):
    """The file is not an audit export or evidence pack this version can read."""


def _finish(report: ChainReport, checkpoints: list[Mapping[str, Any]], problems: list[str]) -> ChainReport:
    report.checkpoints = len(checkpoints)
    report.checkpoint_problems = problems
    report.checkpoints_valid = not problems
    if report.ok and problems:
        report.ok = False
        report.first_bad_seq = None
        report.reason = problems[0]
    return report


def verify_database(session: Session) -> ChainReport:
    """Verify every event in the database against its neighbours, the signed checkpoints and the head row."""
    checkpoints = list(iter_checkpoint_records(session))
    checked = check_checkpoints(checkpoints)
    anchors: list[Anchor] = list(checked.anchors)
    head = session.scalars(select(ChainHead).where(ChainHead.id == HEAD_ROW_ID)).one_or_none()
    if head is not None and head.seq > 0:
        anchors.append(Anchor(head.seq, head.hash, "the chain_head row"))
    report = verify_chain(iter_event_records(session), anchors)
    return _finish(report, checkpoints, checked.problems)


def _records(lines: Iterable[bytes | str], source: str) -> Iterator[dict[str, Any]]:
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ExportFileError(f"{source} line {number} is not JSON: {exc}") from exc
        if not isinstance(record, dict):
            raise ExportFileError(f"{source} line {number} is not a JSON object")
        yield record


def _verify_jsonl(stream: IO[bytes], source: str, extra_checkpoints: list[dict[str, Any]]) -> ChainReport:
    records = _records(stream, source)
    header = next(records, None)
    if header is None or header.get("type") != "header" or header.get("format") != EXPORT_FORMAT:
        raise ExportFileError(f"{source} is not a {EXPORT_FORMAT} JSONL file (its first line is no header)")
    events: list[dict[str, Any]] = []
    checkpoints: list[dict[str, Any]] = list(extra_checkpoints)
    for record in records:
        kind = record.pop("type", None)
        if kind == "event":
            events.append(record)
        elif kind == "checkpoint" and record not in checkpoints:
            checkpoints.append(record)
        elif kind not in ("event", "checkpoint"):
            raise ExportFileError(f"{source}: unknown record type {kind!r}")
    checked = check_checkpoints(checkpoints)
    if header.get("filters"):
        report = verify_fragments(events, checked.anchors)
    else:
        report = verify_chain(events, checked.anchors)
    return _finish(report, checkpoints, checked.problems)


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


def verify_export(path: Path) -> ChainReport:
    """Verify a JSONL export or an evidence pack (zip) with no database."""
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
                report = _verify_jsonl(stream, f"{path.name}:events.jsonl", extra)
            problems = _manifest_problems(pack)
        if report.ok and problems:
            report.ok = False
            report.reason = problems[0]
        return report
    with path.open("rb") as stream:
        return _verify_jsonl(stream, path.name, [])
