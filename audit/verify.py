"""Chain verification of the database, of a JSONL export, or of an evidence pack (no database)."""

from __future__ import annotations

import hashlib
import json
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import IO, Any, NamedTuple

from cryptography import x509
from sqlalchemy import select
from sqlalchemy.orm import Session

from audit.chain import (
    GENESIS_HASH,
    Anchor,
    ChainReport,
    Link,
    event_body,
    loads_strict,
    verify_fragment_links,
    verify_links,
)
from audit.checkpoints import CheckedCheckpoints, check_checkpoints, load_trust_anchors
from audit.export import EXPORT_FORMAT, EXPORT_VERSION, iter_checkpoint_records, iter_event_links, stored_body_batches
from audit.line_scan import (
    HASH_KEY,
    HEAD,
    PARALLEL_MIN_BYTES,
    PREV_KEY,
    SEQ_KEY,
    TAIL,
    TAIL_LEN,
    Scan,
    default_workers,
    scan,
    scan_file_parallel,
    scan_file_range,
)
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
    return _finish(verify_stored_chain(session, anchors), checked)


def verify_stored_chain(session: Session, anchors: list[Anchor]) -> ChainReport:
    """`verify_links` over the database's events, fast: each body is written by the database from the row
    and hashed here (no datetimes, no JSON in Python). At the first event that does not verify that way, the
    general path takes over from there, so what is reported (and accepted) is exactly what `verify_links` reports."""
    batches = stored_body_batches(session)
    if batches is None:
        return verify_links(iter_event_links(session), anchors)
    signed: dict[int, set[str]] = {}
    for anchor in anchors:
        signed.setdefault(anchor.seq, set()).add(anchor.head_hash)
    expected, prev = 1, GENESIS_HASH
    for rows in batches:
        for seq, prev_hash, this_hash, _, hashed in rows:
            if (
                seq != expected
                or prev_hash != prev
                or not hashed
                or (seq in signed and signed[seq] != {this_hash})
            ):
                return verify_links(iter_event_links(session, start_seq=expected), anchors, start_seq=expected,
                                    start_prev_hash=prev)
            prev = this_hash
            expected += 1
    return verify_links((), anchors, start_seq=expected, start_prev_hash=prev)


def _records(lines: Iterable[bytes | str], source: str) -> Iterator[dict[str, Any]]:
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        yield _record(line, source, number)


def _record(line: bytes | str, source: str, number: int) -> dict[str, Any]:
    try:
        record = loads_strict(line)
    except UnicodeDecodeError as exc:
        raise ExportFileError(f"{source} line {number} is not UTF-8 text: {exc.reason}") from exc
    except json.JSONDecodeError as exc:
        raise ExportFileError(f"{source} line {number} is not JSON: {exc}") from None
    except (ValueError, RecursionError) as exc:  # a key given twice, absurd nesting
        raise ExportFileError(f"{source} line {number} cannot be evidence: {exc or 'it nests too deeply'}") from None
    if not isinstance(record, dict):
        raise ExportFileError(f"{source} line {number} is not a JSON object")
    return record


# An event line as `event_line` writes it: {"body":<canonical body>,"hash":"<64>","prev_hash":"<64>","type":"event"}
# (the layout constants live in audit.line_scan, the fast path over the same bytes)
_CHUNK = 1 << 22


def _fast_link(line: bytes) -> Link | None:
    """The link of an event line in the exact layout we write, without parsing its JSON; else None.

    Slices are taken as offsets into the line (no copies): this runs once per event of a large export.
    """
    n = len(line)
    body_end = n - TAIL_LEN
    if not (
        body_end > len(HEAD)
        and line.startswith(HEAD)
        and line.endswith(TAIL)
        and line.startswith(HASH_KEY, body_end)
        and line.startswith(PREV_KEY, body_end + 73)
    ):
        return None
    # The top-level seq is the last `,"seq":` in a canonical body: only team and ts (strings, where a quote
    # is always escaped) follow it.
    at = line.rfind(SEQ_KEY, len(HEAD), body_end)
    end = line.find(b",", at + 7, body_end)
    try:
        seq = int(line[at + 7 : end])
        this_hash = line[body_end + 9 : body_end + 73].decode("ascii")
        prev_hash = line[body_end + 88 : body_end + 152].decode("ascii")
    except (ValueError, UnicodeDecodeError):
        return None
    return Link(seq, prev_hash, this_hash, memoryview(line)[len(HEAD) : body_end], None)


