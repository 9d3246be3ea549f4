"""Who may call what: every endpoint x every role, plus no key and a revoked key."""

from __future__ import annotations

import pytest

ROLES = ("creator", "reviewer", "auditor", "policy_admin", "admin")
ANY = set(ROLES)
GEN = {"model": "tiny-c2i", "class_id": 0, "params": {"seed": 1}}

# (method, path, body kind, roles allowed, status an allowed role gets)
MATRIX = [
    ("POST", "/v1/generations", "gen", {"creator", "admin"}, 202),
    ("GET", "/v1/generations", None, {"creator", "auditor", "reviewer", "admin"}, 200),
    ("GET", "/v1/generations/{job}", None, {"creator", "auditor", "reviewer", "admin"}, 200),
    ("GET", "/v1/generations/{job}/images/0", None, {"creator", "auditor", "reviewer", "admin"}, 200),
    ("POST", "/v1/moderations", "moderation", {"creator", "admin"}, 200),
    ("GET", "/v1/models", None, ANY, 200),
    ("GET", "/v1/models/tiny-c2i", None, ANY, 200),
    ("GET", "/v1/policies/active", None, ANY, 200),
    ("GET", "/v1/policies", None, {"auditor", "policy_admin", "admin"}, 200),
    ("GET", "/v1/policies/{revision}", None, {"auditor", "policy_admin", "admin"}, 200),
    ("POST", "/v1/policies", "policy", {"policy_admin", "admin"}, 201),
    ("POST", "/v1/policies/dry-run", "policy", {"policy_admin", "auditor", "admin"}, 200),
    ("POST", "/v1/policies/{revision}/activate?reason=roles+matrix", None, {"policy_admin", "admin"}, 200),
    ("GET", "/v1/review", None, {"reviewer", "admin"}, 200),
    ("POST", "/v1/review/{job}", "review", {"reviewer", "admin"}, 409),  # the job is completed, not in review
    ("GET", "/v1/review/{job}/images/0", None, {"reviewer", "admin"}, 404),  # nothing held: it was released
    ("GET", "/v1/audit/events", None, {"auditor", "admin"}, 200),
    ("GET", "/v1/audit/export", None, {"auditor", "admin"}, 200),
    ("GET", "/v1/audit/verify", None, {"auditor", "admin"}, 200),
    ("POST", "/v1/provenance/verify", "image", ANY, 200),
]
IDS = [f"{method} {path}" for method, path, *_ in MATRIX]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_models):
    """One gateway, one key per role (team design), a finished job of team design, the active policy."""
    from fastapi.testclient import TestClient

    from gateway.main import create_app
    from gateway.state import build_state, close_state
    from tests.conftest import LEXICAL_POLICY, Gateway, make_settings

    settings = make_settings(tmp_path_factory.mktemp("roles") / "var", rate_limit_per_minute=0,
                             models_dir=tiny_models, default_model="tiny-c2i", policy_file=LEXICAL_POLICY)
    state = build_state(settings)
    with TestClient(create_app(settings, state=state), raise_server_exceptions=False) as client:
        gw = Gateway(client, state)
        keys = {role: gw.key(role, team="design") for role in ROLES}
        job = client.post("/v1/generations", json=GEN, headers=gw.auth(keys["creator"])).json()
        gw.wait(job["id"], keys["creator"])
        active = client.get("/v1/policies/active", headers=gw.auth(keys["creator"])).json()
        image = client.get(f"/v1/generations/{job['id']}/images/0", headers=gw.auth(keys["creator"])).content
        yield gw, keys, job["id"], active, image
    close_state(state)


def _call(gw, method, path, body, key, job_id, active, image):
    path = path.format(job=job_id, revision=active["revision"])
    headers = gw.auth(key) if key else {}
    kwargs: dict = {}
    if body == "gen":
        kwargs["json"] = GEN
    elif body == "moderation":
        kwargs["json"] = {"prompt": "a red star", "model": "tiny-c2i"}
    elif body == "review":
        kwargs["json"] = {"decision": "approve", "reason": "looks fine to me"}
    elif body == "policy":
        kwargs["content"] = active["source"].encode()
        headers["Content-Type"] = "application/yaml"
    elif body == "image":
        kwargs["content"] = image
        headers["Content-Type"] = "image/png"
    return gw.client.request(method, path, headers=headers, **kwargs)


