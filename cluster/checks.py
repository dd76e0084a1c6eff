"""Pre-flight checks the driver makes before writing anything: storage, tracking, Ray address,
pretrained weights, data, DeepSpeed JSON. Each raises :class:`mtshare.config.ConfigError`
naming the field (the launcher exits 2). What must hold where the stages run is checked on
the nodes themselves (:mod:`cluster.preflight`)."""
from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

from mtshare.config import ConfigError, SuiteConfig

from cluster.storage import LocalStorage, Storage, StorageError
from cluster.workdir import check_writable

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_CHECK_IDS = 50  # ids per split whose label files `run` decodes before starting


def check_storage(storage: Storage) -> None:
    """Reachable and writable, checked without writing anything."""
    if isinstance(storage, LocalStorage):
        check_writable(storage.root, f"storage: {storage.uri}")
        return
    try:
        storage.check()
    except StorageError as e:
        raise ConfigError(f"storage: {e}") from None


def probe_tcp(host: str, port: int, timeout: float = 5.0) -> str | None:
    """None when something accepts a TCP connection at host:port, else why not (one line)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as e:
        return e.strerror or type(e).__name__


def check_tracking(cfg: SuiteConfig, workdir: Path) -> None:
    """An MLflow server named by ``tracking_uri`` must answer before anything is written:
    a TCP probe (fails in milliseconds for a closed port), then one read-only request. The
    embedded sqlite store is refused on a network filesystem: sqlite's locks do not hold
    across hosts there (a driver and a `launcher ui` on another host corrupt it)."""
    uri = cfg.tracking_uri
    if not uri or uri.startswith("sqlite:"):
        check_sqlite_place(Path(uri.removeprefix("sqlite:///")) if uri else Path(workdir) / "mlflow.db",
                           "tracking_uri")
        return
    if urlsplit(uri).scheme not in ("http", "https"):
        return
    parts = urlsplit(uri)
    try:
        host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as e:
        raise ConfigError(f"tracking_uri: {uri}: {e}") from None
    why = probe_tcp(host or "", port)
    if why:
        raise ConfigError(f"tracking_uri: cannot reach the MLflow server at {uri} ({why})")
    mlflow_env()
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(uri).get_experiment_by_name(cfg.name)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"tracking_uri: cannot use MLflow at {uri} "
                          f"({type(e).__name__}: {first_line(e)})") from None


def check_sqlite_place(db: Path, field: str) -> None:
    from cluster.tracking import network_fs

    fs = network_fs(db.parent)
    if fs:
        raise ConfigError(f"{field}: the embedded MLflow store {db} would be on a {fs} filesystem, where sqlite "
                          f"locking does not hold across hosts; run an MLflow server (`mlflow server "
                          f"--backend-store-uri sqlite:////local/disk/mlflow.db --host 0.0.0.0`) and set "
                          f"tracking_uri: http://<host>:5000, or use a --workdir on local disk")


def first_line(e: BaseException, limit: int = 200) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else ""


def mlflow_env() -> None:
    # An unreachable server should fail the start quickly, not after minutes of retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")


def check_ray_address(address: str | None) -> None:
    """``host:port`` (or ``ray://host:port``) must accept a connection: ``ray.init`` would
    otherwise retry an unreachable GCS for minutes. ``auto``/local need no probe."""
    if address in (None, "", "local", "auto"):
        return
    target = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"--address {address}: expected host:port (or ray://host:port, auto)")
    why = probe_tcp(host.strip("[]"), int(port))
    if why:
        raise ConfigError(f"--address {address}: cannot reach the Ray cluster ({why})")


def check_pretrained_weights(cfg: SuiteConfig) -> None:
    """``model.pretrained`` must match the encoder key for key (names and shapes only, nothing
    loaded): a mismatch found here costs nothing, found in the base stage it costs a cluster start."""
    from mtshare.models.vit import check_pretrained

    check_pretrained(cfg.model)


def check_data(cfg: SuiteConfig) -> None:
    """Bad data is bad input (exit 2), found before any cluster starts: synthesise the demo data
    if asked, then check the layout (splits, files, label ranges on a sample of ids)."""
    from mtshare.data import check_dataset
    from mtshare.suite import ensure_dataset

    ensure_dataset(cfg)
    if not Path(cfg.dataset.root).is_dir():
        raise ConfigError(f"dataset.root: {cfg.dataset.root}: directory not found")
    check_dataset(cfg.dataset.name, cfg.dataset.root, max_decode=DATA_CHECK_IDS)
    from mtshare.data import build_dataset

    train = build_dataset(cfg.dataset.name, cfg.dataset.root, "train", [], train=False, img_size=cfg.dataset.img_size)
    n_train = len(train)
    if cfg.stream is not None:
        from mtshare.data import sequences

        if not sequences(train.ids):
            raise ConfigError(f"stream: dataset.root {cfg.dataset.root} has no frame sequences (ids "
                              f"<sequence>/<frame>: `data synth --sequences`, README \"Frame sequences\")")
    global_batch = max(cfg.optim_for(t, k).batch_size for t in [cfg.base_task, *cfg.tasks]
                       for k in ("base", "step0", *cfg.steps)) * cfg.resources.workers
    if n_train - cfg.dataset.holdout < global_batch:
        raise ConfigError(f"dataset.holdout: {cfg.dataset.holdout} of the {n_train} train images leaves fewer "
                          f"than one global batch ({global_batch}) to train on")


def ds_config_path(cfg: SuiteConfig) -> Path:
    path = Path(cfg.deepspeed)
    if not path.is_absolute() and not path.exists():
        path = REPO_ROOT / path  # configs/deepspeed/... relative to the project
    return path


def suite_ds_config(cfg: SuiteConfig) -> dict:
    from cluster.deepspeed_stepper import load_ds_config

    return load_ds_config(ds_config_path(cfg))

