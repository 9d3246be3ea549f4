"""Signed checkpoints of the chain head, and the background timer that writes them.

A checkpoint signs the canonical JSON of {"alg", "head_hash", "seq", "ts"} with the organisation's key
(ECDSA P-256/SHA-256 as DER, Ed25519, or RSA-PSS/SHA-256), base64-encoded. `cert_pem` holds the signer's
certificate chain, leaf first, so an export can be checked with no database and no key server.
"""

from __future__ import annotations

import base64
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from sqlalchemy import select
from sqlalchemy.orm import Session

from audit.chain import Anchor, canonical_json, format_ts
from audit.log import lock_chain_head
from audit.models import ChainCheckpoint

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 60.0
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)


class CheckpointError(Exception):
    """A checkpoint cannot be written (unusable key or certificate)."""


def checkpoint_message(seq: int, head_hash: str, ts: datetime | str, alg: str) -> bytes:
    """The exact bytes a checkpoint signature covers."""
    stamp = ts if isinstance(ts, str) else format_ts(ts)
    return canonical_json({"alg": alg, "head_hash": head_hash, "seq": seq, "ts": stamp}).encode("utf-8")


def _load_key(signer_key_pem: bytes | str) -> Any:
    data = signer_key_pem.encode() if isinstance(signer_key_pem, str) else signer_key_pem
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"the checkpoint key is not an unencrypted PEM private key: {exc}") from exc


def _sign(key: Any, seq: int, head_hash: str, ts: datetime) -> tuple[str, bytes]:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise CheckpointError(f"ECDSA checkpoint keys must use P-256, not {key.curve.name}")
        return "ES256", key.sign(checkpoint_message(seq, head_hash, ts, "ES256"), ec.ECDSA(hashes.SHA256()))
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "Ed25519", key.sign(checkpoint_message(seq, head_hash, ts, "Ed25519"))
    if isinstance(key, rsa.RSAPrivateKey):
        message = checkpoint_message(seq, head_hash, ts, "PS256")
        return "PS256", key.sign(message, _PSS, hashes.SHA256())
    raise CheckpointError(f"unsupported checkpoint key type {type(key).__name__}: use P-256, Ed25519 or RSA")


def _spki(public_key: Any) -> bytes:
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return bytes(der)


def write_checkpoint(
    session: Session, signer_key_pem: bytes | str, cert_pem: bytes | str, *, now: datetime | None = None
) -> ChainCheckpoint:
    """Sign the current chain head and store the checkpoint inside the caller's transaction."""
    key = _load_key(signer_key_pem)
    chain_pem = cert_pem.decode() if isinstance(cert_pem, bytes) else cert_pem
    try:
        leaf = x509.load_pem_x509_certificate(chain_pem.encode())
    except ValueError as exc:
        raise CheckpointError(f"the checkpoint certificate is not PEM: {exc}") from exc
    if _spki(leaf.public_key()) != _spki(key.public_key()):
        raise CheckpointError("the checkpoint key does not belong to the first certificate of the chain")

    head = lock_chain_head(session)  # a consistent head: no append can land between read and sign
    ts = (now or datetime.now(UTC)).astimezone(UTC)
    alg, signature = _sign(key, head.seq, head.hash, ts)
    checkpoint = ChainCheckpoint(
        seq=head.seq,
        head_hash=head.hash,
        ts=ts,
        alg=alg,
        signature=base64.b64encode(signature).decode("ascii"),
        cert_pem=chain_pem,
    )
    session.add(checkpoint)
    session.flush()
    return checkpoint


def checkpoint_record(checkpoint: ChainCheckpoint) -> dict[str, Any]:
    """A checkpoint as a plain JSON-ready dict (exports, evidence packs)."""
    return {
        "seq": checkpoint.seq,
        "head_hash": checkpoint.head_hash,
        "ts": format_ts(checkpoint.ts),
        "alg": checkpoint.alg,
        "signature": checkpoint.signature,
        "cert_pem": checkpoint.cert_pem,
    }


def verify_checkpoint_signature(record: Mapping[str, Any]) -> str | None:
    """None when the record's signature verifies under its own leaf certificate, else the problem."""
    try:
        leaf = x509.load_pem_x509_certificate(str(record["cert_pem"]).encode())
        signature = base64.b64decode(str(record["signature"]), validate=True)
        message = checkpoint_message(int(record["seq"]), str(record["head_hash"]), str(record["ts"]),
                                     str(record["alg"]))
    except (KeyError, ValueError, TypeError, OverflowError) as exc:  # OverflowError: a seq of 1e999
        return f"checkpoint at seq {record.get('seq')!r} is malformed: {exc}"
    public_key = leaf.public_key()
    alg = record["alg"]
    try:
        if alg == "ES256" and isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        elif alg == "Ed25519" and isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(signature, message)
        elif alg == "PS256" and isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(signature, message, _PSS, hashes.SHA256())
        else:
            return f"checkpoint at seq {record['seq']}: algorithm {alg!r} does not fit its certificate's key"
    except InvalidSignature:
        return f"checkpoint at seq {record['seq']}: signature does not verify (checkpoint altered or forged)"
    return None


def load_trust_anchors(pem: bytes | str) -> list[x509.Certificate]:
    """Root certificates from a PEM bundle."""
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise CheckpointError(f"the trust anchors are not PEM certificates: {exc}") from exc


