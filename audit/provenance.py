"""C2PA provenance: signing released PNGs with the organisation's chain, and explaining verification.

Verification keeps three questions apart, because confusing them makes people delete good files:
is the signature valid, is the signer in *your* trust list, and is the content what was signed.
"""

from __future__ import annotations

import functools
import io
import json
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import c2pa
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from PIL import Image

from audit.dev_ca import DevCA, DevCAError, SigningAlg, ensure_dev_ca, signing_alg_of_key

TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
AUDIT_ASSERTION = "com.llamagen-gateway.audit"
LINEAGE_ASSERTION = "com.llamagen-gateway.lineage"
POLICY_ASSERTION = "com.llamagen-gateway.policy-decision"
CLAIM_GENERATOR = "llamagen-gateway"
# Thumbnails would add ~260 KB and ~45 ms per 256x256 image, and say nothing a verifier needs.
SIGNING_SETTINGS = {"builder": {"thumbnail": {"enabled": False}}}
# c2pa re-reads and validates every manifest it has just signed unless told otherwise: half the cost of a
# signature. A signer whose key we hold is checked once instead (the key matches the certificate, and a self-test
# signs and validates one image at load); a callback signer (KMS/HSM, whose key may rotate) keeps the check.
SIGNING_SETTINGS_SELF_TESTED = {**SIGNING_SETTINGS, "verify": {"verify_after_sign": False}}
_ALGS: dict[str, c2pa.C2paSigningAlg] = {
    "ES256": c2pa.C2paSigningAlg.ES256,
    "PS256": c2pa.C2paSigningAlg.PS256,
    "Ed25519": c2pa.C2paSigningAlg.ED25519,
}
SIGNATURE_FAILURES = ("claimSignature.", "signingCredential.invalid", "signingCredential.revoked",
                      "signingCredential.expired", "claim.", "timeStamp.mismatch")

__all__ = [
    "DevCA", "DevCAError", "ProvenanceError", "ProvenanceReport", "ProvenanceSigner", "SignedImage",
    "callback_signer", "ensure_dev_ca", "load_signer", "verify_image",
]


class ProvenanceError(Exception):
    """Signing or verification cannot proceed; the message names the file or setting at fault."""


@functools.cache
def _gateway_version() -> str:
    """The installed distribution's version, read once per process (each metadata lookup costs ~1 ms)."""
    try:
        return metadata.version("llamagen-gateway")
    except metadata.PackageNotFoundError:
        return "0+unknown"


@dataclass(frozen=True)
class SignedImage:
    """A signed asset and the label of the manifest embedded in it."""

    data: bytes
    manifest_id: str


class ProvenanceSigner:
    """Signs PNGs with one C2PA signer; thread-safe (signing is serialised, ~1-3 ms per image).

    `verify_each=False` skips c2pa's validation of each manifest it signs; only for a signer that passed
    `self_test` and whose key cannot change underneath it.
    """

    def __init__(self, signer: c2pa.Signer, alg: str, description: str, *, verify_each: bool = True) -> None:
        self._signer = signer
        self._context = c2pa.Context.from_dict(SIGNING_SETTINGS if verify_each else SIGNING_SETTINGS_SELF_TESTED)
        self._lock = threading.Lock()
        self.alg = alg
        self.description = description

    def manifest(
        self,
        *,
        manifest_id: str,
        title: str,
        software_agent: str,
        assertions: Mapping[str, Mapping[str, Any]],
    ) -> dict[str, Any]:
        """The manifest definition `sign_png` embeds."""
        for label in assertions:
            if label.startswith("c2pa.") or "." not in label:
                raise ProvenanceError(f"assertion label {label!r} must be reverse-domain and not c2pa.*")
        created = {
            "action": "c2pa.created",
            "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA,
            "softwareAgent": {"name": software_agent},
        }
        return {
            "label": manifest_id,
            "claim_generator_info": [{"name": CLAIM_GENERATOR, "version": _gateway_version()}],
            "title": title,
            "format": "image/png",
            "assertions": [
                {"label": "c2pa.actions", "data": {"actions": [created]}},
                *({"label": label, "data": dict(data)} for label, data in assertions.items()),
            ],
        }

    def sign_png(
        self,
        png_bytes: bytes,
        *,
        title: str,
        software_agent: str,
        assertions: Mapping[str, Mapping[str, Any]],
    ) -> SignedImage:
        """Embed a signed manifest: c2pa.created by `software_agent`, plus our custom `assertions`."""
        if not png_bytes.startswith(b"\x89PNG\r\n\x1a\n"):
            raise ProvenanceError("sign_png was given bytes that are not a PNG")
        manifest_id = f"urn:c2pa:{uuid.uuid4()}"
        definition = self.manifest(
            manifest_id=manifest_id, title=title, software_agent=software_agent, assertions=assertions
        )
        out = io.BytesIO()
        try:
            with self._lock:
                builder = c2pa.Builder(definition, context=self._context)
                builder.sign(self._signer, "image/png", io.BytesIO(png_bytes), out)
        except c2pa.C2paError as exc:
            raise ProvenanceError(f"C2PA signing with {self.description} failed: {exc}") from exc
        return SignedImage(data=out.getvalue(), manifest_id=manifest_id)

    def self_test(self) -> None:
        """Sign a small PNG and validate its signature: a signer that cannot make a valid one is refused."""
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), "white").save(buffer, format="PNG")
        signed = self.sign_png(buffer.getvalue(), title="self-test.png", software_agent=CLAIM_GENERATOR,
                               assertions={})
        report = verify_image(signed.data)
        if not (report.signature_valid and report.content_intact):
            raise ProvenanceError(f"the signing self-test of {self.description} failed: {report.failures}")


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ProvenanceError(f"cannot read the {what} {path}: {exc.strerror or exc}") from exc


