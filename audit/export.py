"""Streaming JSONL/CSV exports of the chain, and the offline-verifiable evidence pack (zip)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import struct
import zipfile
from collections.abc import Generator, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import Select, Text, cast, select
from sqlalchemy.orm import Session

from audit.chain import (
    ChainBrokenError,
    Link,
    body_bytes,
    canonical_json,
    format_ts,
    loads_strict,
    parse_body,
    raw_body_verifies,
    raw_event_hash,
)
from audit.checkpoints import checkpoint_record
from audit.models import AuditEvent, ChainCheckpoint, ModelCardRecord, PolicyRevision, PromptText

EXPORT_FORMAT = "llamagen-gateway.audit-export"
EXPORT_VERSION = 1
CSV_COLUMNS = ("seq", "id", "ts", "action", "key_id", "team", "job_id", "payload", "prev_hash", "hash")
BATCH = 1000
HOW_TO_VERIFY = Path(__file__).with_name("HOW-TO-VERIFY.txt")
OFFLINE_VERIFIER = Path(__file__).with_name("offline_verifier.py")

ExportFormat = Literal["jsonl", "csv"]


class ExportError(ValueError):
    """An export request or file is unusable (unknown format, bad filter)."""


@dataclass(frozen=True)
class ExportFilters:
    """Which events to export; an empty filter exports the whole chain (which then verifies end to end)."""

    since: datetime | None = None
    until: datetime | None = None
    team: str | None = None
    action: str | None = None
    job_id: str | None = None

    @property
    def empty(self) -> bool:
        return all(value is None for value in asdict(self).values())

    def to_dict(self) -> dict[str, Any]:
        return {
            name: format_ts(value) if isinstance(value, datetime) else value
            for name, value in asdict(self).items()
            if value is not None
        }

    def apply(self, query: Select[Any]) -> Select[Any]:
        if self.since is not None:
            query = query.where(AuditEvent.ts >= self.since)
        if self.until is not None:
            query = query.where(AuditEvent.ts < self.until)
        if self.team is not None:
            query = query.where(AuditEvent.team == self.team)
        if self.action is not None:
            query = query.where(AuditEvent.action == self.action)
        if self.job_id is not None:
            query = query.where(AuditEvent.job_id == self.job_id)
        return query


def event_record(row: Mapping[Any, Any]) -> dict[str, Any]:
    """An audit_events row as the JSON record exports carry (ts as canonical UTC text)."""
    return {
        "seq": row["seq"],
        "id": row["id"],
        "ts": format_ts(row["ts"]),
        "action": row["action"],
        "key_id": row["key_id"],
        "team": row["team"],
        "job_id": row["job_id"],
        "payload": row["payload"],
        "prev_hash": row["prev_hash"],
        "hash": row["hash"],
    }


def iter_event_records(session: Session, filters: ExportFilters | None = None) -> Iterator[dict[str, Any]]:
    """Events in seq order, streamed from the database in batches."""
    query = (filters or ExportFilters()).apply(select(AuditEvent.__table__)).order_by(AuditEvent.seq)
    for row in session.execute(query.execution_options(yield_per=BATCH)).mappings():
        yield event_record(row)


def _parsed_body(row: Any, ts: str) -> dict[str, Any]:
    try:
        payload = loads_strict(row.payload_json)
    except (ValueError, RecursionError) as exc:  # a stored payload that is not JSON, or repeats a key
        raise ChainBrokenError(f"the stored payload is not valid JSON: {exc}", row.seq) from None
    return {"seq": row.seq, "id": row.id, "ts": ts, "action": row.action, "key_id": row.key_id,
            "team": row.team, "job_id": row.job_id, "payload": payload}


def iter_event_links(
    session: Session, filters: ExportFilters | None = None, start_seq: int = 1
) -> Generator[Link, None, None]:
    """Events from `start_seq` in seq order as chain links carrying their stored canonical bytes (no JSON
    decoding)."""
    columns = [c for c in AuditEvent.__table__.columns if c.name != "payload"]
    query = select(*columns, cast(AuditEvent.payload, Text).label("payload_json"))
    query = (filters or ExportFilters()).apply(query).where(AuditEvent.seq >= start_seq).order_by(AuditEvent.seq)
    for row in session.execute(query.execution_options(yield_per=BATCH)):
        ts = format_ts(row.ts)
        raw = body_bytes(seq=row.seq, id=row.id, ts=ts, action=row.action, key_id=row.key_id, team=row.team,
                         job_id=row.job_id, payload_json=row.payload_json)
        yield Link(row.seq, row.prev_hash, row.hash, raw, partial(_parsed_body, row, ts))


# An event body as the database itself writes it from the row: strings JSON-quoted by the database
# (`to_json`, `json_quote`), the payload as stored, `ts` as canonical text (PostgreSQL keeps timestamptz;
# SQLite keeps the naive UTC text "2026-01-31 12:00:00.000000"). Formatting in Python was most of a
# verification. In three pieces, so the 1-2 KB payload is not copied into a new string by the database; a
# NULL (which no event has) makes its piece empty, so the hash will not match.
_BODY_PIECES = {
    "postgresql": """coalesce('{"action":' || to_json(action) || ',"id":' || to_json(id) || ',"job_id":'
        || coalesce(to_json(job_id)::text, 'null') || ',"key_id":' || to_json(key_id) || ',"payload":', ''),
        coalesce(payload::text, ''),
        coalesce(',"seq":' || seq || ',"team":' || to_json(team) || ',"ts":"'
        || to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') || '"}', '')""",
    "sqlite": """coalesce('{"action":' || json_quote(action) || ',"id":' || json_quote(id) || ',"job_id":'
        || json_quote(job_id) || ',"key_id":' || json_quote(key_id) || ',"payload":', ''),
        CAST(coalesce(payload, '') AS BLOB),
        coalesce(',"seq":' || seq || ',"team":' || json_quote(team) || ',"ts":"' || replace(ts, ' ', 'T')
        || 'Z"}', '')""",
}
STORED_BATCH = 10_000
# (seq, prev_hash, hash, body, whether sha256(prev_hash "\n" body) is the row's hash): hashed as the rows are
# read, so on PostgreSQL the hashing overlaps the server writing the rest of the batch.
StoredRow = tuple[int, str, str, bytes, bool]


