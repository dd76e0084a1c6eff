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

Every write goes through one primitive, :meth:`Storage.write_stream`; :meth:`Storage.put` and
:meth:`Storage.write_bytes` retry it (``WRITE_ATTEMPTS`` times, with back-off) because a shared
filesystem or bucket that blips once must not cost a stage. A write that keeps failing raises
:class:`StorageError` naming the key. For fault-injection tests, ``MTSHARE_STORAGE_FAULTS``
names a JSON rules file and every storage opened in that process fails the writes the rules
select (:class:`FaultyStorage`; see docs/reliability.md).

A storage is described by a small JSON-able dict (:meth:`Storage.describe`) so Ray workers can
reopen it on any node; S3 credentials are *not* part of it (workers take them from their own
environment, as pyarrow does: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` or instance roles).
"""
from __future__ import annotations

import errno
import fnmatch
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator
from urllib.parse import urlparse

from mtshare.checkpoint import TMP_MARK, atomic_write, sha256_file

log = logging.getLogger(__name__)

CHUNK = 1 << 20
WRITE_ATTEMPTS = 3
WRITE_BACKOFF_S = 0.5  # doubled after every failed attempt
FAULTS_ENV = "MTSHARE_STORAGE_FAULTS"


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

    def _retry_write(self, key: str, attempt) -> None:
        delay = WRITE_BACKOFF_S
        for i in range(1, WRITE_ATTEMPTS + 1):
            try:
                return attempt()
            except StorageError as e:
                if i == WRITE_ATTEMPTS:
                    raise StorageError(f"{e} (gave up after {WRITE_ATTEMPTS} attempts)") from None
                log.warning("storage: write %d/%d of %s failed, retrying in %.1fs: %s", i, WRITE_ATTEMPTS, key, delay, e)
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


class FaultyStorage(Storage):
    """Fault injection: another storage whose writes fail as a rules file says.

    The rules file (JSON, re-read on every write so a test can change it while a suite runs)::

        [{"key": "*/model.safetensors", "error": "full", "times": 1, "after_bytes": 4096}]

    A write whose key matches ``key`` (fnmatch) fails with ``error`` — ``full`` (ENOSPC) or
    ``unavailable`` (EIO) — after ``after_bytes`` bytes went to the underlying storage, i.e. in
    the middle of the real atomic write path. ``times`` counts failures over every process
    sharing the rules file (each one leaves a record in ``<rules file>.hits/`` saying whether
    anything was visible under the final name right after the failure). Reads are untouched.
    """

    def __init__(self, inner: Storage, rules_path: str | Path):
        self.inner, self.rules_path = inner, Path(rules_path)
        self.uri = inner.uri

    def _rules(self) -> list[dict]:
        try:
            return json.loads(self.rules_path.read_text())
        except (OSError, ValueError):
            return []

    def _claim(self, index: int, times: int) -> Path | None:
        """A hit record for rule ``index`` if it may still fail (O_EXCL: no double counting)."""
        hits = self.rules_path.with_name(self.rules_path.name + ".hits")
        hits.mkdir(exist_ok=True)
        for n in range(times):
            path = hits / f"rule{index}-{n}.json"
            try:
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
                return path
            except FileExistsError:
                continue
        return None

    def write_stream(self, key: str, chunks: Iterable[bytes]) -> None:
        for index, rule in enumerate(self._rules()):
            if not fnmatch.fnmatchcase(key, rule["key"]):
                continue
            record = self._claim(index, int(rule.get("times", 1)))
            if record is None:
                continue
            code = errno.ENOSPC if rule.get("error", "full") == "full" else errno.EIO
            failing = _fail_after(chunks, int(rule.get("after_bytes", 0)), code)
            try:
                self.inner.write_stream(key, failing)
            except StorageError as e:
                visible = self.inner.exists(key)
                record.write_text(json.dumps({"key": key, "error": str(e), "visible_after_failure": visible,
                                              "pid": os.getpid(), "time": time.time()}))
                raise
            raise AssertionError(f"injected fault on {key} did not fail the write")
        self.inner.write_stream(key, chunks)

    # everything else is the underlying storage's
    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def list(self, prefix: str = "") -> list[str]:
        return self.inner.list(prefix)

    def open_read(self, key: str):
        return self.inner.open_read(key)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def describe(self) -> dict:
        return self.inner.describe()  # workers wrap it again from their own environment

    def local_path(self, key: str) -> Path | None:
        return self.inner.local_path(key)

    def check(self) -> None:
        getattr(self.inner, "check", lambda: None)()

    def __getattr__(self, name: str):  # root, fs, ... of the underlying storage
        return getattr(self.__dict__["inner"], name)


def unwrap(storage: Storage) -> Storage:
    """The real backend under any fault-injection wrapper."""
    return unwrap(storage.inner) if isinstance(storage, FaultyStorage) else storage


def _fail_after(chunks: Iterable[bytes], after_bytes: int, code: int) -> Iterator[bytes]:
    sent = 0
    for chunk in chunks:
        if sent + len(chunk) > after_bytes:
            if after_bytes > sent:
                yield chunk[: after_bytes - sent]
            break
        sent += len(chunk)
        yield chunk
    raise OSError(code, f"{os.strerror(code)} (injected fault)")


def open_storage(uri_or_desc: str | dict, endpoint: str | None = None) -> Storage:
    """A storage from a URI (``/path``, ``file:///path``, ``s3://bucket/prefix``) or from a
    :meth:`Storage.describe` dict; wrapped in :class:`FaultyStorage` when ``MTSHARE_STORAGE_FAULTS``
    is set."""
    storage = _open_storage(uri_or_desc, endpoint)
    rules = os.environ.get(FAULTS_ENV)
    return FaultyStorage(storage, rules) if rules else storage


def _open_storage(uri_or_desc: str | dict, endpoint: str | None = None) -> Storage:
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
    storage = unwrap(storage)
    if isinstance(storage, S3Storage):
        return storage._path("_checkpoints"), storage.fs
    return str(storage.local_path("_checkpoints")), None