def _check_chain(chain_pem: bytes, source: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(chain_pem)
    except ValueError as exc:
        raise ProvenanceError(f"{source} is not a PEM certificate chain: {exc}") from exc
    leaf = certs[0]
    try:
        is_ca = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if is_ca:
        raise ProvenanceError(f"{source} starts with a CA certificate: put the leaf first, root excluded")
    return certs


def load_signer(chain_pem_path: Path, key_path: Path, alg: SigningAlg = "ES256") -> ProvenanceSigner:
    """A signer from the organisation's chain (leaf first, root excluded) and the leaf's private key."""
    if alg not in _ALGS:
        raise ProvenanceError(f"unsupported signing algorithm {alg!r}: use ES256, PS256 or Ed25519")
    chain_path, key_file = Path(chain_pem_path), Path(key_path)
    chain_pem = _read(chain_path, "signing certificate chain")
    key_pem = _read(key_file, "signing key")
    certs = _check_chain(chain_pem, str(chain_path))
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ProvenanceError(f"{key_file} is not an unencrypted PEM private key: {exc}") from exc
    try:
        key_alg = signing_alg_of_key(key)
    except DevCAError as exc:
        raise ProvenanceError(f"{key_file}: {exc}") from exc
    if key_alg != alg:
        raise ProvenanceError(f"{key_file} is a {key_alg} key but the signing algorithm is set to {alg}")
    der, spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if certs[0].public_key().public_bytes(der, spki) != key.public_key().public_bytes(der, spki):
        raise ProvenanceError(f"{key_file} is not the key of the first certificate in {chain_path}")
    try:
        signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo(_ALGS[alg], chain_pem, key_pem, None))
    except c2pa.C2paError as exc:
        raise ProvenanceError(f"C2PA refused the signer {chain_path}: {exc}") from exc
    provenance_signer = ProvenanceSigner(signer, alg, f"{alg} key {key_file.name}", verify_each=False)
    provenance_signer.self_test()
    return provenance_signer


def callback_signer(
    sign_fn: Callable[[bytes], bytes], chain_pem: bytes | str, alg: SigningAlg
) -> ProvenanceSigner:
    """A signer whose private key stays in a KMS or HSM: `sign_fn(data) -> signature`.

    ES256 signatures may be DER (what AWS/GCP KMS return) or raw r||s; PS256 and Ed25519 are raw.
    """
    if alg not in _ALGS:
        raise ProvenanceError(f"unsupported signing algorithm {alg!r}: use ES256, PS256 or Ed25519")
    pem = chain_pem.encode() if isinstance(chain_pem, str) else chain_pem
    _check_chain(pem, "the callback signer's chain")
    try:
        signer = c2pa.Signer.from_callback(sign_fn, _ALGS[alg], pem.decode(), None)
    except c2pa.C2paError as exc:
        raise ProvenanceError(f"C2PA refused the callback signer: {exc}") from exc
    return ProvenanceSigner(signer, alg, f"{alg} callback signer")


# --- verification -------------------------------------------------------------------------------------