def stored_body_batches(session: Session, start_seq: int = 1) -> Iterator[list[StoredRow]] | None:
    """The whole chain from `start_seq` as batches of `StoredRow`s, the body written by the database from the
    stored columns; None on a database without this path.

    A body is only what the database's own text makes of the row: where it does not hash to the row's hash,
    the caller verifies that event the general way (`iter_event_links`), which decides. Each batch is read
    to its end before it is yielded, so the caller may query in between.
    """
    dialect = session.get_bind().dialect.name
    if dialect not in _BODY_PIECES:
        return None
    driver = session.connection().connection.driver_connection
    read = _postgres_batch if dialect == "postgresql" else _sqlite_batch
    columns = f"seq, prev_hash, hash, {_BODY_PIECES[dialect]}"

    def batches() -> Iterator[list[StoredRow]]:
        start = start_seq
        while rows := read(driver, columns, start):
            yield rows
            start = rows[-1][0] + 1

    return batches()


def _sqlite_batch(connection: Any, columns: str, start: int) -> list[StoredRow]:
    query = f"SELECT {columns} FROM audit_events WHERE seq >= ? ORDER BY seq LIMIT ?"
    return [_stored(seq, prev_hash, this_hash, b"".join((head.encode(), payload, tail.encode())))
            for seq, prev_hash, this_hash, head, payload, tail in connection.execute(query, (start, STORED_BATCH))]


def _stored(seq: int, prev_hash: str, this_hash: str, body: bytes) -> StoredRow:
    try:
        hashed = raw_event_hash(prev_hash, body) == this_hash
    except UnicodeEncodeError:  # a prev_hash edited to non-hex text
        hashed = False
    return seq, prev_hash, this_hash, body, hashed


_COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00"
_COPY_HEADER = len(_COPY_SIGNATURE) + 8  # then 4 bytes of flags and 4 of header extension (none)
# A binary COPY row up to the head piece's length: the field count, then each field's length and bytes (seq a
# bigint, the hashes 64 hex digits as stored; a row off this layout is read field by field).
_ROW_START = struct.Struct(">hiqi64si64si")
_ROW_LAYOUT = (6, 8, 64, 64)


