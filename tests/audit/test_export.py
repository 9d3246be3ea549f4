"""audit/export.py: streamed JSONL and CSV exports with filters, and the evidence pack."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import zipfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from audit.chain import canonical_json
from audit.export import OFFLINE_VERIFIER, ExportError, ExportFilters, cut_short_line, iter_export, write_evidence_pack
from audit.log import append_event
from audit.models import ModelCardRecord, PolicyRevision
from audit.privacy import commit_prompt
from audit.provenance import DevCA
from audit.verify import ExportFileError, verify_export

NOW = datetime.now(UTC)


@pytest.fixture
def sessions(session_factory: Any) -> Any:
    with session_factory() as session, session.begin():
        append_event(
            session,
            action="generation.requested",
            key_id="k1",
            team="ads",
            job_id="j1",
            payload={"seed": 1, "prompt": commit_prompt(session, "a red fox", "full")},
        )
        append_event(session, action="generation.requested", key_id="k2", team="news", payload={"seed": 2})
        append_event(
            session,
            action="image.released",
            key_id="k1",
            team="ads",
            job_id="j1",
            payload={"sha256": "ab" * 32},
        )
        session.add(
            PolicyRevision(
                revision="rev1",
                policy_id="default",
                version="1",
                source="id: default\n",
                author="alice",
                reason="initial",
                created_at=NOW,
                active=True,
                scope="org",
            )
        )
        session.add(
            ModelCardRecord(content_hash="c" * 64, name="demo", version="1", card={"lineage": []}, recorded_at=NOW)
        )
    return session_factory


def export(sessions: Any, fmt: Any = "jsonl", filters: ExportFilters | None = None) -> str:
    with sessions() as session:
        return "".join(iter_export(session, fmt, filters))


def records(text: str, kind: str) -> list[dict[str, Any]]:
    return [r for r in map(json.loads, text.splitlines()) if r["type"] == kind]


def bodies(text: str) -> list[dict[str, Any]]:
    return [r["body"] for r in records(text, "event")]


def test_jsonl_export_starts_with_a_header_naming_format_and_filters(sessions: Any) -> None:
    header = json.loads(export(sessions, filters=ExportFilters(team="ads")).splitlines()[0])
    assert header["format"] == "llamagen-gateway.audit-export" and header["filters"] == {"team": "ads"}


def test_jsonl_export_lines_are_canonical_json(sessions: Any) -> None:
    for line in export(sessions).splitlines():
        assert canonical_json(json.loads(line)) == line


def test_jsonl_export_holds_every_event_in_chain_order(sessions: Any) -> None:
    assert [e["seq"] for e in bodies(export(sessions))] == [1, 2, 3]


def test_export_filters_by_team(sessions: Any) -> None:
    assert {e["team"] for e in bodies(export(sessions, filters=ExportFilters(team="ads")))} == {"ads"}


def test_export_filters_by_action(sessions: Any) -> None:
    events = bodies(export(sessions, filters=ExportFilters(action="image.released")))
    assert [e["seq"] for e in events] == [3]


def test_export_filters_by_time(sessions: Any) -> None:
    later = ExportFilters(since=NOW + timedelta(hours=1))
    assert bodies(export(sessions, filters=later)) == []


def test_export_filters_by_job(sessions: Any) -> None:
    events = bodies(export(sessions, filters=ExportFilters(job_id="j1")))
    assert [e["seq"] for e in events] == [1, 3]


def test_csv_export_has_one_row_per_event_with_the_payload_as_canonical_json(sessions: Any) -> None:
    rows = list(csv.DictReader(io.StringIO(export(sessions, "csv"))))
    assert [row["seq"] for row in rows] == ["1", "2", "3"]
    assert json.loads(rows[1]["payload"]) == {"seed": 2}


def test_export_refuses_an_unknown_format(sessions: Any) -> None:
    with sessions() as session, pytest.raises(ExportError, match="unknown export format 'xml'"):
        iter_export(session, "xml")  # type: ignore[arg-type]


def test_export_streams_in_chunks(session_factory: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("audit.export.BATCH", 10)
    with session_factory() as session, session.begin():
        for i in range(25):
            append_event(session, action="load.test", key_id="k", team="t", payload={"i": i})
    with session_factory() as session:
        chunks = list(iter_export(session, "jsonl"))
    assert len(chunks) == 3  # 26 lines (header + 25 events) in chunks of 10


def test_evidence_pack_holds_every_part_an_auditor_needs(sessions: Any, dev_ca: DevCA, tmp_path: Path) -> None:
    with sessions() as session:
        pack = write_evidence_pack(session, tmp_path / "evidence.zip", [dev_ca.root_pem_path])
    with zipfile.ZipFile(pack) as z:
        names = set(z.namelist())
        assert {
            "events.jsonl",
            "checkpoints.jsonl",
            "policy_revisions.json",
            "policy_revisions/rev1.yaml",
            "model_cards.json",
            "prompts.jsonl",
            "certs/DEV-ONLY-root-ca.pem",
            "HOW-TO-VERIFY.txt",
            "MANIFEST.sha256",
            "verify_chain.py",
        } <= names
        assert json.loads(z.read("model_cards.json"))[0]["content_hash"] == "c" * 64
        assert json.loads(z.read("prompts.jsonl"))["text"] == "a red fox"
        assert "canonical JSON" in z.read("HOW-TO-VERIFY.txt").decode()


def test_evidence_pack_with_an_altered_policy_file_is_reported(sessions: Any, tmp_path: Path) -> None:
    with sessions() as session:
        pack = write_evidence_pack(session, tmp_path / "evidence.zip", [])
    with zipfile.ZipFile(pack) as original:
        files = {name: original.read(name) for name in original.namelist()}
    files["policy_revisions/rev1.yaml"] = b"id: permissive\n"
    forged = tmp_path / "forged.zip"
    with zipfile.ZipFile(forged, "w") as out:
        for name, data in files.items():
            out.writestr(name, data)
    report = verify_export(forged)
    assert not report.ok and "policy_revisions/rev1.yaml does not match" in report.reason


def test_jsonl_export_writes_canonical_bodies_even_for_payloads_stored_otherwise(sessions: Any) -> None:
    with sessions() as session, session.begin():
        session.execute(text("DROP TRIGGER audit_events_no_update"))
        session.execute(text("UPDATE audit_events SET payload = '{\"seed\": 2 }' WHERE seq = 2"))
    lines = export(sessions).splitlines()
    assert all(canonical_json(json.loads(line)) == line for line in lines)


def unpack(pack: Path, into: Path) -> Path:
    with zipfile.ZipFile(pack) as z:
        z.extractall(into)
    return into


def run_offline_verifier(directory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "verify_chain.py", "events.jsonl"], cwd=directory, capture_output=True, text=True, check=False
    )


def test_evidence_pack_carries_a_standalone_verifier_that_accepts_the_chain(sessions: Any, tmp_path: Path) -> None:
    with sessions() as session:
        pack = write_evidence_pack(session, tmp_path / "evidence.zip", [])
    result = run_offline_verifier(unpack(pack, tmp_path / "pack"))
    assert result.returncode == 0 and "chain OK: 3 events" in result.stdout


def test_standalone_verifier_reports_an_altered_event(sessions: Any, tmp_path: Path) -> None:
    with sessions() as session:
        pack = write_evidence_pack(session, tmp_path / "evidence.zip", [])
    directory = unpack(pack, tmp_path / "pack")
    events = directory / "events.jsonl"
    events.write_text(events.read_text().replace('"seed":2', '"seed":3'))
    result = run_offline_verifier(directory)
    assert result.returncode == 1 and "seq 2: hash does not match" in result.stderr


def test_an_export_the_server_cut_short_is_reported_by_both_verifiers(sessions: Any, tmp_path: Path) -> None:
    complete = export(sessions)
    cut = complete.splitlines(keepends=True)[:-1]  # the last event never came
    path = tmp_path / "events.jsonl"
    path.write_text("".join(cut) + cut_short_line("the server could not read the rest of the audit log"))
    (tmp_path / "verify_chain.py").write_text(OFFLINE_VERIFIER.read_text())
    with pytest.raises(ExportFileError, match="events.jsonl line 4: the export was cut short: the server could"):
        verify_export(path)
    result = run_offline_verifier(tmp_path)
    assert result.returncode == 1 and "line 4: the export was cut short" in result.stderr


def test_the_standalone_verifier_refuses_a_record_type_it_does_not_know(sessions: Any, tmp_path: Path) -> None:
    (tmp_path / "events.jsonl").write_text(export(sessions) + '{"type":"note","text":"trust me"}\n')
    (tmp_path / "verify_chain.py").write_text(OFFLINE_VERIFIER.read_text())
    result = run_offline_verifier(tmp_path)
    assert result.returncode == 1 and "line 5: unknown record type 'note'" in result.stderr


@pytest.mark.parametrize("edit,accepted,fragment", [
    (lambda text: "\ufeff" + text, True, "chain OK: 3 events"),  # a byte-order mark an editor added
    (lambda text: text + text.splitlines(keepends=True)[0], False, "line 5: a second header"),
    (lambda text: "".join(text.splitlines(keepends=True)[1:]), False, "line 1: the export must begin with its header"),
    (lambda text: text.replace('"version":1', '"version":99', 1), False, "audit-export version 1"),
    (lambda text: text.replace('"seed":2', '"seed":3,"seed":2', 1), False, "the key 'seed' appears twice"),
    (lambda text: text + "[" * 100_000 + "\n", False, "line 5: not a JSON record of an export"),
], ids=["bom", "trailing-header", "no-header", "unknown-version", "key-twice", "deep-nesting"])
def test_the_standalone_verifier_judges_files_as_the_cli_does(sessions: Any, tmp_path: Path, edit: Any,
                                                              accepted: bool, fragment: str) -> None:
    (tmp_path / "events.jsonl").write_text(edit(export(sessions)), encoding="utf-8")
    (tmp_path / "verify_chain.py").write_text(OFFLINE_VERIFIER.read_text())
    result = run_offline_verifier(tmp_path)
    assert (result.returncode == 0) is accepted, result.stdout + result.stderr
    assert fragment in (result.stdout if accepted else result.stderr)
    assert "Traceback" not in result.stderr
