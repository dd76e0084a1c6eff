"""Shared storage: one small interface over a local/NFS directory and an S3-compatible bucket.

Every stage reads its inputs from and writes its outputs to storage, addressed by *keys*
(``"base/model.safetensors"``, ``"state.json"``); nothing passes through the driver's memory.

Atomicity, the property everything else relies on:

* local: write ``.<name>.tmp-<uuid>`` in the same directory, fsync, ``os.replace`` — a reader
  sees the old file or the new one, never a half-written one;
* S3: the bytes go to ``<key>.tmp-<uuid>`` and are then moved (server-side copy) to the final
  key, because closing a pyarrow S3 stream after a failure would *complete* the multipart
  upload and publish the partial object. A stage's files are written in a fixed order
  (weights, then ``result.json``) and the driver commits the stage in ``state.json`` last,
  with the checksum; readers trust a file only when ``state.json`` says so.

Every write goes through one primitive, :meth:`Storage.write_stream`. A shared filesystem that
blips once must not cost a stage: on a local/NFS directory :meth:`Storage.put` and
:meth:`Storage.write_bytes` retry it (``LocalStorage.write_attempts`` times, with back-off);
S3 requests are retried by pyarrow itself (``AwsStandardS3RetryStrategy``). A write that keeps
failing raises :class:`StorageError` naming the key.

A storage is described by a small JSON-able dict (:meth:`Storage.describe`) so Ray workers can
reopen it on any node; S3 credentials are *not* part of it (workers take them from their own
environment, as pyarrow does: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` or instance roles).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import urlparse

from mtshare.checkpoint import TMP_MARK, atomic_write, sha256_file

log = logging.getLogger(__name__)

CHUNK = 1 << 20
WRITE_ATTEMPTS = 3  # local / NFS writes
S3_ATTEMPTS = 5     # per S3 request, by pyarrow's AWS retry strategy
WRITE_BACKOFF_S = 0.5  # doubled after every failed attempt


class StorageError(RuntimeError):
    """A storage operation failed (names the key and the storage)."""


class Storage:
    """Common interface. Keys use ``/`` separators and never start with ``/``."""

    uri: str

    # --- the primitives every backend implements ---------------------------------------------
    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def list(self, prefix: str = "") -> list[str]:
        """Every file key under ``prefix`` (recursive), sorted."""
        raise NotImplementedError

    def open_read(self, key: str):
        raise NotImplementedError

    def write_stream(self, key: str, chunks: Iterable[bytes]) -> None:
        """Atomically create or replace ``key`` with the concatenated ``chunks``: on any error
        (raised as :class:`StorageError`) the final name keeps its old content or stays absent."""
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def describe(self) -> dict:
        """A JSON-able description from which :func:`open_storage` reopens this storage."""
        raise NotImplementedError

    def local_path(self, key: str) -> Path | None:
        """The file's path when the storage is a local directory, else None."""
        return None

    # --- derived helpers ---------------------------------------------------------------------
    def read_bytes(self, key: str) -> bytes:
        with self.open_read(key) as f:
            return f.read()

    def read_json(self, key: str) -> Any:
        return json.loads(self.read_bytes(key))

    def write_bytes(self, key: str, data: bytes) -> None:
        """Atomically create or replace ``key`` (retried; see :meth:`_retry_write`)."""
        self._retry_write(key, lambda: self.write_stream(key, [data]))

    def put(self, local_path: str | Path, key: str) -> None:
        """Atomically upload a local file to ``key`` (retried; see :meth:`_retry_write`)."""

        def attempt() -> None:
            with open(local_path, "rb") as f:
                self.write_stream(key, iter(lambda: f.read(CHUNK), b""))

        self._retry_write(key, attempt)

    write_attempts = 1  # a backend whose client retries by itself needs no loop on top

    def _retry_write(self, key: str, attempt) -> None:
        delay = WRITE_BACKOFF_S
        for i in range(1, self.write_attempts + 1):
            try:
                return attempt()
            except StorageError as e:
                if i == self.write_attempts:
                    if i == 1:
                        raise
                    raise StorageError(f"{e} (gave up after {i} attempts)") from None
                log.warning("storage: write %d/%d of %s failed, retrying in %.1fs: %s", i, self.write_attempts, key,
                            delay, e)
                time.sleep(delay)
                delay *= 2

    def write_json(self, key: str, obj: Any) -> None:
        self.write_bytes(key, json.dumps(obj, indent=1, sort_keys=True).encode())

    def sha256(self, key: str) -> str:
        """Streamed sha256 of a stored file (what ``state.json`` checksums are compared with)."""
        h = hashlib.sha256()
        with self.open_read(key) as f:
            for chunk in iter(lambda: f.read(CHUNK), b""):
                h.update(chunk)
        return h.hexdigest()

    def get(self, key: str, local_path: str | Path, expected_sha256: str | None = None) -> Path:
        """Download ``key`` to ``local_path`` atomically; with ``expected_sha256`` the bytes are
        verified *before* the file appears under its final name (a corrupt input is never used)."""
        local_path = Path(local_path)
        local_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = local_path.with_name(f".{local_path.name}.tmp-{uuid.uuid4().hex[:8]}")
        h = hashlib.sha256()
        try:
            with self.open_read(key) as src, open(tmp, "wb") as dst:
                for chunk in iter(lambda: src.read(CHUNK), b""):
                    h.update(chunk)
                    dst.write(chunk)
            if expected_sha256 is not None and h.hexdigest() != expected_sha256:
                raise StorageError(
                    f"{self.uri}/{key}: checksum mismatch (expected sha256 {expected_sha256[:12]}…, "
                    f"got {h.hexdigest()[:12]}…)"
                )
            os.replace(tmp, local_path)
        finally:
            tmp.unlink(missing_ok=True)
        return local_path

    def delete_prefix(self, prefix: str) -> None:
        for key in self.list(prefix):
            self.delete(key)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


