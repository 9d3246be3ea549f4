"""The fast path of export verification: event lines in the exact layout `audit.export.event_line` writes,
checked straight from the file's bytes (no JSON parsing, no per-event objects), in one process or several.

A scan stops at the first line it cannot vouch for (another layout, a wrong seq, link, hash or anchor) and
says where; the caller verifies from there with the general path, which names the problem. So a scan never
reports a problem itself and never accepts anything the general path would refuse.

A line: {"body":<canonical body>,"hash":"<64 hex>","prev_hash":"<64 hex>","type":"event"}
"""

from __future__ import annotations

import hashlib
import mmap
import multiprocessing
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

HEAD = b'{"body":'
HASH_KEY = b',"hash":"'
PREV_KEY = b'","prev_hash":"'
TAIL = b'","type":"event"}'
TAIL_LEN = len(HASH_KEY) + 64 + len(PREV_KEY) + 64 + len(TAIL)
SEQ_KEY = b',"seq":'
_HASH_AT = len(HASH_KEY)  # offsets from the end of the body
_PREV_AT = _HASH_AT + 64 + len(PREV_KEY)
_TAIL_AT = _PREV_AT + 64

# Below this many bytes of events, forking workers costs more than it saves.
PARALLEL_MIN_BYTES = 16 << 20


@dataclass
class Scan:
    """Where a scan of `[start, end)` stopped and what it verified.

    `stop` is the offset of the first line not verified (`end` when all were); `lines` counts the lines
    before it (blank ones too); `first_seq`/`first_prev` are the first verified event's seq and prev_hash
    (what the chunk before must end with); `last_seq`/`last_hash` the last verified event's.
    """

    start: int
    end: int
    stop: int
    lines: int
    count: int
    first_seq: int | None
    first_prev: bytes | None
    last_seq: int | None
    last_hash: bytes | None

    @property
    def complete(self) -> bool:
        return self.stop == self.end


def scan(
    data: bytes,
    start: int,
    end: int,
    expected_seq: int | None,
    prev_hash: bytes | None,
    anchors: Mapping[int, frozenset[bytes]],
) -> Scan:
    """Verify the event lines of `data[start:end]` (`end` at a line end) while they are in our layout.

    With `expected_seq` None the first line's seq and prev_hash are taken as given (a chunk of a parallel
    scan: the caller checks them against the chunk before). `anchors` maps a seq to the hashes signed
    for it (checkpoints, the head row).
    """
    find, rfind, startswith = data.find, data.rfind, data.startswith
    sha256 = hashlib.sha256
    pos, count = start, 0
    first_seq: int | None = None
    first_prev: bytes | None = None
    seq = expected_seq
    prev = prev_hash
    head_len, seq_len = len(HEAD), len(SEQ_KEY)
    # Lines we do not write (blank ones, "\r\n" endings) fail the layout test: the general path reads them.
    while pos < end:
        newline = find(b"\n", pos, end)
        if newline < 0:
            newline = end
        body_end = newline - TAIL_LEN
        if not (
            body_end > pos + head_len
            and startswith(HEAD, pos)
            and startswith(HASH_KEY, body_end)
            and startswith(PREV_KEY, body_end + _HASH_AT + 64)
            and startswith(TAIL, body_end + _TAIL_AT)
        ):
            break
        # The top-level seq is the last `,"seq":` of a canonical body: only team and ts (strings, where a
        # quote is always escaped) follow it.
        at = rfind(SEQ_KEY, pos + head_len, body_end)
        line_prev = data[body_end + _PREV_AT : body_end + _PREV_AT + 64]
        if seq is None:  # the first line of a chunk: read its seq
            comma = find(b",", at + seq_len, body_end)
            digits = data[at + seq_len : comma]
            if at < 0 or comma < 0 or not digits.isdigit():
                break
            first_seq, first_prev, seq, prev = int(digits), line_prev, int(digits), line_prev
        elif at < 0 or not startswith(b'%s%d,' % (SEQ_KEY, seq), at) or line_prev != prev:
            break
        line_seq = seq
        # One copy of the body: cheaper than hashing a memoryview slice of it.
        line_hash = sha256(line_prev + b"\n" + data[pos + head_len : body_end]).hexdigest().encode()
        if line_hash != data[body_end + _HASH_AT : body_end + _HASH_AT + 64]:
            break
        if anchors and line_seq in anchors and anchors[line_seq] != {line_hash}:
            break
        prev = line_hash
        seq = line_seq + 1
        count += 1
        pos = newline + 1
    if expected_seq is not None:
        first_seq, first_prev = expected_seq, prev_hash
    last_seq = None if count == 0 or seq is None else seq - 1
    return Scan(start, end, min(pos, end), count, count, first_seq, first_prev, last_seq,
                prev if count else None)


def split(data: mmap.mmap, start: int, end: int, parts: int) -> list[tuple[int, int]]:
    """`[start, end)` cut into about `parts` ranges at line ends."""
    bounds = [start]
    for i in range(1, parts):
        cut = data.find(b"\n", max(start + (end - start) * i // parts, bounds[-1]), end)
        if cut < 0:
            break
        if cut + 1 > bounds[-1]:
            bounds.append(cut + 1)
    bounds.append(end)
    return [(a, b) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


BLOCK = 32 << 20  # bytes a process reads at a time


def scan_file_range(
    path: Path | str,
    start: int,
    end: int,
    expected_seq: int | None,
    prev_hash: bytes | None,
    anchors: Mapping[int, frozenset[bytes]],
) -> Scan:
    """`scan` over `[start, end)` of a file, read a block at a time (offsets in the result are the file's)."""
    total = Scan(start, end, start, 0, 0, None, None, None, None)
    seq, prev = expected_seq, prev_hash
    with open(path, "rb") as file:
        file.seek(start)
        pos, pending, block = start, b"", BLOCK
        while pos < end:
            more = file.read(min(block, end - pos - len(pending)))
            data = pending + more
            at_end = pos + len(data) >= end or not more
            cut = len(data) if at_end else data.rfind(b"\n") + 1
            if cut == 0:  # a line longer than a block
                pending, block = data, block * 2
                continue
            result = scan(data, 0, cut, seq, prev, anchors)
            if total.first_seq is None:
                total.first_seq, total.first_prev = result.first_seq, result.first_prev
            total.lines += result.lines
            total.count += result.count
            if result.count:
                total.last_seq, total.last_hash = result.last_seq, result.last_hash
                seq, prev = (result.last_seq or 0) + 1, result.last_hash
            elif seq is None and result.first_seq is not None:
                seq, prev = result.first_seq, result.first_prev
            total.stop = pos + result.stop
            if not result.complete or at_end:
                break
            pending, pos = data[cut:], pos + cut
    return total


def default_workers() -> int:
    """Processes for a parallel scan: the CPUs this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def scan_file_parallel(
    path: Path, start: int, end: int, anchors: Mapping[int, frozenset[bytes]], workers: int
) -> list[Scan]:
    """Scan `[start, end)` of a file in `workers` processes, one range each; scans in file order."""
    ranges = split_file(path, start, end, workers)
    if not ranges:
        return []
    context = multiprocessing.get_context("fork")
    with context.Pool(len(ranges)) as pool:
        return pool.starmap(scan_file_range, [(str(path), a, b, None, None, anchors) for a, b in ranges])


def split_file(path: Path, start: int, end: int, parts: int) -> list[tuple[int, int]]:
    with path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return split(data, start, end, parts)