def _postgres_batch(connection: Any, columns: str, start: int) -> list[StoredRow]:
    """One batch through binary COPY: the server streams rows while they are read."""
    query = (f"COPY (SELECT {columns} FROM audit_events WHERE seq >= {int(start)} ORDER BY seq "
             f"LIMIT {STORED_BATCH}) TO STDOUT (FORMAT binary)")
    rows: list[StoredRow] = []
    with connection.cursor() as cursor, cursor.copy(query) as copy:
        for data in copy:
            if data[: len(_COPY_SIGNATURE)] == _COPY_SIGNATURE:
                data = data[_COPY_HEADER:]
            if len(data) > 2:  # not the trailer
                rows.append(_copy_row(data))
    return rows


def _copy_row(data: memoryview) -> StoredRow:
    """(seq, prev_hash, hash, body) from one binary COPY row of `seq, prev_hash, hash, head, payload, tail`
    (no field is NULL: the query makes sure)."""
    count, seq_size, seq, prev_size, prev_hash, hash_size, this_hash, head_size = _ROW_START.unpack_from(data)
    if (count, seq_size, prev_size, hash_size) != _ROW_LAYOUT:
        return _copy_row_by_fields(data)
    payload_at = _ROW_START.size + head_size + 4
    tail_at = payload_at + int.from_bytes(data[payload_at - 4 : payload_at], "big") + 4
    body = b"".join((data[_ROW_START.size : payload_at - 4], data[payload_at : tail_at - 4], data[tail_at:]))
    return _stored(seq, prev_hash.decode(), this_hash.decode(), body)


def _copy_row_by_fields(data: memoryview) -> StoredRow:
    """`_copy_row` for a row off the usual layout (a hash edited to another length)."""
    fields: list[bytes] = []
    at = 2
    for _ in range(6):
        size = int.from_bytes(data[at : at + 4], "big", signed=True)
        fields.append(bytes(data[at + 4 : at + 4 + max(size, 0)]))
        at += 4 + max(size, 0)
    seq, prev_hash, this_hash, *body = fields
    return _stored(int.from_bytes(seq, "big", signed=True), prev_hash.decode(), this_hash.decode(), b"".join(body))


def event_line(link: Link) -> bytes:
    """One JSONL export line: the canonical body, then the two hashes (keys sorted, so the body's bytes
    appear verbatim and a verifier can hash them without parsing)."""
    if link.raw_body is not None and raw_body_verifies(link, str(link.prev_hash)):
        body = bytes(link.raw_body)  # the stored bytes are the hashed ones: export them verbatim
    else:
        body = canonical_json(link.body() if link.body is not None else parse_body(link.raw_body)).encode()
    return _line(body, str(link.hash), str(link.prev_hash))


def _line(body: bytes, this_hash: str, prev_hash: str) -> bytes:
    return b"".join((b'{"body":', body, b',"hash":"', this_hash.encode("ascii"), b'","prev_hash":"',
                     prev_hash.encode("ascii"), b'","type":"event"}\n'))


def _event_lines(session: Session, filters: ExportFilters) -> Iterator[bytes]:
    """The export lines of the events; a whole-chain export takes each body from the row's text when that
    is exactly what its hash covers, and re-encodes only the rest (as `event_line` does)."""
    batches = stored_body_batches(session) if filters.empty else None
    if batches is None:
        for link in iter_event_links(session, filters):
            yield event_line(link)
        return
    for rows in batches:
        for seq, prev_hash, this_hash, body, hashed in rows:
            if hashed:
                yield _line(body, this_hash, prev_hash)
                continue
            links = iter_event_links(session, ExportFilters(), start_seq=seq)
            try:
                yield event_line(next(links))
            finally:
                links.close()


def iter_checkpoint_records(session: Session) -> Iterator[dict[str, Any]]:
    for checkpoint in session.scalars(select(ChainCheckpoint).order_by(ChainCheckpoint.id)):
        yield checkpoint_record(checkpoint)


def _batched_lines(lines: Iterable[str]) -> Iterator[str]:
    chunk: list[str] = []
    for line in lines:
        chunk.append(line)
        if len(chunk) >= BATCH:
            yield "".join(chunk)
            chunk = []
    if chunk:
        yield "".join(chunk)


def _jsonl_lines(session: Session, filters: ExportFilters) -> Iterator[str]:
    header = {
        "type": "header",
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "exported_at": format_ts(datetime.now(UTC)),
        "filters": filters.to_dict(),
    }
    yield canonical_json(header) + "\n"
    # Checkpoints first: a verifier reading the file once has its anchors before the events.
    for checkpoint in iter_checkpoint_records(session):
        yield canonical_json({"type": "checkpoint", **checkpoint}) + "\n"
    for line in _event_lines(session, filters):
        yield line.decode("utf-8")


