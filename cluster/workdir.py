"""A suite's work directory and the files that describe it.

``<workdir>/suite.json`` holds the resolved config (paths inside the work directory kept as
``{workdir}/...``), the run id that owns the suite's storage, and where the storage and the
MLflow store are; ``mlflow.db`` + ``mlartifacts/`` are the embedded MLflow store; ``store/`` is
the default storage, or a verified local cache of it when the storage is elsewhere (S3, a
shared root); ``driver.lock`` exists while a driver runs. ``state.json`` lives in the storage.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

from mtshare.config import ConfigError, SuiteConfig, validate_suite

from cluster.state import STATE_KEY
from cluster.storage import LocalStorage, Storage, StorageError, open_storage

SUITE_FILE = "suite.json"


def check_writable(path: Path, what: str) -> None:
    """``path`` can be created (or written) by this user, checked without writing: its nearest
    existing ancestor must be a directory we may write into. ``what`` leads the error line."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{what}: not writable ({probe} is not a directory)")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{what}: not writable ({probe} is read-only for this user)")


def prepare_workdir(workdir: Path) -> Path:
    """Create the work directory (checked beforehand by :func:`check_writable`)."""
    workdir = Path(workdir)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--workdir {workdir}: not writable ({e.strerror or e})") from None
    return workdir


def suite_storage(cfg: SuiteConfig, workdir: Path) -> Storage:
    """The suite's storage area: ``<workdir>/store`` by default; under an explicit storage root
    (shared by several suites, e.g. one bucket) the suite's own ``<root>/<suite name>``."""
    uri = str(Path(workdir) / "store") if not cfg.storage else f"{cfg.storage.rstrip('/')}/{cfg.name}"
    try:
        return open_storage(uri, cfg.s3_endpoint)
    except StorageError as e:
        raise ConfigError(f"storage: {e}") from None


def suite_tracking_uri(cfg: SuiteConfig, workdir: Path) -> str:
    from cluster.tracking import default_tracking_uri

    return cfg.tracking_uri or default_tracking_uri(workdir)


def _portable(obj: Any, workdir: Path) -> Any:
    """The config as ``suite.json`` keeps it: paths inside the work directory written as
    ``{workdir}/...``, so that a moved or copied work directory uses its own files."""
    root = str(Path(workdir).resolve())
    if isinstance(obj, str):
        return "{workdir}" + obj[len(root):] if obj == root or obj.startswith(root + os.sep) else obj
    if isinstance(obj, dict):
        return {k: _portable(v, workdir) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_portable(v, workdir) for v in obj]
    return obj


def check_suite_file(workdir: Path, cfg: SuiteConfig) -> str:
    """A second ``run`` into the same workdir must bring the same resolved config. Returns the
    run id (the existing one, or a new one for a new suite)."""
    path = workdir / SUITE_FILE
    if not path.exists():
        return uuid.uuid4().hex
    saved = json.loads(path.read_text())
    if saved.get("config") not in (cfg.model_dump(mode="json"), _portable(cfg.model_dump(mode="json"), workdir)):
        raise ConfigError(f"{path}: this workdir holds suite '{saved.get('suite')}' with a different config; "
                          f"use `launcher resume --workdir {workdir}` or another --workdir")
    return saved.get("run_id") or uuid.uuid4().hex


def write_suite_file(workdir: Path, cfg: SuiteConfig, storage: Storage, config_path: Any, overrides: list[str],
                     run_id: str, address: str | None) -> None:
    """Record the resolved config (portable, see :func:`_portable`), the run id that owns the
    suite's storage, where its storage and MLflow store are (``tracking_uri`` null: the
    embedded store of whatever directory this is) and the Ray cluster it runs on (``address``:
    its GCS address, null for a private local Ray), where ``resume`` goes by default."""
    from mtshare.checkpoint import atomic_write_bytes

    meta = {"suite": cfg.name, "run_id": run_id, "config": _portable(cfg.model_dump(mode="json"), workdir),
            "config_path": str(config_path) if config_path else None, "overrides": list(overrides or []),
            "storage": storage.uri, "tracking_uri": cfg.tracking_uri, "address": address, "created": time.time()}
    atomic_write_bytes(workdir / SUITE_FILE, json.dumps(meta, indent=1).encode())


def load_suite(workdir: Path) -> tuple[SuiteConfig, dict]:
    """(config, suite.json) of an existing work directory."""
    path = Path(workdir) / SUITE_FILE
    if not path.exists():
        raise ConfigError(f"{workdir}: no suite here ({SUITE_FILE} missing; start one with `launcher run`)")
    meta = json.loads(path.read_text())
    return validate_suite(meta["config"], source=str(path), workdir=str(workdir)), meta


def read_state(workdir: Path) -> dict:
    cfg, _ = load_suite(workdir)
    storage = suite_storage(cfg, workdir)
    try:
        return storage.read_json(STATE_KEY)
    except StorageError:
        raise ConfigError(f"{storage.uri}/{STATE_KEY}: no state file yet (the suite has not started)") from None


def is_workdir_store(storage: Storage, workdir: Path) -> bool:
    """Whether ``storage`` is the work directory's own ``store/`` (the default storage)."""
    return isinstance(storage, LocalStorage) and storage.root == (Path(workdir) / "store").resolve()


def local_store(workdir: Path) -> Path:
    """``<workdir>/store`` holding every finished stage's ``result.json`` and checkpoint, which
    is what ``report``, ``infer`` and ``bench --workdir`` read. When the suite's storage is
    elsewhere (S3, a shared root), this is a local cache of it, filled through the storage layer:
    a stage's files are fetched when missing or different, each checkpoint verified against the
    checksum the state file recorded before it takes its name."""
    from mtshare.checkpoint import sha256_file
    from mtshare.stages import MODEL_FILE

    workdir = Path(workdir)
    local = workdir / "store"
    if not (workdir / SUITE_FILE).exists():
        return local  # not a launcher run directory: read what is there
    cfg, _ = load_suite(workdir)
    storage = suite_storage(cfg, workdir)
    if is_workdir_store(storage, workdir):
        return local
    try:
        state = storage.read_json(STATE_KEY)
        for st in state["stages"]:
            if st["status"] != "done":
                continue
            model = local / st["name"] / MODEL_FILE
            if not (model.is_file() and sha256_file(model) == st["checksum"]):
                storage.get(f"{st['name']}/{MODEL_FILE}", model, expected_sha256=st["checksum"])
            storage.get(f"{st['name']}/result.json", local / st["name"] / "result.json")
    except StorageError as e:
        raise ConfigError(f"storage: {e}") from None
    return local

