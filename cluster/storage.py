"""Shared storage: one small interface over a local/NFS directory and an S3-compatible bucket.

Every stage reads its inputs from and writes its outputs to storage, addressed by *keys*
(``"base/model.safetensors"``, ``"state.json"``); nothing passes through the driver's memory.

Atomicity, the property everything else relies on:

* local: write ``.<name>.tmp-<uuid>`` in the same directory, fsync, ``os.replace`` — a reader
  sees the old file or the new one, never a half-written one;
* S3: an object becomes visible only when its (multipart) upload completes, so writing the
  final key directly is already atomic. A stage's files are written in a fixed order
  (weights, then ``result.json``) and the driver commits the stage in ``state.json`` last,
  with the checksum; readers trust a file only when ``state.json`` says so.

A storage is described by a small JSON-able dict (:meth:`Storage.describe`) so Ray workers can
reopen it on any node; S3 credentials are *not* part of it (workers take them from their own
environment, as pyarrow does: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` or instance roles).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

CHUNK = 1 << 20


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

    def write_bytes(self, key: str, data: bytes) -> None:
        """Atomically create or replace ``key``."""
        raise NotImplementedError

    def put(self, local_path: str | Path, key: str) -> None:
        """Atomically upload a local file to ``key``."""
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
            if p.is_file() and ".tmp-" not in p.name
        )

    def open_read(self, key: str):
        try:
            return open(self._path(key), "rb")
        except FileNotFoundError:
            raise StorageError(f"{self.uri}/{key}: not found") from None

    def _atomic(self, key: str, write) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def write_bytes(self, key: str, data: bytes) -> None:
        self._atomic(key, lambda f: f.write(data))

    def put(self, local_path: str | Path, key: str) -> None:
        with open(local_path, "rb") as src:
            self._atomic(key, lambda f: shutil.copyfileobj(src, f, CHUNK))

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

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
        return sorted(i.path[len(root):].lstrip("/") for i in infos if i.type == pafs.FileType.File)

    def open_read(self, key: str):
        try:
            return self.fs.open_input_stream(self._path(key))
        except FileNotFoundError:
            raise StorageError(f"{self.uri}/{key}: not found") from None
        except OSError as e:
            raise StorageError(f"{self.uri}/{key}: {e}") from None

    def _upload(self, key: str, chunks: Iterator[bytes]) -> None:
        # The object appears only when close() completes the upload: atomic by construction.
        try:
            with self.fs.open_output_stream(self._path(key)) as out:
                for chunk in chunks:
                    out.write(chunk)
        except OSError as e:
            raise StorageError(f"{self.uri}/{key}: upload failed ({e})") from None

    def write_bytes(self, key: str, data: bytes) -> None:
        self._upload(key, iter([data]))

    def put(self, local_path: str | Path, key: str) -> None:
        with open(local_path, "rb") as f:
            self._upload(key, iter(lambda: f.read(CHUNK), b""))

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
    """``(storage_path, storage_filesystem)`` for ``ray.train.RunConfig``: Ray Train keeps its own
    bookkeeping (reported checkpoint pointers) under ``_ray_train/`` of the suite's storage."""
    if isinstance(storage, S3Storage):
        return storage._path("_ray_train"), storage.fs
    return str(storage.local_path("_ray_train")), None
