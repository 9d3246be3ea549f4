"""Artifact store by URL."""

from __future__ import annotations

import pytest

from generator.artifacts import ArtifactError, FileStore, open_store


def test_file_store_round_trips_bytes(tmp_path) -> None:
    store = open_store((tmp_path / "a").as_uri())
    uri = store.put("job/0.png", b"\x89PNG data")
    assert uri.endswith("/job/0.png")
    assert store.get("job/0.png") == b"\x89PNG data" and store.exists("job/0.png")


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