def _issued_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def signer_description(cert_pem: str) -> str:
    """The signer of a checkpoint as people read it: common name and SHA-256 fingerprint of the leaf."""
    leaf = x509.load_pem_x509_certificate(cert_pem.encode())
    names = leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    name = str(names[0].value) if names else leaf.subject.rfc4514_string()
    return f"{name} (SHA-256 {leaf.fingerprint(hashes.SHA256()).hex()[:16]}…)"


def verify_checkpoint_signer(record: Mapping[str, Any], anchors: Sequence[x509.Certificate]) -> str | None:
    """None when the checkpoint's certificate chain leads to one of `anchors` and was valid when it
    signed; else the problem. Without this, anyone able to write the database could sign a rewritten
    chain with a key of their own."""
    try:
        chain = x509.load_pem_x509_certificates(str(record["cert_pem"]).encode())
        signed_at = datetime.strptime(str(record["ts"]), "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    except (KeyError, ValueError) as exc:
        return f"checkpoint at seq {record.get('seq')!r} is malformed: {exc}"
    leaf = chain[0]
    who = signer_description(str(record["cert_pem"]))
    if not leaf.not_valid_before_utc <= signed_at <= leaf.not_valid_after_utc:
        return f"checkpoint at seq {record['seq']}: signed by {who} outside its certificate's validity"
    links_ok = all(_issued_by(child, parent) for child, parent in zip(chain, chain[1:], strict=False))
    top = chain[-1]
    if not links_ok or not any(top == anchor or _issued_by(top, anchor) for anchor in anchors):
        return f"checkpoint at seq {record['seq']}: signed by {who}, which is not issued by your trust anchors"
    return None


@dataclass
class CheckedCheckpoints:
    """The checkpoints that verified (usable as chain anchors) and the problems with the others."""

    anchors: list[Anchor]
    problems: list[str]
    count: int
    signers: list[str]
    signers_trusted: bool | None  # None: no trust anchors were given, signers not checked


def check_checkpoints(
    records: Sequence[Mapping[str, Any]], trust_anchors: Sequence[x509.Certificate] | None = None
) -> CheckedCheckpoints:
    """Verify each checkpoint's signature, and its signer against `trust_anchors` when given; the
    checkpoints that pass become anchors for `verify_chain`."""
    anchors: list[Anchor] = []
    problems: list[str] = []
    signers: list[str] = []
    for record in records:
        problem = verify_checkpoint_signature(record)
        if problem is None and trust_anchors is not None:
            problem = verify_checkpoint_signer(record, trust_anchors)
        if problem is None:
            anchors.append(Anchor(int(record["seq"]), str(record["head_hash"]), f"checkpoint of {record['ts']}"))
            who = signer_description(str(record["cert_pem"]))
            if who not in signers:
                signers.append(who)
        else:
            problems.append(problem)
    trusted = None if trust_anchors is None else not problems
    return CheckedCheckpoints(anchors, problems, len(records), signers, trusted)


def latest_checkpoint(session: Session) -> ChainCheckpoint | None:
    return session.scalars(select(ChainCheckpoint).order_by(ChainCheckpoint.id.desc()).limit(1)).first()


class CheckpointTimer:
    """Writes a checkpoint every `interval_s` seconds when the chain grew, and one more at `stop()`.

    `session_factory` is any zero-argument callable returning a Session (a sessionmaker). Failures are
    logged and retried at the next tick: a missed checkpoint only widens the uncovered tail.
    """

    def __init__(
        self,
        session_factory: Callable[[], Session],
        signer_key_pem: bytes | str,
        cert_pem: bytes | str,
        interval_s: float = DEFAULT_INTERVAL_S,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        _load_key(signer_key_pem)  # fail at start-up, not a minute later in a background thread
        self._sessions = session_factory
        self._key = signer_key_pem
        self._cert = cert_pem
        self.interval_s = interval_s
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.written = 0

    def tick(self, *, force: bool = False) -> ChainCheckpoint | None:
        """Write one checkpoint now unless the head is already covered (and not forced)."""
        with self._sessions() as session, session.begin():
            last = latest_checkpoint(session)
            head = lock_chain_head(session)
            if not force and last is not None and last.seq == head.seq:
                return None
            checkpoint = write_checkpoint(session, self._key, self._cert)
        self.written += 1
        log.info("audit checkpoint written at seq %d", checkpoint.seq)
        return checkpoint

    def _run(self) -> None:
        while not self._stopping.wait(self.interval_s):
            try:
                self.tick()
            except Exception:  # a background thread must survive a database hiccup; it retries next tick
                log.exception("writing the audit checkpoint failed; retrying in %.0f s", self.interval_s)

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("CheckpointTimer already started")
        self._thread = threading.Thread(target=self._run, name="audit-checkpoints", daemon=True)
        self._thread.start()

    def stop(self) -> ChainCheckpoint | None:
        """Stop the thread and write the shutdown checkpoint (a failure is logged: shutdown goes on)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        try:
            return self.tick()
        except Exception:  # the process is exiting; the next start-up or `audit checkpoint` covers the tail
            log.exception("writing the shutdown audit checkpoint failed; the chain tail stays uncovered")
            return None