def _slow_link(record: Mapping[str, Any]) -> Link:
    body = record.get("body")
    if not isinstance(body, dict):
        raise ExportFileError(f"event record without a body object: {str(record)[:80]}")
    return Link(body.get("seq"), record.get("prev_hash"), record.get("hash"), None, partial(event_body, body))


def _lines(
    stream: IO[bytes], first: bytes = b"", number: int = 0, chunk_size: int = _CHUNK
) -> Iterator[tuple[int, bytes]]:
    """Numbered non-blank lines without their line ending (`first`: bytes already read, `number`: lines
    before them); read in large chunks (fewer calls per line)."""
    rest = first
    while chunk := stream.read(chunk_size):
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        for line in lines:
            number += 1
            if line.endswith(b"\r"):
                line = line[:-1]
            if line and not line.isspace():
                yield number, line
    for line in rest.split(b"\n"):  # `first` may hold several lines and no chunk follows
        number += 1
        line = line.rstrip(b"\r")
        if line and not line.isspace():
            yield number, line


class _Prefix(NamedTuple):
    """What comes before the events: the header, the checkpoints, and where the events begin."""

    header: dict[str, Any]
    checkpoints: list[dict[str, Any]]
    rest: bytes  # read already: from the first event line on
    offset: int  # of the first event line in the stream
    lines: int  # lines before it


def _read_prefix(stream: IO[bytes], source: str) -> _Prefix:
    """Read the header and the checkpoint records (written before the events) up to the first event."""
    buf, pos, base, number, eof = b"", 0, 0, 0, False
    header: dict[str, Any] | None = None
    checkpoints: list[dict[str, Any]] = []
    while True:
        newline = buf.find(b"\n", pos)
        if newline < 0 and not eof:
            more = stream.read(_CHUNK)
            base, buf, pos = base + pos, buf[pos:] + more, 0
            eof = not more
            continue
        end = newline if newline >= 0 else len(buf)
        if newline < 0 and pos >= end:
            break  # the end of the file
        line = buf[pos:end].rstrip(b"\r")
        if line.strip():
            if header is None:
                header = _record(line, source, number + 1)
                if header.get("type") != "header" or header.get("format") != EXPORT_FORMAT:
                    break
            elif line.startswith(HEAD):
                break  # the events begin here
            else:
                record = _record(line, source, number + 1)
                if record.get("type") != "checkpoint":
                    break  # an event in another layout, or junk: the events path reports it
                record.pop("type")
                checkpoints.append(record)
        number += 1
        pos = end + 1
    if header is None or header.get("type") != "header" or header.get("format") != EXPORT_FORMAT:
        raise ExportFileError(f"{source} is not a {EXPORT_FORMAT} JSONL file (its first line is no header)")
    if header.get("version") != EXPORT_VERSION:
        raise ExportFileError(f"{source} is version {header.get('version')!r} of {EXPORT_FORMAT}; this "
                              f"verifier reads version {EXPORT_VERSION}")
    return _Prefix(header, checkpoints, buf[pos:], base + pos, number)


def _general_links(lines: Iterator[tuple[int, bytes]], source: str) -> Iterator[Link]:
    fast_link = _fast_link  # the per-event loop of a large export: keep it lean
    for number, line in lines:
        yield fast_link(line) or _event_or_fail(_record(line, source, number), source, number)


class _ScanState(NamedTuple):
    seq: int
    prev: bytes
    lines: int


