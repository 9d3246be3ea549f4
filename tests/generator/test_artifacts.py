"""Artifact store by URL."""

from __future__ import annotations

import pytest

from generator.artifacts import ArtifactError, FileStore, open_store


def test_file_store_round_trips_bytes(tmp_path) -> None:
    store = open_store((tmp_path / "a").as_uri())
    uri = store.put("job/0.png", b"\x89PNG data")
    assert uri.endswith("/job/0.png")
    assert store.get("job/0.png") == b"\x89PNG data" and store.exists("job/0.png")


def test_file_store_deletes_an_artifact_and_a_missing_one_quietly(tmp_path) -> None:
    store = FileStore(tmp_path)
    store.put("job/0.png", b"\x89PNG data")
    store.delete("job/0.png")
    store.delete("job/0.png")
    assert not store.exists("job/0.png")


@pytest.mark.parametrize("key", ["../escape.png", "/abs.png", "a//b.png", ""])
def test_file_store_refuses_keys_that_leave_its_root(tmp_path, key: str) -> None:
    with pytest.raises(ArtifactError):
        FileStore(tmp_path).put(key, b"x")


def test_missing_artifact_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(ArtifactError, match="not found"):
        FileStore(tmp_path).get("nope.png")


def test_unsupported_url_scheme_is_refused() -> None:
    with pytest.raises(ArtifactError, match="unsupported"):
        open_store("ftp://host/dir")


@pytest.fixture
def s3_endpoint(monkeypatch):
    """A real S3 HTTP endpoint on localhost (moto's server), as MinIO is in docker-compose."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    for name, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="artifacts")
    yield endpoint
    server.stop()


def test_s3_store_shares_artifacts_between_stores_on_different_hosts(s3_endpoint) -> None:
    gateway_side = open_store("s3://artifacts/outputs", s3_endpoint_url=s3_endpoint)
    worker_side = open_store("s3://artifacts/outputs", s3_endpoint_url=s3_endpoint)
    uri = worker_side.put("job/0.png", b"\x89PNG signed")
    assert uri == "s3://artifacts/outputs/job/0.png"
    assert gateway_side.get("job/0.png") == b"\x89PNG signed" and gateway_side.exists("job/0.png")
    assert not gateway_side.exists("job/1.png")
    gateway_side.delete("job/0.png")
    assert not worker_side.exists("job/0.png")


def test_s3_store_reports_a_missing_bucket_clearly(s3_endpoint) -> None:
    store = open_store("s3://no-such-bucket/x", s3_endpoint_url=s3_endpoint)
    with pytest.raises(ArtifactError, match="cannot store"):
        store.put("a.png", b"x")


def test_s3_store_delete_leaves_no_version_behind_in_a_versioned_bucket(s3_endpoint) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.put_bucket_versioning(Bucket="artifacts", VersioningConfiguration={"Status": "Enabled"})
    store = open_store("s3://artifacts/outputs", s3_endpoint_url=s3_endpoint)
    store.put("job/0.png", b"\x89PNG first try")
    store.put("job/0.png", b"\x89PNG unaudited")
    store.put("job/0.png.bak", b"another key that shares the prefix")
    store.delete("job/0.png")
    listed = client.list_object_versions(Bucket="artifacts", Prefix="outputs/job/")
    left = [(v["Key"], "version") for v in listed.get("Versions", [])] + [
        (m["Key"], "delete marker") for m in listed.get("DeleteMarkers", [])]
    assert left == [("outputs/job/0.png.bak", "version")]
    store.delete("job/0.png")  # nothing left: quietly done


@pytest.mark.parametrize("kind", ["file", "s3"])
def test_a_store_lists_the_keys_under_a_job_folder_and_nothing_beside_it(kind: str, tmp_path, request) -> None:
    import uuid

    if kind == "file":
        store = open_store((tmp_path / "a").as_uri())
    else:  # moto keeps one bucket for the whole test session: a folder of this test's own
        store = open_store("s3://artifacts/outputs", s3_endpoint_url=request.getfixturevalue("s3_endpoint"))
    job = str(uuid.uuid4())
    assert store.keys(job) == []
    for key in (f"{job}/1.png", f"{job}/0.png", f"{job}0/0.png"):
        store.put(key, b"\x89PNG")
    assert store.keys(job) == [f"{job}/0.png", f"{job}/1.png"]
    store.delete(f"{job}/0.png")
    assert store.keys(job) == [f"{job}/1.png"]
