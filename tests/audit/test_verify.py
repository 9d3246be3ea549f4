"""audit/verify.py: verification of the database, of JSONL exports and of evidence packs."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from audit.chain import link_hash
from audit.checkpoints import write_checkpoint
from audit.export import ExportFilters, iter_event_links, iter_export, write_evidence_pack
from audit.export import event_line as event_line_of  # `event_line` here is a line index
from audit.log import append_event
from audit.provenance import DevCA, ensure_dev_ca
from audit.verify import ExportFileError, verify_database, verify_export


def append(sessions: Any, n: int) -> None:
    with sessions() as session, session.begin():
        for i in range(n):
            append_event(
                session,
                action="generation.requested" if i % 2 else "image.released",
                key_id="k",
                team="ads" if i % 3 else "news",
                payload={"i": i, "seed": 1000 + i},
            )


def checkpoint(sessions: Any, ca: DevCA) -> None:
    with sessions() as session, session.begin():
        write_checkpoint(session, ca.key_path.read_bytes(), ca.chain_pem_path.read_bytes())


def as_dba(sessions: Any, *statements: str) -> None:
    """Tamper the way someone with database admin rights could: drop the triggers, then write."""
    with sessions() as session, session.begin():
        for trigger in (
            "audit_events_no_update",
            "audit_events_no_delete",
            "chain_checkpoints_no_update",
            "chain_checkpoints_no_delete",
        ):
            session.execute(text(f"DROP TRIGGER IF EXISTS {trigger}"))
        for statement in statements:
            session.execute(text(statement))


def verify_db(sessions: Any) -> Any:
    with sessions() as session:
        return verify_database(session)


def export_lines(sessions: Any, filters: ExportFilters | None = None) -> list[str]:
    with sessions() as session:
        return "".join(iter_export(session, "jsonl", filters)).splitlines()


def event_line(seq: int) -> int:
    """Index of event `seq` in an export of the `chain` fixture: the header, one checkpoint, then events."""
    return seq + 1


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def chain(session_factory: Any, dev_ca: DevCA) -> Any:
    """Ten events, a checkpoint at seq 8, two more events after it."""
    append(session_factory, 8)
    checkpoint(session_factory, dev_ca)
    append(session_factory, 2)
    return session_factory


def test_verify_database_accepts_an_intact_chain_and_counts_the_uncovered_tail(chain: Any) -> None:
    report = verify_db(chain)
    assert (report.ok, report.count, report.last_checkpoint_seq, report.uncovered_tail) == (True, 10, 8, 2)
    assert report.checkpoints == 1 and report.checkpoints_valid
    assert "2 tail event(s) not yet covered" in report.summary


def test_verify_database_reports_an_edited_payload(chain: Any) -> None:
    as_dba(chain, 'UPDATE audit_events SET payload = \'{"i": 3, "seed": 1}\' WHERE seq = 4')
    report = verify_db(chain)
    assert (report.ok, report.first_bad_seq) == (False, 4)


def test_verify_database_accepts_a_payload_rewritten_with_the_same_content(chain: Any) -> None:
    as_dba(chain, 'UPDATE audit_events SET payload = \'{"seed": 1003,  "i": 3}\' WHERE seq = 4')
    assert verify_db(chain).ok


def test_verify_database_reports_a_deleted_event(chain: Any) -> None:
    as_dba(chain, "DELETE FROM audit_events WHERE seq = 5")
    report = verify_db(chain)
    assert (report.ok, report.first_bad_seq) == (False, 6)
    assert "missing" in report.reason


def test_verify_database_reports_a_truncated_tail_against_the_head_row(chain: Any) -> None:
    as_dba(chain, "DELETE FROM audit_events WHERE seq > 9")
    report = verify_db(chain)
    assert not report.ok and "chain_head row covers seq 10" in report.reason


def test_verify_database_reports_truncation_hidden_by_a_rewound_head_via_the_checkpoint(chain: Any) -> None:
    as_dba(
        chain,
        "DELETE FROM audit_events WHERE seq > 6",
        "UPDATE chain_head SET seq = 6, hash = (SELECT hash FROM audit_events WHERE seq = 6)",
    )
    report = verify_db(chain)
    assert not report.ok and "checkpoint" in report.reason and "truncated" in report.reason


def test_verify_database_reports_a_forged_checkpoint(chain: Any) -> None:
    as_dba(chain, "UPDATE chain_checkpoints SET seq = 9")
    report = verify_db(chain)
    assert not report.ok and not report.checkpoints_valid
    assert "signature does not verify" in report.reason


def test_verify_export_accepts_a_full_jsonl_export(chain: Any, tmp_path: Path) -> None:
    report = verify_export(write_lines(tmp_path / "audit.jsonl", export_lines(chain)))
    assert (report.ok, report.count, report.uncovered_tail) == (True, 10, 2)


def test_verify_export_reports_an_edited_event(chain: Any, tmp_path: Path) -> None:
    lines = export_lines(chain)
    record = json.loads(lines[event_line(3)])
    record["body"]["payload"]["seed"] = 7
    lines[event_line(3)] = json.dumps(record)
    report = verify_export(write_lines(tmp_path / "audit.jsonl", lines))
    assert (report.ok, report.first_bad_seq) == (False, 3)


def test_verify_export_accepts_lines_re_serialised_by_another_tool(chain: Any, tmp_path: Path) -> None:
    lines = [json.dumps(json.loads(line), indent=None, sort_keys=False) for line in export_lines(chain)]
    report = verify_export(write_lines(tmp_path / "audit.jsonl", lines))
    assert (report.ok, report.count) == (True, 10)


def test_verify_export_reports_a_deleted_event(chain: Any, tmp_path: Path) -> None:
    lines = export_lines(chain)
    del lines[event_line(5)]
    report = verify_export(write_lines(tmp_path / "audit.jsonl", lines))
    assert (report.ok, report.first_bad_seq) == (False, 6)


def test_verify_export_reports_reordered_events(chain: Any, tmp_path: Path) -> None:
    lines = export_lines(chain)
    lines[event_line(3)], lines[event_line(4)] = lines[event_line(4)], lines[event_line(3)]
    report = verify_export(write_lines(tmp_path / "audit.jsonl", lines))
    assert (report.ok, report.first_bad_seq) == (False, 4)


def test_verify_export_reports_truncation_before_a_checkpoint(chain: Any, tmp_path: Path) -> None:
    lines = export_lines(chain)
    kept = lines[: event_line(6) + 1]  # header, checkpoint at seq 8, events 1..6
    report = verify_export(write_lines(tmp_path / "audit.jsonl", kept))
    assert not report.ok and "truncated" in report.reason


def test_verify_export_checks_a_filtered_export_event_by_event(chain: Any, tmp_path: Path) -> None:
    report = verify_export(write_lines(tmp_path / "news.jsonl", export_lines(chain, ExportFilters(team="news"))))
    assert report.ok and report.count == 4 and "filtered export" in report.reason


def test_verify_export_refuses_a_file_that_is_not_an_export(tmp_path: Path) -> None:
    path = tmp_path / "notes.jsonl"
    path.write_text('{"hello": "world"}\n')
    with pytest.raises(ExportFileError, match="first line is no header"):
        verify_export(path)


def test_verify_export_names_a_line_that_is_not_json(chain: Any, tmp_path: Path) -> None:
    lines = export_lines(chain)
    lines[event_line(3)] = "{broken"
    with pytest.raises(ExportFileError, match="line 5 is not JSON"):
        verify_export(write_lines(tmp_path / "audit.jsonl", lines))


def test_evidence_pack_verifies_offline(chain: Any, dev_ca: DevCA, tmp_path: Path) -> None:
    with chain() as session:
        pack = write_evidence_pack(session, tmp_path / "evidence.zip", [dev_ca.chain_pem_path, dev_ca.root_pem_path])
    report = verify_export(pack)
    assert (report.ok, report.count, report.checkpoints) == (True, 10, 1)


def test_evidence_pack_with_an_altered_event_is_reported(chain: Any, dev_ca: DevCA, tmp_path: Path) -> None:
    with chain() as session:
        pack = write_evidence_pack(session, tmp_path / "evidence.zip", [dev_ca.chain_pem_path])
    with zipfile.ZipFile(pack) as original:
        files = {name: original.read(name) for name in original.namelist()}
    files["events.jsonl"] = files["events.jsonl"].replace(b'"seed":1002', b'"seed":1003')
    forged = tmp_path / "forged.zip"
    with zipfile.ZipFile(forged, "w") as out:
        for name, data in files.items():
            out.writestr(name, data)
    report = verify_export(forged)
    assert (report.ok, report.first_bad_seq) == (False, 3)


@pytest.mark.services
def test_postgres_gives_back_the_stored_canonical_bytes_for_the_fast_path(pg_session_factory: Any) -> None:
    append(pg_session_factory, 3)
    with pg_session_factory() as session:
        links = list(iter_event_links(session))
    assert all(link_hash(link._replace(body=unparsable), link.prev_hash) is None for link in links)


def test_sqlite_gives_back_the_stored_canonical_bytes_for_the_fast_path(session_factory: Any) -> None:
    append(session_factory, 3)
    with session_factory() as session:
        links = list(iter_event_links(session))
    assert all(link_hash(link._replace(body=unparsable), link.prev_hash) is None for link in links)


def unparsable() -> dict[str, Any]:
    raise AssertionError("the fast path should not need to parse the event")


def test_checkpoint_signers_are_named_and_unchecked_without_trust_anchors(chain: Any) -> None:
    report = verify_db(chain)
    assert report.signers_trusted is None and report.checkpoint_signers[0].startswith("DEV-ONLY")
    assert "not checked against a trust list" in report.summary


def test_checkpoint_signer_issued_by_the_trust_anchor_is_trusted(chain: Any, dev_ca: DevCA) -> None:
    with chain() as session:
        report = verify_database(session, dev_ca.root_pem_path.read_bytes())
    assert report.ok and report.signers_trusted is True


def test_a_chain_re_signed_with_a_foreign_key_is_reported_against_the_trust_anchors(
    chain: Any, dev_ca: DevCA, tmp_path: Path
) -> None:
    """Someone who can write the database signs a checkpoint with a CA of their own making."""
    forger = ensure_dev_ca(tmp_path / "forger")
    checkpoint(chain, forger)
    with chain() as session:
        unchecked = verify_database(session)
        checked = verify_database(session, dev_ca.root_pem_path.read_bytes())
    assert unchecked.ok  # the forged signature is mathematically valid...
    assert not checked.ok and checked.signers_trusted is False  # ...but not by a signer you trust
    assert "not issued by your trust anchors" in checked.reason


def test_verify_export_checks_signers_against_the_given_trust_anchors(
    chain: Any, dev_ca: DevCA, tmp_path: Path
) -> None:
    path = write_lines(tmp_path / "audit.jsonl", export_lines(chain))
    stranger = ensure_dev_ca(tmp_path / "stranger")
    assert verify_export(path, dev_ca.root_pem_path.read_bytes()).ok
    assert not verify_export(path, stranger.root_pem_path.read_bytes()).ok


# --- the database path: bodies written by the database from each row, the general path from the first doubt

ODD_TEAM = 'näïve ✓ \U0001f600 "q" \\ \x01\x7f\n\t'


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.services)])
def any_chain(request: pytest.FixtureRequest, dev_ca: DevCA) -> Any:
    """The `chain` fixture's ten events (checkpoint at seq 8) on SQLite and on PostgreSQL."""
    sessions = request.getfixturevalue("session_factory" if request.param == "sqlite" else "pg_session_factory")
    append(sessions, 8)
    checkpoint(sessions, dev_ca)
    append(sessions, 2)
    return sessions