def _advance(state: _ScanState, result: Scan) -> _ScanState:
    if result.count == 0:
        return _ScanState(state.seq, state.prev, state.lines + result.lines)
    assert result.last_seq is not None and result.last_hash is not None
    return _ScanState(result.last_seq + 1, result.last_hash, state.lines + result.lines)


def _scan_stream(prefix: _Prefix, stream: IO[bytes], anchors: dict[int, frozenset[bytes]]
                 ) -> tuple[_ScanState, bytes]:
    """Fast-scan the events as they are read; returns the state and the bytes from the first line the
    scan could not vouch for (empty when it verified everything)."""
    state = _ScanState(1, GENESIS_HASH.encode(), prefix.lines)
    buf = prefix.rest
    while True:
        more = stream.read(_CHUNK)
        buf = buf + more if more else buf
        cut = buf.rfind(b"\n") + 1 if more else len(buf)
        result = scan(buf, 0, cut, state.seq, state.prev, anchors)
        state = _advance(state, result)
        if not result.complete:
            return state, buf[result.stop :]
        buf = buf[cut:]
        if not more:
            return state, b""


def _scan_file(prefix: _Prefix, path: Path, anchors: dict[int, frozenset[bytes]], workers: int
               ) -> tuple[_ScanState, int]:
    """Fast-scan the events of a file in `workers` processes; the chunks are joined in order, checking
    each chunk's first seq and prev_hash against the chunk before. Returns the state and the offset of the
    first line not verified (the file size when all were)."""
    size = path.stat().st_size
    state = _ScanState(1, GENESIS_HASH.encode(), prefix.lines)
    for chunk in scan_file_parallel(path, prefix.offset, size, anchors, workers):
        seam_ok = chunk.count == 0 or (chunk.first_seq == state.seq and chunk.first_prev == state.prev)
        if chunk.complete and seam_ok:
            state = _advance(state, chunk)
            continue
        # Everything before this chunk verified: rescan it from its start with the real state.
        result = scan_file_range(path, chunk.start, chunk.end, state.seq, state.prev, anchors)
        state = _advance(state, result)
        if not result.complete:
            return state, result.stop
    return state, size


def _verify_jsonl(
    stream: IO[bytes],
    source: str,
    extra_checkpoints: list[dict[str, Any]],
    trust_anchors: list[x509.Certificate] | None,
    path: Path | None = None,
    workers: int = 1,
    whole_chain: bool = False,
) -> ChainReport:
    """One pass: the header, the checkpoints (written before the events), then the events streamed.

    Events in our own layout are verified from their bytes (`audit.line_scan`), split across `workers`
    processes when `path` names a large plain file; from the first line that scan cannot vouch for, the
    general path takes over, so it is what names a problem.
    """
    prefix = _read_prefix(stream, source)
    checkpoints: list[dict[str, Any]] = list(extra_checkpoints)
    checkpoints += [record for record in prefix.checkpoints if record not in checkpoints]
    checked = check_checkpoints(checkpoints, trust_anchors)
    if prefix.header.get("filters"):
        if whole_chain:
            raise ExportFileError(f"{source}: its header says it is filtered, and an evidence pack holds the "
                                  "whole chain")
        links = _general_links(_lines(stream, prefix.rest, prefix.lines), source)
        return _trusted(_finish(verify_fragment_links(links, checked.anchors), checked), checked, trust_anchors)
    anchors: dict[int, frozenset[bytes]] = {}
    for anchor in checked.anchors:
        anchors[anchor.seq] = anchors.get(anchor.seq, frozenset()) | {anchor.head_hash.encode()}
    events_size = path.stat().st_size - prefix.offset if path is not None else 0
    if path is not None and workers > 1 and events_size >= PARALLEL_MIN_BYTES:
        state, stop = _scan_file(prefix, path, anchors, workers)
        stream.seek(stop)
        rest = b""
    else:
        state, rest = _scan_stream(prefix, stream, anchors)
    links = _general_links(_lines(stream, rest, state.lines), source)
    report = verify_links(links, checked.anchors, start_prev_hash=state.prev.decode("ascii"),
                          start_seq=state.seq)
    return _trusted(_finish(report, checked), checked, trust_anchors)


