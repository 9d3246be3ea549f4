"""Session cookies and CSRF tokens (gateway/dashboard/sessions.py)."""

from __future__ import annotations

from gateway.dashboard.sessions import SessionCodec

NOW = 1_800_000_000.0


def test_issued_session_reads_back_with_its_key_id() -> None:
    codec = SessionCodec("secret-one")
    cookie, session = codec.issue("abc123", now=NOW)
    assert codec.read(cookie, now=NOW + 1) == session
    assert session.key_id == "abc123"


def test_cookie_does_not_contain_the_api_key_or_the_secret() -> None:
    cookie, _ = SessionCodec("secret-one").issue("abc123", now=NOW)
    assert "lgw_" not in cookie and "secret-one" not in cookie


def test_expired_session_is_rejected() -> None:
    codec = SessionCodec("secret-one", ttl_s=60)
    cookie, _ = codec.issue("abc123", now=NOW)
    assert codec.read(cookie, now=NOW + 61) is None


def test_session_signed_with_another_secret_is_rejected() -> None:
    cookie, _ = SessionCodec("secret-one").issue("abc123", now=NOW)
    assert SessionCodec("secret-two").read(cookie, now=NOW) is None


def test_edited_key_id_breaks_the_signature() -> None:
    import base64
    import json

    codec = SessionCodec("secret-one")
    cookie, _ = codec.issue("abc123", now=NOW)
    body, mac = cookie.split(".")
    data = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    data["k"] = "admin0000001"
    forged = base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()
    assert codec.read(f"{forged}.{mac}", now=NOW) is None


def test_malformed_cookies_are_rejected_without_error() -> None:
    codec = SessionCodec("secret-one")
    for cookie in ("", "nodot", "a.b.c", "!!!.???", "e30.AAAA"):
        assert codec.read(cookie, now=NOW) is None


def test_csrf_token_is_accepted_only_for_its_own_session() -> None:
    codec = SessionCodec("secret-one")
    _, mine = codec.issue("abc123", now=NOW)
    _, other = codec.issue("abc123", now=NOW)
    token = codec.csrf_token(mine)
    assert codec.check_csrf(mine, token)
    assert not codec.check_csrf(other, token)
    assert not codec.check_csrf(mine, None)
    assert not codec.check_csrf(mine, "")


def test_login_token_must_match_the_cookie_and_carry_our_signature() -> None:
    codec = SessionCodec("secret-one")
    token = codec.login_token()
    assert codec.check_login_token(token, token)
    assert not codec.check_login_token(token, codec.login_token())
    assert not codec.check_login_token("nonce.forged", "nonce.forged")
    assert not SessionCodec("secret-two").check_login_token(token, token)


def test_a_dev_gateway_with_the_placeholder_secret_signs_sessions_with_a_random_one_of_its_own(tmp_path) -> None:
    from gateway.settings import DEV_SESSION_SECRET_FILE, with_dev_session_secret
    from tests.conftest import make_settings

    placeholder = make_settings(tmp_path, env="dev", session_secret="dev")
    first = with_dev_session_secret(placeholder).session_secret.get_secret_value()
    assert first != "dev" and len(first) >= 32
    assert with_dev_session_secret(placeholder).session_secret.get_secret_value() == first  # kept for restarts
    assert (tmp_path / DEV_SESSION_SECRET_FILE).stat().st_mode & 0o077 == 0  # readable by its owner only
    cookie, _ = SessionCodec("dev").issue("abc123", now=NOW)  # what anyone could forge with the placeholder
    assert SessionCodec(first).read(cookie, now=NOW) is None
    other = with_dev_session_secret(make_settings(tmp_path / "other", env="dev", session_secret="dev"))
    assert other.session_secret.get_secret_value() != first


def test_a_configured_session_secret_is_used_as_given(tmp_path) -> None:
    from gateway.settings import with_dev_session_secret
    from tests.conftest import make_settings

    settings = make_settings(tmp_path, env="dev", session_secret="a-real-secret-from-the-operator")
    assert with_dev_session_secret(settings) is settings