def _clean_key(key: str) -> str:
    parts = [p for p in key.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise StorageError(f"storage key {key!r} escapes the storage root")
    return "/".join(parts)


class LocalStorage(Storage):
    """A directory every node sees (local disk on one machine, NFS on a cluster)."""

    write_attempts = WRITE_ATTEMPTS

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / _clean_key(key)

    def local_path(self, key: str) -> Path:
        return self._path(key)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        base = self._path(prefix) if prefix else self.root
        if base.is_file():
            return [_clean_key(prefix)]
        if not base.is_dir():
            return []
        return sorted(
            p.relative_to(self.root).as_posix() for p in base.rglob("*")
            if p.is_file() and TMP_MARK not in p.name
        )

    def open_read(self, key: str):
        try:
            return open(self._path(key), "rb")
        except FileNotFoundError:
            raise StorageError(f"{self.uri}/{key}: not found") from None

    def write_stream(self, key: str, chunks: Iterable[bytes]) -> None:
        try:
            atomic_write(self._path(key), chunks)
        except OSError as e:
            raise StorageError(f"{self.uri}/{key}: write failed ({e})") from None

    def sha256(self, key: str) -> str:
        try:
            return sha256_file(self._path(key))
        except FileNotFoundError:
            raise StorageError(f"{self.uri}/{key}: not found") from None

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        path = self._path(prefix)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)  # with the empty folders a file walk leaves
        else:
            path.unlink(missing_ok=True)

    def describe(self) -> dict:
        return {"kind": "local", "root": str(self.root)}


