"""Storage fault injection for the tests (never imported by the product).

The rules file named by ``MTSHARE_STORAGE_FAULTS`` (JSON, re-read on every write so a test can
change it while a suite runs)::

    [{"key": "*/model.safetensors", "error": "full", "times": 1, "after_bytes": 4096}]

A write whose key matches ``key`` (fnmatch) fails with ``error`` — ``full`` (ENOSPC) or
``unavailable`` (EIO) — after ``after_bytes`` bytes went to the real backend, i.e. in the
middle of the product's own atomic write path. ``times`` counts failures over every process
sharing the rules file (each one leaves a record in ``<rules file>.hits/`` saying whether
anything was visible under the final name right after the failure). Reads are untouched.

:func:`install` wraps ``write_stream`` of the real backends (``LocalStorage``, ``S3Storage``)
in this process. Other processes — Ray workers, a driver subprocess — get it from
``tests/harness/sitecustomize.py`` when ``tests/harness`` is on their ``PYTHONPATH``.
"""
from __future__ import annotations

import errno
import fnmatch
import json
import os
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

RULES_ENV = "MTSHARE_STORAGE_FAULTS"
HARNESS = Path(__file__).resolve().parent / "harness"


def _rules(path: Path) -> list[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return []


def _claim(rules_path: Path, index: int, times: int) -> Path | None:
    """A hit record for rule ``index`` if it may still fail (O_EXCL: no double counting)."""
    hits = rules_path.with_name(rules_path.name + ".hits")
    hits.mkdir(exist_ok=True)
    for n in range(times):
        path = hits / f"rule{index}-{n}.json"
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            return path
        except FileExistsError:
            continue
    return None


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


def faulty(write_stream: Callable) -> Callable:
    """``write_stream`` of a backend, failing the writes the rules select."""
    from cluster.storage import StorageError

    def write(self, key: str, chunks: Iterable[bytes]) -> None:
        rules_path = os.environ.get(RULES_ENV)
        for index, rule in enumerate(_rules(Path(rules_path)) if rules_path else []):
            if not fnmatch.fnmatchcase(key, rule["key"]):
                continue
            record = _claim(Path(rules_path), index, int(rule.get("times", 1)))
            if record is None:
                continue
            code = errno.ENOSPC if rule.get("error", "full") == "full" else errno.EIO
            try:
                write_stream(self, key, _fail_after(chunks, int(rule.get("after_bytes", 0)), code))
            except StorageError as e:
                record.write_text(json.dumps({"key": key, "error": str(e), "visible_after_failure": self.exists(key),
                                              "pid": os.getpid(), "time": time.time()}))
                raise
            raise AssertionError(f"injected fault on {key} did not fail the write")
        write_stream(self, key, chunks)

    write.faulty = True
    return write


def install(module=None, setattr_: Callable = setattr) -> None:
    """Wrap the backends' ``write_stream`` (``setattr_``: pytest's ``monkeypatch.setattr`` to undo it)."""
    if module is None:
        import cluster.storage as module
    for cls in (module.LocalStorage, module.S3Storage):
        if not getattr(cls.write_stream, "faulty", False):
            setattr_(cls, "write_stream", faulty(cls.write_stream))