def cut_short_line(message: str) -> str:
    """The last line of a JSONL export the server could not finish: verifiers report it, so that what came
    before it is never taken for the whole export."""
    return canonical_json({"type": "error", "message": message}) + "\n"


def _csv_lines(session: Session, filters: ExportFilters) -> Iterator[str]:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for record in iter_event_records(session, filters):
        writer.writerow([canonical_json(record["payload"]) if name == "payload" else record[name]
                         for name in CSV_COLUMNS])
        if buffer.tell() > 64_000:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()


def iter_export(
    session: Session, fmt: ExportFormat = "jsonl", filters: ExportFilters | None = None
) -> Iterator[str]:
    """Text chunks of an export, streamed (JSONL: header, checkpoints, events; CSV: events only)."""
    chosen = filters or ExportFilters()
    if fmt == "jsonl":
        return _batched_lines(_jsonl_lines(session, chosen))
    if fmt == "csv":
        return _csv_lines(session, chosen)
    raise ExportError(f"unknown export format {fmt!r}: use 'jsonl' or 'csv'")


def write_evidence_pack(
    session: Session,
    path: Path,
    certs: Iterable[Path],
    policy_revisions: Iterable[PolicyRevision] | None = None,
    model_cards: Iterable[ModelCardRecord] | None = None,
) -> Path:
    """Write a zip an auditor can verify with no database: the whole chain, checkpoints, policies,
    model cards, public certificates, erasable prompt texts still held, a SHA-256 manifest,
    HOW-TO-VERIFY.txt and a standard-library chain checker. Revisions and cards default to all stored.
    """
    revisions = list(policy_revisions) if policy_revisions is not None else list(
        session.scalars(select(PolicyRevision).order_by(PolicyRevision.created_at))
    )
    cards = list(model_cards) if model_cards is not None else list(
        session.scalars(select(ModelCardRecord).order_by(ModelCardRecord.recorded_at))
    )
    digests: dict[str, str] = {}
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as pack:

        def put(name: str, data: str | bytes) -> None:
            raw = data.encode("utf-8") if isinstance(data, str) else data
            digests[name] = hashlib.sha256(raw).hexdigest()
            pack.writestr(name, raw)

        put("events.jsonl", "".join(iter_export(session, "jsonl")))
        put("checkpoints.jsonl", "".join(canonical_json(c) + "\n" for c in iter_checkpoint_records(session)))
        for revision in revisions:
            put(f"policy_revisions/{revision.revision}.yaml", revision.source)
        put("policy_revisions.json", json.dumps([_revision_meta(r) for r in revisions], indent=2))
        put("model_cards.json", json.dumps([_card_record(c) for c in cards], indent=2, sort_keys=True))
        held = session.scalars(select(PromptText).where(PromptText.text.is_not(None)))
        prompts = ({"commitment": p.commitment, "salt": p.salt, "text": p.text} for p in held)
        put("prompts.jsonl", "".join(canonical_json(prompt) + "\n" for prompt in prompts))
        for cert in certs:
            put(f"certs/{cert.name}", cert.read_bytes())
        put("HOW-TO-VERIFY.txt", HOW_TO_VERIFY.read_text(encoding="utf-8"))
        put("verify_chain.py", OFFLINE_VERIFIER.read_text(encoding="utf-8"))
        manifest = "".join(f"{digest}  {name}\n" for name, digest in sorted(digests.items()))
        pack.writestr("MANIFEST.sha256", manifest)
    return path


def _revision_meta(revision: PolicyRevision) -> dict[str, Any]:
    return {
        "revision": revision.revision,
        "policy_id": revision.policy_id,
        "version": revision.version,
        "author": revision.author,
        "reason": revision.reason,
        "created_at": format_ts(revision.created_at),
        "active": revision.active,
        "scope": revision.scope,
        "file": f"policy_revisions/{revision.revision}.yaml",
    }


def _card_record(card: ModelCardRecord) -> dict[str, Any]:
    return {
        "content_hash": card.content_hash,
        "name": card.name,
        "version": card.version,
        "recorded_at": format_ts(card.recorded_at),
        "card": card.card,
    }
