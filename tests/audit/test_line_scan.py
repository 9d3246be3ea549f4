"""audit/line_scan.py: the byte-level fast path of export verification, in one process and in several, gives
the same reports as the general path (which names every problem) on good and tampered exports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import audit.verify
from audit.checkpoints import write_checkpoint
from audit.export import iter_export
from audit.line_scan import Scan, scan, split_file
from audit.log import NewEvent, append_many
from audit.provenance import DevCA
from audit.verify import verify_export

EVENTS, CHECKPOINT_AT = 300, 200


@pytest.fixture(scope="module")
def export_lines(tmp_path_factory: pytest.TempPathFactory, dev_ca: DevCA) -> list[str]:
    """A full export: 300 events with varied payloads and a signed checkpoint at seq 200."""
    from audit.db import make_engine, make_session_factory, upgrade_database

    url = f"sqlite:///{tmp_path_factory.mktemp('scan') / 'audit.db'}"
    upgrade_database(url)
    engine = make_engine(url)
    sessions = make_session_factory(engine)

    def events(first: int, last: int) -> list[NewEvent]:
        return [NewEvent("image.released", "k", "team ✓" if i % 7 else 'quo"te', {
            "i": i, "ratio": i / 7, "text": "naïve\n\"seq\":1,", "nested": {"seq": i, "team": "x"}},
            job_id=None if i % 3 else f"job-{i}") for i in range(first, last)]

    with sessions() as session, session.begin():
        append_many(session, events(1, CHECKPOINT_AT + 1))
    with sessions() as session, session.begin():
        write_checkpoint(session, dev_ca.key_path.read_bytes(), dev_ca.chain_pem_path.read_bytes())
    with sessions() as session, session.begin():
        append_many(session, events(CHECKPOINT_AT + 1, EVENTS + 1))
    with sessions() as session:
        lines = "".join(iter_export(session, "jsonl")).splitlines()
    engine.dispose()
    return lines


def line_of(seq: int) -> int:
    return seq + 1  # the header and one checkpoint come first


def general_only(data: bytes, start: int, end: int, *_: Any) -> Scan:
    """A scan that vouches for nothing: the general path verifies every line (the reference)."""
    return Scan(start, end, start, 0, 0, None, None, None, None)


def reports(path: Path, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The report of the general path alone, of the scan in one process, and of the scan in three."""
    with monkeypatch.context() as patched:
        patched.setattr(audit.verify, "scan", general_only)
        reference = verify_export(path, workers=1).to_dict()
    sequential = verify_export(path, workers=1).to_dict()
    with monkeypatch.context() as patched:
        patched.setattr(audit.verify, "PARALLEL_MIN_BYTES", 0)
        parallel = verify_export(path, workers=3).to_dict()
    return [reference, sequential, parallel]


def write(path: Path, lines: list[str], ending: str = "\n") -> Path:
    path.write_bytes((ending.join(lines) + ending).encode())
    return path


def test_scan_verifies_a_whole_export_like_the_general_path(export_lines: list[str], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    reference, sequential, parallel = reports(write(tmp_path / "e.jsonl", export_lines), monkeypatch)
    assert reference["ok"] and reference["count"] == EVENTS and reference["uncovered_tail"] == EVENTS - CHECKPOINT_AT
    assert sequential == reference and parallel == reference


def test_split_cuts_at_line_ends(export_lines: list[str], tmp_path: Path) -> None:
    path = write(tmp_path / "e.jsonl", export_lines)
    data = path.read_bytes()
    ranges = split_file(path, 0, len(data), 4)
    assert ranges[0][0] == 0 and ranges[-1][1] == len(data) and len(ranges) == 4
    assert all(data[b - 1 : b] == b"\n" for _, b in ranges)
    assert all(a == b for (_, a), (b, _) in zip(ranges, ranges[1:], strict=False))


def test_scan_stops_at_the_first_line_it_cannot_vouch_for(export_lines: list[str]) -> None:
    lines = list(export_lines)
    lines[line_of(5)] = lines[line_of(5)].replace('"i":5', '"i":6')
    data = ("\n".join(lines[line_of(1):]) + "\n").encode()
    result = scan(data, 0, len(data), 1, b"0" * 64, {})
    assert (result.count, result.last_seq, result.complete) == (4, 4, False)
    assert data[result.stop:].startswith(lines[line_of(5)].encode())


def tampered(lines: list[str], case: str, seq: int) -> list[str]:
    lines = list(lines)
    at = line_of(seq)
    if case == "edit":
        record = json.loads(lines[at])
        record["body"]["payload"]["ratio"] = 0.5
        lines[at] = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    elif case == "edit_bytes":
        lines[at] = lines[at].replace('"team":"', '"team":"x', 1)
    elif case == "delete":
        del lines[at]
    elif case == "swap":
        lines[at], lines[at + 1] = lines[at + 1], lines[at]
    elif case == "hash":
        lines[at] = lines[at][:-90] + ("0" if lines[at][-90] != "0" else "1") + lines[at][-89:]
    elif case == "truncate":
        del lines[at:]
    return lines


@pytest.mark.parametrize("case", ["edit", "edit_bytes", "delete", "swap", "hash", "truncate"])
@pytest.mark.parametrize("seq", [1, 2, 99, 100, 101, 150, 199, 200, 201, 299])
def test_tampered_exports_get_the_same_report_on_every_path(
    export_lines: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str, seq: int
) -> None:
    path = write(tmp_path / "e.jsonl", tampered(export_lines, case, seq))
    reference, sequential, parallel = reports(path, monkeypatch)
    if case == "truncate" and seq > CHECKPOINT_AT:
        assert reference["ok"]  # nothing signed was cut: only the tail count says so
    else:
        assert not reference["ok"] and reference["first_bad_seq"] is not None
    assert sequential == reference and parallel == reference


@pytest.mark.parametrize("variant", ["crlf", "blank_lines", "reserialised"])
def test_exports_in_other_layouts_still_verify(export_lines: list[str], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch, variant: str) -> None:
    lines = list(export_lines)
    if variant == "blank_lines":
        lines[line_of(150):line_of(150)] = ["", "  "]
    if variant == "reserialised":  # a tool rewrote one line: key order and spacing differ, content does not
        lines[line_of(120)] = json.dumps(json.loads(lines[line_of(120)]), indent=None)
    path = write(tmp_path / "e.jsonl", lines, "\r\n" if variant == "crlf" else "\n")
    reference, sequential, parallel = reports(path, monkeypatch)
    assert reference["ok"] and reference["count"] == EVENTS, reference["summary"]
    assert sequential == reference and parallel == reference