@pytest.mark.parametrize("method,path,body,allowed,expected", MATRIX, ids=IDS)
def test_each_role_is_allowed_or_forbidden_as_specified(world, method, path, body, allowed, expected) -> None:
    gw, keys, job_id, active, image = world
    for role in ROLES:
        response = _call(gw, method, path, body, keys[role], job_id, active, image)
        if role in allowed:
            assert response.status_code == expected, (role, response.status_code, response.text)
        else:
            assert response.status_code == 403, (role, response.status_code, response.text)
            assert response.json()["error"]["code"] == "forbidden"


@pytest.mark.parametrize("method,path,body,allowed,expected", MATRIX, ids=IDS)
def test_no_key_and_revoked_key_are_unauthorized(world, method, path, body, allowed, expected) -> None:
    gw, keys, job_id, active, image = world
    response = _call(gw, method, path, body, None, job_id, active, image)
    assert response.status_code == 401 and response.json()["error"]["code"] == "unauthorized"
    revoked = gw.key("admin", team="design")
    from gateway.auth import revoke_key

    with gw.state.ctx.sessions() as session, session.begin():
        revoke_key(session, revoked.split("_")[1])
    response = _call(gw, method, path, body, revoked, job_id, active, image)
    assert response.status_code == 401 and response.json()["error"]["code"] == "unauthorized"


def test_creator_of_another_team_cannot_see_the_job(world) -> None:
    gw, keys, job_id, active, image = world
    outsider = gw.key("creator", team="legal")
    assert gw.client.get(f"/v1/generations/{job_id}", headers=gw.auth(outsider)).status_code == 404
    listed = gw.client.get("/v1/generations", headers=gw.auth(outsider)).json()
    assert job_id not in {j["id"] for j in listed["data"]}


def _verify(gw, key, image: bytes) -> dict:
    response = gw.client.post("/v1/provenance/verify", content=image,
                              headers={**gw.auth(key), "Content-Type": "image/png"})
    assert response.status_code == 200, response.text
    return response.json()


def test_provenance_verify_shows_the_audit_event_only_to_keys_that_may_see_its_team(world) -> None:
    gw, keys, job_id, active, image = world
    own = _verify(gw, keys["creator"], image)
    assert own["ok"] is True and own["audit_event"]["job_id"] == job_id and own["matches_audit_record"] is True
    assert _verify(gw, keys["auditor"], image)["audit_event"]["job_id"] == job_id
    outsider = _verify(gw, gw.key("creator", team="legal"), image)
    assert outsider["ok"] is True and outsider["audit_event_id"] == own["audit_event_id"]  # what the manifest says
    assert outsider["audit_event"] is None and "matches_audit_record" not in outsider
    assert "team this key cannot see" in outsider["audit_event_withheld"]


def test_a_manifest_from_an_untrusted_signer_naming_an_audit_event_does_not_open_the_log(world, tmp_path) -> None:
    import io

    from PIL import Image

    from audit.dev_ca import ensure_dev_ca
    from audit.provenance import AUDIT_ASSERTION, load_signer

    gw, keys, job_id, active, image = world
    event_id = _verify(gw, keys["creator"], image)["audit_event_id"]
    stranger = ensure_dev_ca(tmp_path / "stranger-ca")  # a valid signature, from a root nobody configured
    signer = load_signer(stranger.chain_pem_path, stranger.key_path)
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(buf, format="PNG")
    forged = signer.sign_png(buf.getvalue(), title="forged", software_agent="someone",
                             assertions={AUDIT_ASSERTION: {"event_id": event_id, "job_id": job_id}}).data
    report = _verify(gw, keys["creator"], forged)
    assert report["signature_valid"] is True and report["signer_trusted"] is False
    assert report["audit_event_id"] == event_id and report["audit_event"] is None
    assert report["audit_event_withheld"] == "the manifest is not validly signed by a trusted signer"