def tamper(sessions: Any, *statements: str) -> None:
    with sessions() as session:
        dialect = session.get_bind().dialect.name
    if dialect == "sqlite":
        as_dba(sessions, *statements)
        return
    with sessions() as session, session.begin():
        session.execute(text("ALTER TABLE audit_events DISABLE TRIGGER USER"))
        for statement in statements:
            session.execute(text(statement))


def test_an_intact_database_chain_is_verified_from_the_rows_text_alone(any_chain: Any, monkeypatch: Any) -> None:
    def general_path(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the general path was needed for an intact chain")

    monkeypatch.setattr("audit.verify.iter_event_links", general_path)
    report = verify_db(any_chain)
    assert (report.ok, report.count, report.last_checkpoint_seq, report.uncovered_tail) == (True, 10, 8, 2)


@pytest.mark.parametrize(
    ("statements", "first_bad_seq", "reason"),
    [
        (['UPDATE audit_events SET payload = \'{"i": 3, "seed": 1}\' WHERE seq = 4'], 4, "event altered"),
        (["UPDATE audit_events SET team = 'sports' WHERE seq = 7"], 7, "event altered"),
        (["UPDATE audit_events SET prev_hash = hash WHERE seq = 3"], 3, "prev_hash does not match"),
        (["UPDATE audit_events SET hash = 'abc' WHERE seq = 5"], 5, "event altered"),
        (["DELETE FROM audit_events WHERE seq = 5"], 6, "missing"),
        (["DELETE FROM audit_events WHERE seq > 9"], 10, "chain_head row covers seq 10"),
        # A same-content rewrite at seq 2 is accepted by the general path, which then finds the edit at seq 9.
        (['UPDATE audit_events SET payload = \'{"seed": 1001,  "i": 1}\' WHERE seq = 2',
          "UPDATE audit_events SET key_id = 'someone' WHERE seq = 9"], 9, "event altered"),
    ],
)
def test_tampered_database_chains_are_reported_at_the_first_bad_event(
    any_chain: Any, statements: list[str], first_bad_seq: int, reason: str
) -> None:
    tamper(any_chain, *statements)
    report = verify_db(any_chain)
    assert (report.ok, report.first_bad_seq) == (False, first_bad_seq), report.summary
    assert reason in report.reason


def test_columns_with_any_text_verify_on_every_database_from_the_rows_alone(
    any_chain: Any, monkeypatch: Any
) -> None:
    with any_chain() as session, session.begin():
        append_event(session, action="x.odd", key_id="k\u00e9y", team=ODD_TEAM, job_id="job\n1",
                     payload={"text": ODD_TEAM})

    def general_path(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the database quoted a column differently from the canonical JSON")

    monkeypatch.setattr("audit.verify.iter_event_links", general_path)
    report = verify_db(any_chain)
    assert (report.ok, report.count) == (True, 11), report.summary


def test_a_whole_chain_export_has_the_stored_bytes_on_every_database(any_chain: Any, tmp_path: Path) -> None:
    tamper(any_chain, 'UPDATE audit_events SET payload = \'{"seed": 1001,  "i": 1}\' WHERE seq = 2')
    lines = export_lines(any_chain)
    with any_chain() as session:
        expected = [line.decode().rstrip("\n") for line in map(event_line_of, iter_event_links(session))]
    assert lines[2:] == expected  # header and checkpoint first; seq 2 re-encoded, the rest as stored
    report = verify_export(write_lines(tmp_path / "audit.jsonl", lines))
    assert (report.ok, report.count) == (True, 10), report.summary


# --- forgeries a verifier must not pass: the whole chain rewritten, keys given twice, files outside the manifest


def _rehashed_without_checkpoints(lines: list[str], edit: tuple[bytes, bytes]) -> list[str]:
    """The export as someone holding it could rewrite it: an event edited, every hash recomputed, the
    (unforgeable) checkpoints dropped."""
    from audit.chain import GENESIS_HASH, event_hash

    out, prev = [lines[0]], GENESIS_HASH
    for line in lines[1:]:
        record = json.loads(line.replace(*(part.decode() for part in edit)))
        if record["type"] != "event":
            continue
        record["prev_hash"], record["hash"] = prev, event_hash(prev, record["body"])
        prev = record["hash"]
        out.append(json.dumps(record))
    return out


def test_with_trust_anchors_an_export_without_a_trusted_checkpoint_fails(
    chain: Any, dev_ca: DevCA, tmp_path: Path
) -> None:
    forged = write_lines(tmp_path / "forged.jsonl",
                         _rehashed_without_checkpoints(export_lines(chain), (b'"seed":1002', b'"seed":1003')))
    assert verify_export(forged).ok  # internally consistent: all a file alone can show
    report = verify_export(forged, dev_ca.root_pem_path.read_bytes())
    assert not report.ok and "no checkpoint signed by a trusted signer" in report.reason


def test_a_key_given_twice_in_an_exported_event_is_refused(chain: Any, tmp_path: Path) -> None:
    lines = export_lines(chain)
    record = json.loads(lines[event_line(3)])
    body = json.dumps(record["body"], sort_keys=True, separators=(",", ":"))
    forged_body = body.replace('"seed":1002', '"seed":9999')
    # Readers differ on which "body" counts: Python's json keeps the last (the original, which verifies),
    # others the first (the forgery).
    lines[event_line(3)] = (f'{{"type":"event","body":{forged_body},"body":{body},"hash":"{record["hash"]}",'
                            f'"prev_hash":"{record["prev_hash"]}"}}')
    with pytest.raises(ExportFileError, match=r"line 5 cannot be evidence: the key 'body' appears twice"):
        verify_export(write_lines(tmp_path / "audit.jsonl", lines))


def test_a_stored_payload_with_a_key_given_twice_breaks_the_chain_at_its_event(chain: Any) -> None:
    # SQLite keeps JSON text as given (PostgreSQL's jsonb cannot hold a key twice). SQLite's json_extract reads
    # the first "i" (the forged 7); json.loads alone would keep the last (the hashed 2) and find the hash right.
    as_dba(chain, """UPDATE audit_events SET payload = '{"i": 7, "seed": 1002, "i": 2}' WHERE seq = 3""")
    report = verify_db(chain)
    assert (report.ok, report.first_bad_seq) == (False, 3) and "appears twice" in report.reason


def _repacked(pack: Path, target: Path, change: Any) -> Path:
    with zipfile.ZipFile(pack) as original:
        files = {name: original.read(name) for name in original.namelist()}
    change(files)
    with zipfile.ZipFile(target, "w") as out:
        for name, data in files.items():
            out.writestr(name, data)
    return target


def test_an_evidence_pack_must_list_every_file_in_its_manifest(chain: Any, dev_ca: DevCA, tmp_path: Path) -> None:
    with chain() as session:
        pack = write_evidence_pack(session, tmp_path / "evidence.zip", [dev_ca.chain_pem_path])

    def emptied(files: dict[str, bytes]) -> None:
        files["MANIFEST.sha256"] = b""
        files["model_cards.json"] = b"[]"

    report = verify_export(_repacked(pack, tmp_path / "forged.zip", emptied))
    assert not report.ok and "model_cards.json" in report.reason and "not listed in MANIFEST.sha256" in report.reason


def test_an_evidence_pack_whose_header_claims_filters_is_refused(chain: Any, dev_ca: DevCA, tmp_path: Path) -> None:
    with chain() as session:
        pack = write_evidence_pack(session, tmp_path / "evidence.zip", [dev_ca.chain_pem_path])

    def filtered(files: dict[str, bytes]) -> None:
        header, rest = files["events.jsonl"].split(b"\n", 1)
        files["events.jsonl"] = header.replace(b'"filters":{}', b'"filters":{"team":"ads"}') + b"\n" + rest

    with pytest.raises(ExportFileError, match="says it is filtered, and an evidence pack holds the whole chain"):
        verify_export(_repacked(pack, tmp_path / "forged.zip", filtered))


@pytest.mark.parametrize("edit,fragment", [
    (lambda lines: [lines[0].replace('"version":1', '"version":99')] + lines[1:], "is version 99"),
    (lambda lines: lines[:4] + ["[" * 200_000] + lines[4:], "line 5 cannot be evidence"),
], ids=["unknown-version", "deep-nesting"])
def test_exports_this_version_cannot_read_are_refused_plainly(chain: Any, tmp_path: Path, edit: Any,
                                                              fragment: str) -> None:
    with pytest.raises(ExportFileError, match=fragment):
        verify_export(write_lines(tmp_path / "audit.jsonl", edit(export_lines(chain))))
