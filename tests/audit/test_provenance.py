"""audit/provenance.py and audit/dev_ca.py: C2PA signing and verification kept in plain words."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from PIL import Image

from audit.provenance import (
    AUDIT_ASSERTION,
    TRAINED_ALGORITHMIC_MEDIA,
    DevCA,
    ProvenanceError,
    ProvenanceSigner,
    callback_signer,
    ensure_dev_ca,
    load_signer,
    verify_image,
)


def make_png(size: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (200, 80, 20)).save(buffer, format="PNG")
    return buffer.getvalue()


PNG_256 = make_png(256)
C2PA_STORE_UUID = bytes.fromhex("6332706100110010800000AA00389B71")
ASSERTIONS = {
    "com.llamagen-gateway.lineage": {
        "model": "demo-shapes-t2i",
        "stages": [{"dataset": "shapes", "captions": "programmatic"}],
    },
    "com.llamagen-gateway.policy-decision": {"revision": "rev1", "action": "allow", "reasons": []},
    AUDIT_ASSERTION: {"event_id": "6f1c7c2e-0000-4000-8000-000000000001", "job_id": "job-1"},
}


def sign(signer: ProvenanceSigner, png: bytes) -> Any:
    return signer.sign_png(
        png,
        title="job-1-0.png",
        software_agent="llamagen-gateway/0.1.0 (demo-shapes-t2i 1)",
        assertions=ASSERTIONS,
    )


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"bad CRC on {kind!r}"
        chunks.append((kind, body))
        pos += 12 + length
    return chunks


@pytest.fixture(scope="module")
def signed(signer: ProvenanceSigner) -> Any:
    return sign(signer, PNG_256)


def root_pem(ca: DevCA) -> bytes:
    return ca.root_pem_path.read_bytes()


# --- development CA -------------------------------------------------------------------------------------


def test_dev_ca_files_are_named_dev_only(dev_ca: DevCA) -> None:
    for path in (dev_ca.chain_pem_path, dev_ca.key_path, dev_ca.root_pem_path, dev_ca.root_key_path):
        assert path.name.startswith("DEV-ONLY-") and path.exists()


def test_dev_ca_leaf_has_the_extensions_c2pa_requires(dev_ca: DevCA) -> None:
    (leaf,) = x509.load_pem_x509_certificates(dev_ca.chain_pem_path.read_bytes())  # leaf only, root excluded
    ext = leaf.extensions
    assert ext.get_extension_for_class(x509.BasicConstraints).value.ca is False
    usage = ext.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign
    assert ext.get_extension_for_class(x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.EMAIL_PROTECTION]
    )
    ext.get_extension_for_class(x509.AuthorityKeyIdentifier)
    ext.get_extension_for_class(x509.SubjectKeyIdentifier)


def test_dev_ca_leaf_is_issued_by_the_root(dev_ca: DevCA) -> None:
    leaf = x509.load_pem_x509_certificate(dev_ca.chain_pem_path.read_bytes())
    leaf.verify_directly_issued_by(x509.load_pem_x509_certificate(root_pem(dev_ca)))


def test_dev_ca_is_reused_once_created(tmp_path: Path) -> None:
    first = ensure_dev_ca(tmp_path)
    before = first.chain_pem_path.read_bytes()
    ensure_dev_ca(tmp_path)
    assert first.chain_pem_path.read_bytes() == before


def test_dev_ca_refuses_a_different_algorithm_for_existing_keys(tmp_path: Path) -> None:
    ensure_dev_ca(tmp_path, alg="ES256")
    from audit.provenance import DevCAError

    with pytest.raises(DevCAError, match="is a ES256 key but Ed25519 was asked for"):
        ensure_dev_ca(tmp_path, alg="Ed25519")


# --- signing ------------------------------------------------------------------------------------------


def test_signed_image_verifies_as_valid_trusted_and_intact(signed: Any, dev_ca: DevCA) -> None:
    report = verify_image(signed.data, trust_anchors_pem=root_pem(dev_ca))
    assert (report.signature_valid, report.signer_trusted, report.content_intact) == (True, True, True)
    assert report.ok and report.summary.endswith("signer trusted; content intact")


def test_signed_image_reports_the_manifest_id_returned_by_signing(signed: Any) -> None:
    assert verify_image(signed.data).manifest_id == signed.manifest_id


def test_manifest_declares_a_created_action_by_trained_algorithmic_media(signed: Any) -> None:
    manifest = verify_image(signed.data).manifest or {}
    actions = next(a for a in manifest["assertions"] if a["label"].startswith("c2pa.actions"))["data"]["actions"]
    assert actions == [
        {
            "action": "c2pa.created",
            "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA,
            "softwareAgent": {"name": "llamagen-gateway/0.1.0 (demo-shapes-t2i 1)"},
        }
    ]


def test_manifest_carries_lineage_policy_and_audit_assertions(signed: Any) -> None:
    manifest = verify_image(signed.data).manifest or {}
    carried = {a["label"]: a["data"] for a in manifest["assertions"]}
    for label, data in ASSERTIONS.items():
        assert carried[label] == data


def test_report_names_the_audit_event_the_manifest_points_to(signed: Any) -> None:
    assert verify_image(signed.data).audit_event_id == ASSERTIONS[AUDIT_ASSERTION]["event_id"]


def test_signed_image_has_no_thumbnail(signed: Any) -> None:
    manifest = verify_image(signed.data).manifest or {}
    assert "thumbnail" not in manifest
    assert not any("thumbnail" in a["label"] for a in manifest["assertions"])


def test_signing_adds_only_a_few_kilobytes(signed: Any) -> None:
    assert len(signed.data) - len(PNG_256) < 8_000


def test_signed_png_is_a_well_formed_png_with_a_c2pa_jumbf_chunk_before_the_pixels(signed: Any) -> None:
    """What any conformant reader looks for: a caBX chunk holding a JUMBF superbox of type C2PA store."""
    chunks = png_chunks(signed.data)
    kinds = [kind for kind, _ in chunks]
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and kinds.count(b"caBX") == 1
    assert kinds.index(b"caBX") < kinds.index(b"IDAT")
    body = dict(chunks)[b"caBX"]
    assert body[4:8] == b"jumb" and body[12:16] == b"jumd"
    assert body[16:32] == C2PA_STORE_UUID and body[33:38] == b"c2pa\x00"


def test_signed_png_still_decodes_to_the_same_pixels(signed: Any) -> None:
    original = Image.open(io.BytesIO(PNG_256))
    assert Image.open(io.BytesIO(signed.data)).tobytes() == original.tobytes()


@pytest.mark.parametrize("alg", ["PS256", "Ed25519"])
def test_other_algorithms_sign_verifiable_images(alg: Any, tmp_path: Path, png_bytes: bytes) -> None:
    ca = ensure_dev_ca(tmp_path, alg=alg)
    signed = sign(load_signer(ca.chain_pem_path, ca.key_path, alg=alg), png_bytes)
    assert verify_image(signed.data, trust_anchors_pem=root_pem(ca)).ok


def test_callback_signer_signs_with_a_key_held_elsewhere(dev_ca: DevCA, png_bytes: bytes) -> None:
    key = serialization.load_pem_private_key(dev_ca.key_path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    calls: list[int] = []

    def kms_sign(data: bytes) -> bytes:  # stands in for a KMS/HSM API returning a DER ECDSA signature
        calls.append(len(data))
        return key.sign(data, ec.ECDSA(hashes.SHA256()))

    signer = callback_signer(kms_sign, dev_ca.chain_pem_path.read_bytes(), "ES256")
    signed = sign(signer, png_bytes)
    assert calls and verify_image(signed.data, trust_anchors_pem=root_pem(dev_ca)).ok


def test_a_signer_whose_signatures_do_not_match_its_certificate_fails_its_self_test(dev_ca: DevCA) -> None:
    other_key = ec.generate_private_key(ec.SECP256R1())  # a KMS key rotated without a new certificate

    def kms_sign(data: bytes) -> bytes:
        return other_key.sign(data, ec.ECDSA(hashes.SHA256()))

    signer = callback_signer(kms_sign, dev_ca.chain_pem_path.read_bytes(), "ES256")
    with pytest.raises(ProvenanceError, match="callback signer"):
        signer.self_test()


def test_a_loaded_key_signer_passes_its_self_test_and_its_images_verify(
    dev_ca: DevCA, png_bytes: bytes
) -> None:
    signer = load_signer(dev_ca.chain_pem_path, dev_ca.key_path)  # load_signer runs the self-test
    signer.self_test()
    assert verify_image(sign(signer, png_bytes).data, trust_anchors_pem=root_pem(dev_ca)).ok


def test_sign_png_refuses_bytes_that_are_not_png(signer: ProvenanceSigner) -> None:
    with pytest.raises(ProvenanceError, match="not a PNG"):
        sign(signer, b"GIF89a...")


def test_sign_png_refuses_reserved_assertion_labels(signer: ProvenanceSigner, png_bytes: bytes) -> None:
    with pytest.raises(ProvenanceError, match="c2pa.training-mining"):
        signer.sign_png(png_bytes, title="t", software_agent="a", assertions={"c2pa.training-mining": {}})


def test_load_signer_refuses_a_chain_that_starts_with_the_root(dev_ca: DevCA, tmp_path: Path) -> None:
    chain = tmp_path / "root-first.pem"
    chain.write_bytes(root_pem(dev_ca) + dev_ca.chain_pem_path.read_bytes())
    with pytest.raises(ProvenanceError, match="leaf first"):
        load_signer(chain, dev_ca.key_path)


def test_load_signer_refuses_a_key_of_another_certificate(dev_ca: DevCA, tmp_path: Path) -> None:
    other = ensure_dev_ca(tmp_path)
    with pytest.raises(ProvenanceError, match="is not the key of the first certificate"):
        load_signer(dev_ca.chain_pem_path, other.key_path)


def test_load_signer_refuses_an_algorithm_that_does_not_fit_the_key(dev_ca: DevCA) -> None:
    with pytest.raises(ProvenanceError, match="is a ES256 key but the signing algorithm is set to PS256"):
        load_signer(dev_ca.chain_pem_path, dev_ca.key_path, alg="PS256")


def test_load_signer_names_a_missing_file(dev_ca: DevCA, tmp_path: Path) -> None:
    with pytest.raises(ProvenanceError, match="cannot read the signing key"):
        load_signer(dev_ca.chain_pem_path, tmp_path / "missing.pem")


# --- verification in plain words ----------------------------------------------------------------------


def test_valid_signature_without_trust_anchors_is_not_called_invalid(signed: Any) -> None:
    report = verify_image(signed.data)
    assert (report.signature_valid, report.signer_trusted, report.content_intact) == (True, False, True)
    assert report.summary.startswith("valid signature") and "no trust anchors configured" in report.summary


def test_signer_outside_the_trust_list_is_reported_as_untrusted_not_invalid(signed: Any, tmp_path: Path) -> None:
    stranger = ensure_dev_ca(tmp_path / "stranger")
    report = verify_image(signed.data, trust_anchors_pem=root_pem(stranger))
    assert report.signature_valid and not report.signer_trusted
    assert "valid signature" in report.summary and "NOT in your trust list" in report.summary


def test_altered_pixels_are_reported_as_content_altered(signed: Any, dev_ca: DevCA) -> None:
    tampered = bytearray(signed.data)
    tampered[-20] ^= 0x01  # inside the last IDAT chunk
    report = verify_image(bytes(tampered), trust_anchors_pem=root_pem(dev_ca))
    assert report.signature_valid and not report.content_intact and not report.ok
    assert "content ALTERED" in report.summary
    assert any(f["code"] == "assertion.dataHash.mismatch" for f in report.failures)


def test_an_unsigned_png_has_no_manifest(png_bytes: bytes) -> None:
    report = verify_image(png_bytes)
    assert not report.has_manifest and report.summary.startswith("no C2PA manifest found")


def test_junk_bytes_give_a_report_not_a_crash() -> None:
    report = verify_image(b"this is not an image at all")
    assert not report.has_manifest and "no C2PA manifest found" in report.summary


def test_an_empty_file_is_a_provenance_error() -> None:
    with pytest.raises(ProvenanceError, match="empty"):
        verify_image(b"")


def test_trust_anchors_that_are_not_pem_are_a_provenance_error(signed: Any) -> None:
    with pytest.raises(ProvenanceError, match="trust anchors are not PEM"):
        verify_image(signed.data, trust_anchors_pem=b"junk")


def test_report_to_dict_carries_the_three_answers_and_the_summary(signed: Any) -> None:
    report = verify_image(signed.data).to_dict()
    assert {"signature_valid", "signer_trusted", "content_intact", "summary", "audit_event_id", "ok"} <= set(report)


@pytest.mark.parametrize("cut", [40, 500, 2000])
def test_a_truncated_signed_image_gives_a_report_not_a_crash(signed: Any, cut: int) -> None:
    report = verify_image(signed.data[:cut])
    assert not report.ok and report.summary
