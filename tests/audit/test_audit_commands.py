"""gateway/commands/audit.py and provenance.py: the CLI prints plain results and exits non-zero on failure."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import types
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from audit.db import make_engine, make_session_factory, upgrade_database
from audit.log import append_event
from audit.privacy import commit_prompt
from audit.provenance import AUDIT_ASSERTION, ensure_dev_ca, load_signer
from gateway.commands import audit as audit_commands
from gateway.commands import provenance as provenance_commands
from gateway.settings import Settings, get_settings


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    monkeypatch.setenv("LLAMAGEN_GATEWAY_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("LLAMAGEN_GATEWAY_ENV", "dev")
    get_settings.cache_clear()
    current = get_settings()
    current.data_dir.mkdir(parents=True)
    upgrade_database(current.database_url)
    yield current
    get_settings.cache_clear()


@pytest.fixture
def sessions(settings: Settings) -> Any:
    return make_session_factory(make_engine(settings.database_url))


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="llamagen-gateway")
    sub = parser.add_subparsers(dest="command", required=True)
    audit_commands.register(sub)
    provenance_commands.register(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


def append(sessions: Any, n: int = 3, **fields: Any) -> list[Any]:
    with sessions() as session, session.begin():
        return [
            append_event(
                session,
                action=fields.get("action", "generation.requested"),
                key_id="k",
                team=fields.get("team", "ads"),
                payload=fields.get("payload", {"i": i}),
            )
            for i in range(n)
        ]


def test_audit_verify_reports_an_intact_chain(sessions: Any, capsys: pytest.CaptureFixture[str]) -> None:
    append(sessions)
    assert run("audit", "verify") == 0
    assert "chain OK: 3 events" in capsys.readouterr().out


def test_audit_verify_exits_non_zero_and_names_the_bad_event(sessions: Any, capsys: pytest.CaptureFixture[str]) -> None:
    append(sessions)
    with sessions() as session, session.begin():
        session.execute(text("DROP TRIGGER audit_events_no_update"))
        session.execute(text("UPDATE audit_events SET team = 'other' WHERE seq = 2"))
    assert run("audit", "verify") == 1
    assert "chain BROKEN at event seq 2" in capsys.readouterr().out


def test_audit_verify_export_of_a_missing_file_is_a_plain_error(
    settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run("audit", "verify", "--export", str(tmp_path / "missing.jsonl")) == 2
    assert "error:" in capsys.readouterr().err


def test_audit_export_writes_filtered_jsonl_that_verifies(sessions: Any, tmp_path: Path) -> None:
    append(sessions, 2, team="ads")
    append(sessions, 2, team="news")
    out = tmp_path / "news.jsonl"
    assert run("audit", "export", "--team", "news", "-o", str(out)) == 0
    events = [json.loads(line) for line in out.read_text().splitlines() if '"type":"event"' in line]
    assert [e["body"]["team"] for e in events] == ["news", "news"]
    assert run("audit", "verify", "--export", str(out)) == 0


def test_audit_export_writes_csv_to_standard_output(sessions: Any, capsys: pytest.CaptureFixture[str]) -> None:
    append(sessions, 2)
    assert run("audit", "export", "--format", "csv") == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("seq,id,ts,action")


def test_audit_export_rejects_a_malformed_since(settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        run("audit", "export", "--since", "last tuesday")
    assert info.value.code == 2 and "not an ISO-8601 date" in capsys.readouterr().err


def test_audit_export_rejects_a_since_past_the_last_utc_date(settings: Settings,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        run("audit", "export", "--since", "9999-12-31T23:59:59-05:00")
    assert info.value.code == 2 and "is out of range in UTC" in capsys.readouterr().err


def test_audit_verify_of_an_export_with_a_line_that_is_not_utf8_names_the_line(
    sessions: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    append(sessions, 2)
    export = tmp_path / "export.jsonl"
    assert run("audit", "export", "-o", str(export)) == 0
    lines = export.read_bytes().splitlines(keepends=True)
    export.write_bytes(b"".join(lines[:2]) + b'{"type":"event","body":"\xff\xfe"}\n' + b"".join(lines[2:]))
    capsys.readouterr()
    assert run("audit", "verify", "--export", str(export)) == 2
    assert "line 3 is not UTF-8 text" in capsys.readouterr().err


def test_audit_verify_of_a_damaged_evidence_pack_is_a_plain_error(
    sessions: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    append(sessions)
    pack = tmp_path / "evidence.zip"
    assert run("audit", "evidence", "-o", str(pack)) == 0
    with zipfile.ZipFile(pack) as z:
        member = z.getinfo("events.jsonl")
    data = bytearray(pack.read_bytes())
    start = member.header_offset + 30 + len(member.filename.encode()) + len(member.extra)
    data[start:start + 16] = bytes(16)  # the compressed bytes of events.jsonl, overwritten
    pack.write_bytes(bytes(data))
    capsys.readouterr()
    assert run("audit", "verify", "--export", str(pack)) == 2
    assert f"error: {pack} is a damaged zip" in capsys.readouterr().err


def test_audit_checkpoint_signs_the_head(sessions: Any, capsys: pytest.CaptureFixture[str]) -> None:
    append(sessions, 4)
    assert run("audit", "checkpoint") == 0
    assert "signed checkpoint at seq 4" in capsys.readouterr().out
    assert run("audit", "verify") == 0
    assert "0 tail event(s) not yet covered" in capsys.readouterr().out


def test_audit_verify_checks_checkpoint_signers_against_the_configured_trust_anchors(
    sessions: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    append(sessions)
    assert run("audit", "checkpoint") == 0
    assert run("audit", "verify") == 0
    assert "(trusted)" in capsys.readouterr().out


def test_audit_verify_with_a_missing_trust_anchor_file_is_a_plain_error(
    settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run("audit", "verify", "--trust-anchors", str(tmp_path / "missing.pem")) == 2
    assert "cannot read" in capsys.readouterr().err


def test_audit_evidence_writes_a_pack_that_verifies(sessions: Any, tmp_path: Path) -> None:
    append(sessions)
    assert run("audit", "checkpoint") == 0
    pack = tmp_path / "evidence.zip"
    assert run("audit", "evidence", "-o", str(pack)) == 0
    with zipfile.ZipFile(pack) as z:
        assert "certs/DEV-ONLY-signing-chain.pem" in z.namelist()
    assert run("audit", "verify", "--export", str(pack)) == 0


def test_audit_erase_erases_and_reports_the_audit_event(sessions: Any, capsys: pytest.CaptureFixture[str]) -> None:
    with sessions() as session, session.begin():
        commitment = commit_prompt(session, "my private prompt", "full")["commitment"]
    assert run("audit", "erase", commitment, "--reason", "DSR-1") == 0
    assert "recorded as audit event" in capsys.readouterr().out


def test_audit_erase_of_an_unknown_commitment_is_a_plain_error(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run("audit", "erase", "f" * 64, "--reason", "DSR-1") == 2
    assert "no stored prompt has the commitment" in capsys.readouterr().err


def fake_pipeline(monkeypatch: pytest.MonkeyPatch, result: dict[str, Any] | Exception) -> None:
    module = types.ModuleType("generator.pipeline")

    class PipelineError(Exception):
        pass

    def reproduce_event(session: Any, event_id: str, settings: Any) -> dict[str, Any]:
        if isinstance(result, Exception):
            raise PipelineError(str(result))
        return {"event_id": event_id, **result}

    module.PipelineError = PipelineError  # type: ignore[attr-defined]
    module.reproduce_event = reproduce_event  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "generator.pipeline", module)


def test_audit_reproduce_reports_a_match(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_pipeline(
        monkeypatch,
        {
            "recorded_pixel_sha256": "a" * 64,
            "regenerated_pixel_sha256": "a" * 64,
            "match": True,
            "device": "cpu",
        },
    )
    assert run("audit", "reproduce", "event-1") == 0
    assert "MATCH" in capsys.readouterr().out


def test_audit_reproduce_exits_non_zero_on_a_mismatch(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_pipeline(
        monkeypatch,
        {
            "recorded_pixel_sha256": "a" * 64,
            "regenerated_pixel_sha256": "b" * 64,
            "match": False,
            "device": "cpu",
        },
    )
    assert run("audit", "reproduce", "event-1") == 1
    assert "MISMATCH" in capsys.readouterr().out


def test_audit_reproduce_of_a_wrong_event_is_a_plain_error(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_pipeline(monkeypatch, ValueError("event-9 is not an image.released audit event"))
    assert run("audit", "reproduce", "event-9") == 2
    assert "is not an image.released audit event" in capsys.readouterr().err


def released_image(settings: Settings, sessions: Any, tmp_path: Path, png: bytes) -> Path:
    """Sign a PNG the way the pipeline does and record its image.released event."""
    ca = ensure_dev_ca(settings.dev_ca_dir)
    event_id = str(uuid.uuid4())
    signed = load_signer(ca.chain_pem_path, ca.key_path).sign_png(
        png,
        title="x.png",
        software_agent="llamagen-gateway/0.1.0 (demo 1)",
        assertions={AUDIT_ASSERTION: {"event_id": event_id}},
    )
    with sessions() as session, session.begin():
        append_event(
            session,
            event_id=event_id,
            action="image.released",
            key_id="k",
            team="ads",
            payload={"sha256": hashlib.sha256(signed.data).hexdigest()},
        )
    path = tmp_path / "released.png"
    path.write_bytes(signed.data)
    return path


def test_provenance_verify_explains_a_trusted_image_and_finds_its_audit_event(
    settings: Settings, sessions: Any, tmp_path: Path, png_bytes: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    path = released_image(settings, sessions, tmp_path, png_bytes)
    assert run("provenance", "verify", str(path)) == 0
    out = capsys.readouterr().out
    assert "signer trusted; content intact" in out
    assert "image.released" in out and "matches the digest the event recorded" in out


def test_provenance_verify_with_a_foreign_trust_list_says_untrusted_not_invalid(
    settings: Settings, sessions: Any, tmp_path: Path, png_bytes: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    path = released_image(settings, sessions, tmp_path, png_bytes)
    stranger = ensure_dev_ca(tmp_path / "stranger")
    assert run("provenance", "verify", str(path), "--trust-anchors", str(stranger.root_pem_path)) == 1
    out = capsys.readouterr().out
    assert "valid signature" in out and "NOT in your trust list" in out


def test_provenance_verify_of_junk_says_it_cannot_read_it(
    settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"definitely not a png")
    assert run("provenance", "verify", str(junk)) == 2  # the file cannot be read as an image at all
    assert f"{junk}: not a readable image/png file" in capsys.readouterr().err


def test_provenance_verify_of_a_missing_file_is_a_plain_error(
    settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run("provenance", "verify", str(tmp_path / "missing.png")) == 2
    assert "cannot read" in capsys.readouterr().err


@pytest.fixture
def checkpoints_unreadable(monkeypatch: pytest.MonkeyPatch) -> None:
    """The database fails once the export has begun: a chunk per line, the header out, then the checkpoints
    query fails as a lost connection would."""
    from sqlalchemy.exc import OperationalError

    import audit.export

    def lost(session: Any) -> Iterator[dict[str, Any]]:
        raise OperationalError("SELECT", {}, Exception("server closed the connection unexpectedly"))
        yield {}

    monkeypatch.setattr(audit.export, "BATCH", 1)
    monkeypatch.setattr(audit.export, "iter_checkpoint_records", lost)


def test_an_export_to_a_file_the_database_fails_part_way_leaves_the_earlier_file_alone(
    sessions: Any, tmp_path: Path, checkpoints_unreadable: None, capsys: pytest.CaptureFixture[str]
) -> None:
    append(sessions, 2)
    out = tmp_path / "audit.jsonl"
    out.write_text("yesterday's export\n")
    assert run("audit", "export", "-o", str(out)) == 1
    assert "cannot read the audit database: " in capsys.readouterr().err
    assert out.read_text() == "yesterday's export\n" and sorted(p.name for p in tmp_path.iterdir()) == [
        "audit.jsonl", "var"]


def test_a_jsonl_export_to_standard_output_the_database_fails_part_way_ends_in_an_error_line(
    sessions: Any, tmp_path: Path, checkpoints_unreadable: None, capsys: pytest.CaptureFixture[str]
) -> None:
    append(sessions, 2)
    assert run("audit", "export") == 1
    captured = capsys.readouterr()
    (tmp_path / "cut.jsonl").write_text(captured.out)
    assert json.loads(captured.out.splitlines()[-1]) == {
        "type": "error", "message": "the audit database failed part-way; see stderr"}
    assert run("audit", "verify", "--export", str(tmp_path / "cut.jsonl")) != 0
    assert "cut.jsonl line 2: the export was cut short: the audit database failed" in capsys.readouterr().err


@pytest.mark.parametrize("statement,fragment", [
    ("UPDATE audit_events SET ts = 'garbage' WHERE seq = 2", "holds a value that cannot be read"),
    ("UPDATE audit_events SET team = CAST(X'FF' AS TEXT) WHERE seq = 2", "cannot read the audit database"),
], ids=["unreadable-time", "team-not-utf8"])
def test_audit_verify_of_a_database_with_unreadable_values_fails_with_a_message(
    sessions: Any, capsys: pytest.CaptureFixture[str], statement: str, fragment: str
) -> None:
    from sqlalchemy import text

    append(sessions, 3)
    with sessions() as session, session.begin():
        session.execute(text("DROP TRIGGER IF EXISTS audit_events_no_update"))
        session.execute(text(statement))
    capsys.readouterr()
    assert run("audit", "verify") == 1
    assert fragment in capsys.readouterr().err


def test_audit_verify_of_an_export_with_an_absurd_checkpoint_seq_names_the_checkpoint(
    sessions: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    append(sessions, 2)
    assert run("audit", "checkpoint") == 0
    export = tmp_path / "export.jsonl"
    assert run("audit", "export", "-o", str(export)) == 0
    lines = export.read_text().splitlines()
    checkpoint = json.loads(lines[1])
    lines[1] = json.dumps(checkpoint).replace(f'"seq": {checkpoint["seq"]}', '"seq": 1e999')
    export.write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    assert run("audit", "verify", "--export", str(export)) == 1
    assert "checkpoint at seq inf is malformed" in capsys.readouterr().out