@dataclass
class ProvenanceReport:
    """Verification of one asset, with signature, trust and integrity kept apart."""

    has_manifest: bool
    readable: bool = True  # False: the bytes are not an image of the declared type at all
    signature_valid: bool | None = None
    signer_trusted: bool | None = None
    content_intact: bool | None = None
    trust_anchors_configured: bool = False
    validation_state: str | None = None
    manifest_id: str | None = None
    signer: dict[str, Any] = field(default_factory=dict)
    failures: list[dict[str, str]] = field(default_factory=list)
    manifest: dict[str, Any] | None = None
    audit_event_id: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Signed, trusted and intact: the only state in which provenance claims can be relied on."""
        return bool(self.signature_valid and self.signer_trusted and self.content_intact)

    @property
    def summary(self) -> str:
        if not self.has_manifest:
            detail = f" ({self.error})" if self.error else ""
            return f"no C2PA manifest found{detail}: nothing in this file says where it came from"
        signer = self.signer.get("common_name") or "an unnamed signer"
        if not self.signature_valid:
            codes = ", ".join(f["code"] for f in self.failures) or "unknown reason"
            return f"INVALID signature ({codes}): the manifest cannot be relied on"
        if self.signer_trusted:
            trust = "signer trusted"
        elif self.trust_anchors_configured:
            trust = "signer NOT in your trust list"
        else:
            trust = "signer not checked against any trust list (no trust anchors configured)"
        integrity = (
            "content intact"
            if self.content_intact
            else "content ALTERED after signing (the pixels or metadata no longer match the signed hash)"
        )
        return f"valid signature by {signer}; {trust}; {integrity}"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok, "summary": self.summary}


def _settings(trust_anchors_pem: bytes | str | None) -> dict[str, Any]:
    if trust_anchors_pem is None:
        return {}
    try:  # UnicodeDecodeError is a ValueError: bytes that are not text are not PEM either
        pem = trust_anchors_pem.decode() if isinstance(trust_anchors_pem, bytes) else trust_anchors_pem
        x509.load_pem_x509_certificates(pem.encode())
    except ValueError as exc:
        raise ProvenanceError(f"the trust anchors are not PEM certificates: {exc}") from exc
    return {"trust": {"trust_anchors": pem}}


def verify_image(
    data: bytes, mime: str = "image/png", trust_anchors_pem: bytes | str | None = None
) -> ProvenanceReport:
    """Read and validate the C2PA manifest of `data`; unsigned or junk input gives `has_manifest=False`, and
    junk (not a readable image of type `mime` at all, e.g. PNG magic bytes followed by anything) `readable=False`."""
    if not data:
        raise ProvenanceError("the file is empty")
    context = c2pa.Context.from_dict(_settings(trust_anchors_pem))
    try:
        with c2pa.Reader(mime, io.BytesIO(data), context=context) as reader:
            store = json.loads(reader.json())
            state = reader.get_validation_state()
            results = reader.get_validation_results() or {}
    except c2pa.C2paError.ManifestNotFound:
        return ProvenanceReport(has_manifest=False, trust_anchors_configured=trust_anchors_pem is not None)
    except c2pa.C2paError as exc:
        readable = _is_readable_image(data)
        return ProvenanceReport(
            has_manifest=False,
            readable=readable,
            trust_anchors_configured=trust_anchors_pem is not None,
            error=f"its C2PA data cannot be read: {exc}" if readable else f"not a readable {mime} file: {exc}",
        )
    active_id = store.get("active_manifest")
    manifest = store.get("manifests", {}).get(active_id, {})
    active = results.get("activeManifest", {})
    failures = [{"code": f.get("code", ""), "explanation": f.get("explanation", "")}
                for f in active.get("failure", [])]
    codes = [f["code"] for f in failures]
    successes = {s.get("code") for s in active.get("success", [])}
    signature_valid = "claimSignature.validated" in successes and not any(
        code.startswith(SIGNATURE_FAILURES) for code in codes
    )
    info = manifest.get("signature_info", {})
    return ProvenanceReport(
        has_manifest=True,
        signature_valid=signature_valid,
        signer_trusted=signature_valid and "signingCredential.trusted" in successes,
        content_intact=not any(code.startswith("assertion.") for code in codes),
        trust_anchors_configured=trust_anchors_pem is not None,
        validation_state=state,
        manifest_id=active_id,
        signer={"common_name": info.get("common_name"), "issuer": info.get("issuer"),
                "alg": info.get("alg"), "serial": info.get("cert_serial_number")},
        failures=failures,
        manifest=manifest,
        audit_event_id=_audit_event_id(manifest),
    )


def _is_readable_image(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
    except Exception:  # PIL raises many types for junk (OSError, SyntaxError, ValueError, ...)
        return False
    return True


def _audit_event_id(manifest: Mapping[str, Any]) -> str | None:
    for assertion in manifest.get("assertions", []):
        if assertion.get("label") == AUDIT_ASSERTION:
            event_id = assertion.get("data", {}).get("event_id")
            return str(event_id) if event_id else None
    return None