def _trusted(report: ChainReport, checked: CheckedCheckpoints,
             trust_anchors: list[x509.Certificate] | None) -> ChainReport:
    """With trust anchors, an export must carry at least one checkpoint they vouch for: without one, whoever
    holds the file could have rewritten every event and recomputed every hash."""
    if report.ok and trust_anchors is not None and report.count and not checked.anchors:
        report.ok = False
        report.first_bad_seq = None
        report.reason = ("no checkpoint signed by a trusted signer: without one the whole chain could have been "
                         "rewritten (export after `audit checkpoint`)")
    return report


def _event_or_fail(record: Mapping[str, Any] | None, source: str, number: int) -> Link:
    kind = record.get("type") if record is not None else None
    if record is None or kind != "event":
        where = f"{source} line {number}"
        if kind == "checkpoint":
            raise ExportFileError(f"{where}: a checkpoint after the events (not written by this version)")
        if kind == "error":
            raise ExportFileError(f"{where}: the export was cut short: {record.get('message')}")
        raise ExportFileError(f"{where}: unknown record type {kind!r}")
    return _slow_link(record)


def _manifest_problems(pack: zipfile.ZipFile) -> list[str]:
    try:
        manifest = pack.read("MANIFEST.sha256").decode("utf-8")
    except KeyError:
        return ["the evidence pack has no MANIFEST.sha256"]
    problems = []
    listed = [line.partition("  ")[2] for line in manifest.splitlines()]
    unlisted = sorted(set(pack.namelist()) - set(listed) - {"MANIFEST.sha256"})
    if unlisted:
        problems.append(f"{', '.join(unlisted)} not listed in MANIFEST.sha256, which covers every other file")
    if len(set(listed)) != len(listed):
        problems.append("MANIFEST.sha256 lists a file twice")
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


def verify_export(
    path: Path, trust_anchors_pem: bytes | str | None = None, *, workers: int | None = None
) -> ChainReport:
    """Verify a JSONL export or an evidence pack (zip) with no database; with `trust_anchors_pem`,
    checkpoint signers must be issued by one of those roots (use your own, not the pack's certs/).
    A large JSONL file is verified by `workers` processes (default: one per CPU this process may use)."""
    trust_anchors = _anchors(trust_anchors_pem)
    if not path.is_file():
        raise ExportFileError(f"{path} does not exist or is not a file")
    if zipfile.is_zipfile(path):
        try:
            return _verify_pack(path, trust_anchors)
        except (zipfile.BadZipFile, zlib.error, EOFError) as exc:  # a truncated or corrupted member
            raise ExportFileError(f"{path} is a damaged zip: {exc}") from exc
    with path.open("rb") as stream:
        return _verify_jsonl(stream, path.name, [], trust_anchors, path,
                             default_workers() if workers is None else workers)


def _verify_pack(path: Path, trust_anchors: list[x509.Certificate] | None) -> ChainReport:
    with zipfile.ZipFile(path) as pack:
        if "events.jsonl" not in pack.namelist():
            raise ExportFileError(f"{path} is a zip without events.jsonl: not an evidence pack")
        extra: list[dict[str, Any]] = []
        if "checkpoints.jsonl" in pack.namelist():
            with pack.open("checkpoints.jsonl") as stream:
                extra = list(_records(stream, f"{path.name}:checkpoints.jsonl"))
        with pack.open("events.jsonl") as stream:
            report = _verify_jsonl(stream, f"{path.name}:events.jsonl", extra, trust_anchors, whole_chain=True)
        problems = _manifest_problems(pack)
    if report.ok and problems:
        report.ok = False
        report.reason = problems[0]
    return report
