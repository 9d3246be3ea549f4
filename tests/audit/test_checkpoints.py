"""audit/checkpoints.py: signed chain heads, their verification, and the background timer."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from audit.checkpoints import (
    CheckpointError,
    CheckpointTimer,
    checkpoint_record,
    verify_checkpoint_signature,
    write_checkpoint,
)
from audit.log import append_event
from audit.models import ChainCheckpoint
from audit.provenance import DevCA, ensure_dev_ca


def append(sessions: Any, n: int = 1) -> None:
    with sessions() as session, session.begin():
        for i in range(n):
            append_event(session, action="test.event", key_id="k", team="t", payload={"i": i})


def checkpoint(sessions: Any, ca: DevCA) -> ChainCheckpoint:
    with sessions() as session, session.begin():
        return write_checkpoint(session, ca.key_path.read_bytes(), ca.chain_pem_path.read_bytes())


def count_checkpoints(sessions: Any) -> int:
    with sessions() as session:
        return int(session.scalar(select(func.count()).select_from(ChainCheckpoint)) or 0)


def test_write_checkpoint_signs_the_current_head(session_factory: Any, dev_ca: DevCA) -> None:
    append(session_factory, 3)
    written = checkpoint(session_factory, dev_ca)
    assert written.seq == 3 and written.alg == "ES256"
    assert verify_checkpoint_signature(checkpoint_record(written)) is None


def test_ed25519_checkpoints_verify(session_factory: Any, tmp_path: Path) -> None:
    append(session_factory)
    written = checkpoint(session_factory, ensure_dev_ca(tmp_path / "ed", alg="Ed25519"))
    assert written.alg == "Ed25519" and verify_checkpoint_signature(checkpoint_record(written)) is None


def test_ps256_checkpoints_verify(session_factory: Any, tmp_path: Path) -> None:
    append(session_factory)
    written = checkpoint(session_factory, ensure_dev_ca(tmp_path / "rsa", alg="PS256"))
    assert written.alg == "PS256" and verify_checkpoint_signature(checkpoint_record(written)) is None


def test_a_checkpoint_with_an_altered_head_does_not_verify(session_factory: Any, dev_ca: DevCA) -> None:
    append(session_factory)
    record = checkpoint_record(checkpoint(session_factory, dev_ca))
    record["seq"] = 7
    assert "signature does not verify" in str(verify_checkpoint_signature(record))


def test_a_malformed_checkpoint_is_named_not_raised(session_factory: Any, dev_ca: DevCA) -> None:
    append(session_factory)
    record = checkpoint_record(checkpoint(session_factory, dev_ca))
    record["signature"] = "not base64!"
    assert "malformed" in str(verify_checkpoint_signature(record))


def test_write_checkpoint_refuses_a_key_that_is_not_the_certificates(
    session_factory: Any, dev_ca: DevCA, tmp_path: Path
) -> None:
    other = ensure_dev_ca(tmp_path / "other")
    with session_factory() as session, pytest.raises(CheckpointError, match="does not belong"):
        write_checkpoint(session, other.key_path.read_bytes(), dev_ca.chain_pem_path.read_bytes())


def test_write_checkpoint_refuses_a_key_that_is_not_pem(session_factory: Any, dev_ca: DevCA) -> None:
    with session_factory() as session, pytest.raises(CheckpointError, match="not an unencrypted PEM"):
        write_checkpoint(session, b"junk", dev_ca.chain_pem_path.read_bytes())


def test_timer_writes_a_checkpoint_at_stop(session_factory: Any, dev_ca: DevCA) -> None:
    append(session_factory)
    timer = CheckpointTimer(
        session_factory, dev_ca.key_path.read_bytes(), dev_ca.chain_pem_path.read_bytes(), interval_s=3600
    )
    timer.start()
    timer.stop()
    assert count_checkpoints(session_factory) == 1


def test_timer_writes_periodically_while_the_chain_grows(session_factory: Any, dev_ca: DevCA) -> None:
    timer = CheckpointTimer(
        session_factory, dev_ca.key_path.read_bytes(), dev_ca.chain_pem_path.read_bytes(), interval_s=0.05
    )
    append(session_factory)
    timer.start()
    try:
        deadline = time.monotonic() + 5
        while count_checkpoints(session_factory) == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        written_while_running = count_checkpoints(session_factory)
    finally:
        timer.stop()
    assert written_while_running >= 1


def test_timer_skips_a_tick_when_the_head_is_already_covered(session_factory: Any, dev_ca: DevCA) -> None:
    append(session_factory)
    timer = CheckpointTimer(session_factory, dev_ca.key_path.read_bytes(), dev_ca.chain_pem_path.read_bytes())
    assert timer.tick() is not None
    assert timer.tick() is None
    assert timer.tick(force=True) is not None


def test_timer_refuses_an_unusable_key_at_construction(session_factory: Any, dev_ca: DevCA) -> None:
    with pytest.raises(CheckpointError, match="not an unencrypted PEM"):
        CheckpointTimer(session_factory, b"junk", dev_ca.chain_pem_path.read_bytes())


def test_timer_stop_logs_a_failed_shutdown_checkpoint_instead_of_raising(
    dev_ca: DevCA, caplog: pytest.LogCaptureFixture
) -> None:
    def broken_sessions() -> Any:
        raise OSError("database is gone")

    timer = CheckpointTimer(broken_sessions, dev_ca.key_path.read_bytes(), dev_ca.chain_pem_path.read_bytes())
    assert timer.stop() is None
    assert "shutdown audit checkpoint failed" in caplog.text
