"""Artifact store selected by URL: local files (embedded) or S3-compatible object storage (distributed)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse


class ArtifactError(Exception):
    """An artifact could not be stored or read."""


class ArtifactStore(Protocol):
    url: str

    def put(self, key: str, data: bytes, content_type: str = "image/png") -> str: ...

    def get(self, key: str) -> bytes: ...

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None: ...

    def keys(self, prefix: str) -> list[str]:
        """The keys under folder `prefix` (e.g. a job's id): what the store holds, audited or not."""
        ...


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ArtifactError(f"invalid artifact key {key!r}")
    return key


class FileStore:
    """Artifacts as files under one directory; writes are atomic (temp file + rename)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = root.as_uri()

    def put(self, key: str, data: bytes, content_type: str = "image/png") -> str:
        path = self.root / _check_key(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except OSError as exc:
            Path(tmp).unlink(missing_ok=True)
            raise ArtifactError(f"cannot write artifact {key}: {exc}") from exc
        return f"{self.url}/{key}"

    def get(self, key: str) -> bytes:
        path = self.root / _check_key(key)
        try:
            return path.read_bytes()
        except FileNotFoundError as exc:
            raise ArtifactError(f"artifact {key} not found") from exc

    def exists(self, key: str) -> bool:
        return (self.root / _check_key(key)).is_file()

    def delete(self, key: str) -> None:
        try:
            (self.root / _check_key(key)).unlink(missing_ok=True)
        except OSError as exc:
            raise ArtifactError(f"cannot delete artifact {key}: {exc}") from exc

    def keys(self, prefix: str) -> list[str]:
        folder = self.root / _check_key(prefix)
        try:
            return sorted(f"{prefix}/{path.relative_to(folder).as_posix()}" for path in folder.rglob("*")
                          if path.is_file() and not path.name.startswith(".tmp-"))
        except OSError as exc:
            raise ArtifactError(f"cannot list artifacts under {prefix}: {exc}") from exc


class S3Store:
    """Artifacts in an S3-compatible bucket (AWS S3, MinIO); endpoint and credentials from boto3's chain."""

    def __init__(self, bucket: str, prefix: str, endpoint_url: str | None = None) -> None:
        import boto3

        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._client = boto3.client("s3", endpoint_url=endpoint_url)

    def _key(self, key: str) -> str:
        key = _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, data: bytes, content_type: str = "image/png") -> str:
        try:
            self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, ContentType=content_type)
        except Exception as exc:  # botocore raises many unrelated types; all mean "not stored"
            raise ArtifactError(f"cannot store artifact {key} in {self.url}: {exc}") from exc
        return f"{self.url}/{key}"

    def get(self, key: str) -> bytes:
        try:
            body = self._client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
            return bytes(body.read())
        except Exception as exc:
            raise ArtifactError(f"cannot read artifact {key} from {self.url}: {exc}") from exc

    def exists(self, key: str) -> bool:
        try:
            self._client.head_object(Bucket=self.bucket, Key=self._key(key))
        except Exception:
            return False
        return True

    def delete(self, key: str) -> None:
        """Remove the object with every stored version of it: the store deletes only images that were never
        audited, and in a versioned bucket a plain delete would keep them as a noncurrent version behind a
        delete marker. An unversioned bucket lists its one version as "null", which deletes the object."""
        full = self._key(key)
        try:
            pages = self._client.get_paginator("list_object_versions").paginate(Bucket=self.bucket, Prefix=full)
            versions = [{"Key": full, "VersionId": entry["VersionId"]} for page in pages
                        for entry in (*page.get("Versions", ()), *page.get("DeleteMarkers", ()))
                        if entry["Key"] == full]
            for start in range(0, len(versions), 1000):  # the most one request may delete
                answer = self._client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": versions[start:start + 1000], "Quiet": True})
                if answer.get("Errors"):
                    first = answer["Errors"][0]
                    raise ArtifactError(f"{first.get('Code')}: {first.get('Message')} "
                                        f"(version {first.get('VersionId')})")
        except Exception as exc:
            raise ArtifactError(f"cannot delete artifact {key} from {self.url}: {exc}") from exc

    def keys(self, prefix: str) -> list[str]:
        folder = self._key(prefix) + "/"
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=folder)
            return sorted(f"{prefix}/{entry['Key'][len(folder):]}" for page in pages
                          for entry in page.get("Contents", ()))
        except Exception as exc:
            raise ArtifactError(f"cannot list artifacts under {prefix} in {self.url}: {exc}") from exc


def open_store(url: str, s3_endpoint_url: str | None = None) -> ArtifactStore:
    """`file:///abs/dir` or `s3://bucket/prefix` -> a store."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return FileStore(Path(parsed.path))
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ArtifactError(f"artifact URL {url!r} names no bucket")
        return S3Store(parsed.netloc, parsed.path, endpoint_url=s3_endpoint_url)
    raise ArtifactError(f"unsupported artifact URL {url!r}: use file:// or s3://")