class S3Storage(Storage):
    """An S3-compatible bucket through ``pyarrow.fs.S3FileSystem`` (AWS, MinIO, moto, Ceph...)."""

    def __init__(self, bucket: str, prefix: str = "", endpoint: str | None = None, region: str | None = None):
        from pyarrow import fs as pafs

        self.bucket, self.prefix, self.endpoint = bucket, prefix.strip("/"), endpoint
        self.region = region or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"
        kwargs: dict[str, Any] = {"region": self.region}
        if endpoint:
            u = urlparse(endpoint if "://" in endpoint else f"http://{endpoint}")
            kwargs.update(endpoint_override=u.netloc, scheme=u.scheme or "http")
        # Credentials come from the environment (AWS_ACCESS_KEY_ID, ...), like any AWS client.
        # Transient errors (throttling, 5xx, timeouts) are retried per request by the AWS SDK.
        kwargs["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=S3_ATTEMPTS)
        self.fs = pafs.S3FileSystem(**kwargs)
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")

    def _path(self, key: str) -> str:
        key = _clean_key(key)
        return "/".join(p for p in (self.bucket, self.prefix, key) if p)

    def exists(self, key: str) -> bool:
        from pyarrow import fs as pafs

        return self.fs.get_file_info(self._path(key)).type == pafs.FileType.File

    def list(self, prefix: str = "") -> list[str]:
        from pyarrow import fs as pafs

        base = self._path(prefix)
        info = self.fs.get_file_info(base)
        if info.type == pafs.FileType.File:
            return [_clean_key(prefix)]
        if info.type == pafs.FileType.NotFound:
            return []
        root = self._path("")
        infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        return sorted(i.path[len(root):].lstrip("/") for i in infos
                      if i.type == pafs.FileType.File and TMP_MARK not in i.base_name)

    def open_read(self, key: str):
        try:
            return self.fs.open_input_stream(self._path(key))
        except FileNotFoundError:
            raise StorageError(f"{self.uri}/{key}: not found") from None
        except OSError as e:
            raise StorageError(f"{self.uri}/{key}: {e}") from None

    def write_stream(self, key: str, chunks: Iterable[bytes]) -> None:
        # pyarrow completes a multipart upload on close(), also when the with-block raised: a
        # failed upload would publish a partial object under its name. So upload to a temporary
        # key and move it (CopyObject: the final object appears whole or not at all).
        final = self._path(key)
        tmp = f"{final}{TMP_MARK}{uuid.uuid4().hex[:8]}"
        try:
            with self.fs.open_output_stream(tmp) as out:
                for chunk in chunks:
                    out.write(chunk)
            self.fs.move(tmp, final)
        except OSError as e:
            raise StorageError(f"{self.uri}/{key}: upload failed ({e})") from None
        finally:
            try:
                self.fs.delete_file(tmp)
            except OSError:  # moved already, or never created
                pass

    def delete(self, key: str) -> None:
        try:
            self.fs.delete_file(self._path(key))
        except FileNotFoundError:
            pass

    def check(self) -> None:
        """The bucket exists and answers (raises StorageError naming the endpoint otherwise)."""
        from pyarrow import fs as pafs

        try:
            info = self.fs.get_file_info(self.bucket)
        except OSError as e:
            raise StorageError(f"{self.uri}: cannot reach the S3 endpoint {self.endpoint or '(AWS)'} ({e})") from None
        if info.type == pafs.FileType.NotFound:
            raise StorageError(f"{self.uri}: bucket '{self.bucket}' not found at {self.endpoint or 'AWS'}")

    def describe(self) -> dict:
        return {"kind": "s3", "bucket": self.bucket, "prefix": self.prefix, "endpoint": self.endpoint,
                "region": self.region}


def open_storage(uri_or_desc: str | dict, endpoint: str | None = None) -> Storage:
    """A storage from a URI (``/path``, ``file:///path``, ``s3://bucket/prefix``) or from a
    :meth:`Storage.describe` dict."""
    if isinstance(uri_or_desc, dict):
        d = dict(uri_or_desc)
        kind = d.pop("kind")
        return LocalStorage(d["root"]) if kind == "local" else S3Storage(**d)
    uri = str(uri_or_desc)
    if uri.startswith("s3://"):
        u = urlparse(uri)
        if not u.netloc:
            raise StorageError(f"{uri}: an S3 URI needs a bucket (s3://bucket/prefix)")
        return S3Storage(u.netloc, u.path, endpoint=endpoint)
    if uri.startswith("file://"):
        uri = urlparse(uri).path
    if "://" in uri:
        raise StorageError(f"{uri}: unsupported storage scheme (use a path or s3://bucket/prefix)")
    return LocalStorage(uri)


def ray_train_storage(storage: Storage) -> tuple[str, Any]:
    """``(storage_path, storage_filesystem)`` for ``ray.train.RunConfig``: Ray Train keeps its runs
    and their checkpoints (mid-stage resume states) under ``_checkpoints/`` of the suite's storage."""
    if isinstance(storage, S3Storage):
        return storage._path("_checkpoints"), storage.fs
    return str(storage.local_path("_checkpoints")), None
