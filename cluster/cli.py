"""What the launcher's ``run``, ``resume``, ``status``, ``submit`` and ``ui`` verbs call.

A suite's work directory holds ``suite.json`` (the resolved config and where its storage and
MLflow store are), ``mlflow.db`` + ``mlartifacts/`` (embedded MLflow), ``store/`` (the default
storage, or a mirror of each stage's ``result.json`` when storage is elsewhere, e.g. S3) and
``driver.lock`` while a driver runs. ``state.json`` lives in the storage.

Bad input raises :class:`mtshare.config.ConfigError` (the launcher exits 2 with its message);
a suite that ends ``failed`` returns 1.
"""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from mtshare.config import ConfigError, SuiteConfig, validate_suite
from mtshare.stages import plan

from cluster.state import STATE_KEY, status_view
from cluster.storage import LocalStorage, Storage, StorageError, open_storage

REPO_ROOT = Path(__file__).resolve().parent.parent
SUITE_FILE = "suite.json"
PACKAGES = ("launcher", "mtshare", "cluster", "configs")  # what a submitted job needs
DATA_CHECK_IDS = 50  # ids per split whose label files `run` decodes before starting


# --- the work directory ---------------------------------------------------------------------

def _check_writable(path: Path, what: str) -> None:
    """``path`` can be created (or written) by this user, checked without writing: its nearest
    existing ancestor must be a directory we may write into. ``what`` leads the error line."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{what}: not writable ({probe} is not a directory)")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{what}: not writable ({probe} is read-only for this user)")


def _prepare_workdir(workdir: Path) -> Path:
    """Create the work directory (checked beforehand by :func:`_check_writable`)."""
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


def _check_storage(storage: Storage) -> None:
    """Reachable and writable, checked without writing anything."""
    if isinstance(storage, LocalStorage):
        _check_writable(storage.root, f"storage: {storage.uri}")
        return
    try:
        storage.check()
    except StorageError as e:
        raise ConfigError(f"storage: {e}") from None


def _tracking_uri(cfg: SuiteConfig, workdir: Path) -> str:
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


def _check_suite_file(workdir: Path, cfg: SuiteConfig) -> str:
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


def _write_suite_file(workdir: Path, cfg: SuiteConfig, storage: Storage, config_path: Any, overrides: list[str],
                      run_id: str) -> None:
    """Record the resolved config (portable, see :func:`_portable`), the run id that owns the
    suite's storage, and where its storage and MLflow store are (``tracking_uri`` null: the
    embedded store of whatever directory this is)."""
    from mtshare.checkpoint import atomic_write_bytes

    meta = {"suite": cfg.name, "run_id": run_id, "config": _portable(cfg.model_dump(mode="json"), workdir),
            "config_path": str(config_path) if config_path else None, "overrides": list(overrides or []),
            "storage": storage.uri, "tracking_uri": cfg.tracking_uri, "created": time.time()}
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
    if isinstance(storage, LocalStorage) and storage.root == local.resolve():
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


def _ds_config(cfg: SuiteConfig) -> dict:
    from cluster.deepspeed_stepper import load_ds_config

    path = Path(cfg.deepspeed)
    if not path.is_absolute() and not path.exists():
        path = REPO_ROOT / path  # configs/deepspeed/... relative to the project
    return load_ds_config(path)


def _probe_tcp(host: str, port: int, timeout: float = 5.0) -> str | None:
    """None when something accepts a TCP connection at host:port, else why not (one line)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as e:
        return e.strerror or type(e).__name__


def _check_tracking(cfg: SuiteConfig, workdir: Path) -> None:
    """An MLflow server named by ``tracking_uri`` must answer before anything is written:
    a TCP probe (fails in milliseconds for a closed port), then one read-only request. The
    embedded sqlite store is refused on a network filesystem: sqlite's locks do not hold
    across hosts there (a driver and a `launcher ui` on another host corrupt it)."""
    uri = cfg.tracking_uri
    if not uri or uri.startswith("sqlite:"):
        _check_sqlite_place(Path(uri.removeprefix("sqlite:///")) if uri else Path(workdir) / "mlflow.db",
                            "tracking_uri")
        return
    if urlsplit(uri).scheme not in ("http", "https"):
        return
    parts = urlsplit(uri)
    try:
        host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as e:
        raise ConfigError(f"tracking_uri: {uri}: {e}") from None
    why = _probe_tcp(host or "", port)
    if why:
        raise ConfigError(f"tracking_uri: cannot reach the MLflow server at {uri} ({why})")
    _mlflow_env()
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(uri).get_experiment_by_name(cfg.name)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"tracking_uri: cannot use MLflow at {uri} "
                          f"({type(e).__name__}: {_first_line(e)})") from None


def _check_sqlite_place(db: Path, field: str) -> None:
    from cluster.tracking import network_fs

    fs = network_fs(db.parent)
    if fs:
        raise ConfigError(f"{field}: the embedded MLflow store {db} would be on a {fs} filesystem, where sqlite "
                          f"locking does not hold across hosts; run an MLflow server (`mlflow server "
                          f"--backend-store-uri sqlite:////local/disk/mlflow.db --host 0.0.0.0`) and set "
                          f"tracking_uri: http://<host>:5000, or use a --workdir on local disk")


def _first_line(e: BaseException, limit: int = 200) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else ""


def _mlflow_env() -> None:
    # An unreachable server should fail the start quickly, not after minutes of retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")


def _tracker(cfg: SuiteConfig, workdir: Path):
    from cluster.tracking import Tracker

    _mlflow_env()
    uri = _tracking_uri(cfg, workdir)
    artifacts = workdir / "mlartifacts" if cfg.tracking_uri is None else None
    try:
        return Tracker(uri, experiment=cfg.name, artifact_root=artifacts)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"tracking_uri: cannot use MLflow at {uri} ({type(e).__name__}: {_first_line(e)})") from None


# --- run / resume ---------------------------------------------------------------------------

def run_suite(cfg: SuiteConfig, workdir: Path, config_path: Any = None, overrides: list[str] | None = None,
              address: str | None = None, progress: bool = True, executor: str = "ray") -> int:
    """``launcher run``: the suite on local Ray (or the cluster at ``address``). 0 done, 1 failed.
    ``executor="inprocess"`` runs the same driver with every stage in this process (no Ray).
    Running again into the same workdir with the same config continues the suite (as resume).
    Bad input raises ConfigError (or DataError) before anything is written under the workdir."""
    workdir = Path(workdir)
    _check_writable(workdir, f"--workdir {workdir}")
    storage = suite_storage(cfg, workdir)
    run_id = _check_suite_file(workdir, cfg)
    ds_config = _ds_config(cfg)
    record = lambda: _write_suite_file(workdir, cfg, storage, config_path, overrides or [], run_id)  # noqa: E731
    return _drive(cfg, workdir, storage, ds_config, executor, address, progress, run_id, before_start=record)


def resume_suite(workdir: Path, address: str | None = None, executor: str = "ray", progress: bool = True,
                 overrides: list[str] | None = None) -> int:
    """``launcher resume``: verify finished stages, run the rest. 0 done, 1 failed.

    ``overrides`` (``--set key=value``) fix the saved config first, e.g. after a stage failed
    on a bad setting. They may not change which stages the suite has. A finished stage whose
    settings they change (see :meth:`StageSpec.fingerprint`) is re-run with its downstream."""
    workdir = Path(workdir)
    cfg, meta = load_suite(workdir)
    if overrides:
        cfg = _overridden(workdir, cfg, meta, overrides)
    storage = suite_storage(cfg, workdir)
    ds_config = _ds_config(cfg)
    run_id = meta.get("run_id")
    record = None
    if overrides:  # recorded once every check has passed, under the driver lock
        record = lambda: _write_suite_file(workdir, cfg, storage, meta.get("config_path"),  # noqa: E731
                                           [*meta.get("overrides", []), *overrides], run_id)
    return _drive(cfg, workdir, storage, ds_config, executor, address, progress, run_id, before_start=record)


def _overridden(workdir: Path, cfg: SuiteConfig, meta: dict, overrides: list[str]) -> SuiteConfig:
    import copy

    from mtshare.config import apply_overrides

    new = validate_suite(apply_overrides(copy.deepcopy(meta["config"]), overrides), source="--set",
                         workdir=str(workdir))
    if [s.name for s in plan(new)] != [s.name for s in plan(cfg)] or new.name != cfg.name:
        raise ConfigError("--set: resume cannot change the suite's name or stages (tasks, steps, references); "
                          "start a new run in another --workdir")
    return new


def _check_ray_address(address: str | None) -> None:
    """``host:port`` (or ``ray://host:port``) must accept a connection: ``ray.init`` would
    otherwise retry an unreachable GCS for minutes. ``auto``/local need no probe."""
    if address in (None, "", "local", "auto"):
        return
    target = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"--address {address}: expected host:port (or ray://host:port, auto)")
    why = _probe_tcp(host.strip("[]"), int(port))
    if why:
        raise ConfigError(f"--address {address}: cannot reach the Ray cluster ({why})")


def _make_executor(cfg: SuiteConfig, storage: Storage, ds_config: dict, name: str, address: str | None):
    if name == "inprocess":
        from cluster.executors import InProcessExecutor

        return InProcessExecutor(cfg, storage)
    _check_ray_address(address)  # before importing Ray: an unreachable address fails in milliseconds
    from cluster.executors import RayExecutor

    try:
        with _auth_env():  # a token at hand: token mode, as Ray would choose, without its notice on stderr
            return RayExecutor(cfg, storage, ds_config, address=address)
    except Exception as e:  # noqa: BLE001 - ConnectionError, TimeoutError, auth errors at connect time
        raise ConfigError(f"--address {address}: cannot reach the Ray cluster "
                          f"({type(e).__name__}: {_first_line(e)})") from None


def _drive(cfg: SuiteConfig, workdir: Path, storage: Storage, ds_config: dict, executor_name: str,
           address: str | None, progress: bool, run_id: str | None, before_start=None) -> int:
    """Check everything that can be checked without writing (pretrained weights, data, storage,
    state ownership, MLflow server, cluster fit), then create the workdir, take the driver lock,
    record the suite (``before_start``), start tracking and the driver."""
    from cluster.progress import ProgressView
    from cluster.scheduler import DriverLock, SuiteDriver, check_state_owner

    lock = DriverLock(workdir, storage)
    lock.check_free()  # read-only early answer; taking the lock below decides
    _check_pretrained(cfg)
    _check_dataset(cfg)
    _check_storage(storage)
    check_state_owner(storage, cfg, workdir, run_id)
    _check_tracking(cfg, workdir)
    executor = _make_executor(cfg, storage, ds_config, executor_name, address)
    try:
        executor.check_fits(plan(cfg))
        executor.preflight(plan(cfg))  # where the stages will run: each node that can host one
        _prepare_workdir(workdir)  # the first write: everything above only reads
        lock.__enter__()
    except BaseException:
        executor.close()
        raise
    try:
        if before_start is not None:
            before_start()
        tracker = _tracker(cfg, workdir)
        # The live table only on a terminal: in a log file, under nohup or in a Ray Job's log a
        # Live display would print nothing until the end, so those get one line per transition.
        view = ProgressView(live=progress and sys.stdout.isatty())
        view.note(f"suite {cfg.name}: workdir {workdir}, storage {storage.uri}, MLflow {tracker.uri}")
        view.note(f"executor: {executor.describe()}")
        config_text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
        driver = SuiteDriver(cfg, workdir, storage, executor, tracker, ds_config=ds_config, config_text=config_text,
                             run_id=run_id,
                             on_update=view.update)
        with view, _sigterm_as_interrupt():
            state = driver.run()
    finally:
        try:
            executor.close()  # stage workers stop before the lock lets another driver in
        finally:
            lock.__exit__(None, None, None)
    if driver.idle:
        print(f"suite {cfg.name}: every stage is done and verified; nothing to do")
    _print_outcome(state, workdir, tracker.uri)
    return 0 if state["state"] == "done" else 1


def _check_pretrained(cfg: SuiteConfig) -> None:
    """``model.pretrained`` must match the encoder key for key (names and shapes only, nothing
    loaded): a mismatch found here costs nothing, found in the base stage it costs a cluster start."""
    from mtshare.models.vit import check_pretrained

    check_pretrained(cfg.model)


def _check_dataset(cfg: SuiteConfig) -> None:
    """Bad data is bad input (exit 2), found before any cluster starts: synthesise the demo data
    if asked, then check the layout (splits, files, label ranges on a sample of ids)."""
    from mtshare.data import check_dataset
    from mtshare.suite import ensure_dataset

    ensure_dataset(cfg)
    if not Path(cfg.dataset.root).is_dir():
        raise ConfigError(f"dataset.root: {cfg.dataset.root}: directory not found")
    check_dataset(cfg.dataset.name, cfg.dataset.root, max_decode=DATA_CHECK_IDS)
    from mtshare.data import build_dataset

    n_train = len(build_dataset(cfg.dataset.name, cfg.dataset.root, "train", [], train=False,
                                img_size=cfg.dataset.img_size))
    global_batch = max(cfg.optim_for(t, k).batch_size for t in [cfg.base_task, *cfg.tasks]
                       for k in ("base", "step0", *cfg.steps)) * cfg.resources.workers
    if n_train - cfg.dataset.holdout < global_batch:
        raise ConfigError(f"dataset.holdout: {cfg.dataset.holdout} of the {n_train} train images leaves fewer "
                          f"than one global batch ({global_batch}) to train on")


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """``ray job stop`` and schedulers send SIGTERM: treat it like Ctrl-C so the driver records the
    interruption in the state file before leaving (SIGKILL cannot be caught: `resume` copes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _print_outcome(state: dict, workdir: Path, tracking_uri: str) -> None:
    from mtshare.report import build_report, format_report, load_results

    results = load_results(Path(workdir) / "store")
    if results:
        try:
            print(format_report(build_report(results)))
        except Exception as e:  # noqa: BLE001 - the suite's outcome matters more than its table
            print(f"(report unavailable: {e})")
    if state["state"] == "done":
        print(f"suite {state['suite']}: done ({len(state['stages'])} stages)")
    else:
        print(f"suite {state['suite']}: FAILED — {state.get('error')}", file=sys.stderr)
        print(f"fix the cause, then: python -m launcher resume --workdir {workdir}", file=sys.stderr)
    if tracking_uri.startswith("sqlite:"):
        print(f"MLflow: python -m launcher ui --workdir {workdir}   (then open http://127.0.0.1:5000)")
    else:
        print(f"MLflow: {tracking_uri}")


# --- status ---------------------------------------------------------------------------------

def show_status(workdir: Path, fmt: str = "table") -> int:
    """``launcher status``: the stage table from the state file (during a run and after)."""
    state = read_state(Path(workdir))
    if fmt == "json":
        print(json.dumps(status_view(state)))
        return 0
    from cluster.progress import render_state

    from rich.console import Console

    Console().print(render_state(state, live=False))
    return 0


# --- submit ---------------------------------------------------------------------------------

@contextlib.contextmanager
def _auth_env():
    """Ray's clients add the token header only in token mode: a token given through the
    environment (or ~/.ray/auth_token) switches it on when RAY_AUTH_MODE is unset. Only for the
    call that connects: a process-wide change would leak into later Ray starts in the same
    process (library callers, tests) and make their GCS refuse its own clients."""
    token = os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH") or \
        (Path.home() / ".ray" / "auth_token").exists()
    if os.environ.get("RAY_AUTH_MODE") or not token:
        yield
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    try:
        yield
    finally:
        os.environ.pop("RAY_AUTH_MODE", None)


def _stage_job_dir(config_path: Path) -> tuple[Path, str]:
    """A temporary ``working_dir`` for the job: the project's packages + the suite YAML."""
    stage = Path(tempfile.mkdtemp(prefix="mtshare-job-"))
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for pkg in PACKAGES:
        shutil.copytree(REPO_ROOT / pkg, stage / pkg, ignore=ignore)
    rel = f"_submitted/{config_path.name}"
    (stage / "_submitted").mkdir()
    shutil.copy2(config_path, stage / rel)
    return stage, rel


def submit_suite(cfg: SuiteConfig, args: Any) -> int:
    """``launcher submit``: the suite as a Ray Job on a running cluster; prints the job id."""
    with _auth_env():
        return _submit(cfg, args)


def _check_cluster_paths(config_path: Path, overrides: list[str], workdir: str | None) -> None:
    """Paths that a submitted suite uses are resolved on the cluster, not on this machine: the
    workdir and every path in the config must be absolute (or under ``{workdir}``), else they
    would land in the job's upload folder or point at nothing. Refused (exit 2) before submitting."""
    from mtshare.config import apply_overrides, names_weight_file, read_mapping

    if not workdir or not Path(workdir).is_absolute():
        raise ConfigError(f"--workdir: `submit` needs an absolute path on the cluster's shared filesystem "
                          f"(the suite runs on the cluster, not here), got {workdir!r}")
    raw = apply_overrides(read_mapping(config_path), list(overrides))
    model, dataset = raw.get("model") or {}, raw.get("dataset") or {}
    tracking = raw.get("tracking_uri") or ""
    paths = {
        "dataset.root": dataset.get("root"),
        "storage": raw.get("storage"),
        "model.pretrained": model.get("pretrained") if names_weight_file(str(model.get("pretrained") or "")) else None,
        "tracking_uri": tracking.removeprefix("sqlite:///") if tracking.startswith("sqlite:///") else None,
    }
    for field, value in paths.items():
        if not isinstance(value, str) or value.startswith("{workdir}") or "://" in value:
            continue
        if not Path(value).is_absolute():
            raise ConfigError(f"{field}: '{value}' is a relative path, but `submit` runs the suite on the cluster "
                              f"(it would resolve inside the job's upload folder): give an absolute path, or one "
                              f"under {{workdir}}")


def _submit(cfg: SuiteConfig, args: Any) -> int:
    config_path = Path(args.config)
    _check_cluster_paths(config_path, getattr(args, "overrides", None) or [], args.workdir)
    workdir = Path(args.workdir)  # absolute: the cluster writes here (a shared path)
    from ray.job_submission import JobSubmissionClient

    try:
        client = JobSubmissionClient(args.address)
    except Exception as e:  # noqa: BLE001 - ConnectionError, auth errors...
        raise ConfigError(f"--address {args.address}: cannot reach the Ray dashboard ({str(e).splitlines()[0][:200]})") from None
    stage, rel = _stage_job_dir(config_path)
    cmd = [os.environ.get("MTSHARE_JOB_PYTHON", "python"), "-m", "launcher", "run", rel, "--workdir", str(workdir),
           "--address", "auto", "--no-progress"]
    for item in getattr(args, "overrides", None) or []:
        cmd += ["--set", item]
    submission_id = f"mtshare-{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    try:
        job_id = _submit_with_retry(
            client, entrypoint=" ".join(shlex.quote(c) for c in cmd), submission_id=submission_id,
            runtime_env={"working_dir": str(stage), "env_vars": {"MTSHARE_IN_RAY_JOB": "1"}},
            metadata={"suite": cfg.name, "workdir": str(workdir)},
        )
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    print(job_id)
    print(f"submitted suite {cfg.name} as Ray job {job_id} (workdir {workdir} on the cluster)", file=sys.stderr)
    print(f"follow: ray job logs --address {args.address} --follow {job_id}\n"
          f"status: python -m launcher status --workdir {workdir}", file=sys.stderr)
    return 0


def _submit_with_retry(client, timeout_s: float = 90.0, **kwargs) -> str:
    """A cluster that has just started answers HTTP before its job agent is up ("No available
    agent to submit job"): wait for it rather than fail."""
    deadline = time.time() + timeout_s
    while True:
        try:
            return client.submit_job(**kwargs)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.time() > deadline:
                raise
            time.sleep(2)


# --- ui -------------------------------------------------------------------------------------

def serve_ui(workdir: Path, host: str = "127.0.0.1", port: int = 5000) -> int:
    """``launcher ui``: the MLflow UI of a suite's embedded store, on 127.0.0.1 by default."""
    workdir = Path(workdir)
    uri = None
    if (workdir / SUITE_FILE).exists():
        uri = json.loads((workdir / SUITE_FILE).read_text()).get("tracking_uri")
    if uri and not uri.startswith("sqlite:"):  # (null: the embedded store below)
        print(f"this suite logs to an MLflow server: open {uri}")
        return 0
    db = workdir / "mlflow.db"
    if not db.exists():
        raise ConfigError(f"{db}: no MLflow store in this workdir (has the suite run?)")
    _check_sqlite_place(db, "--workdir")  # a second server on one sqlite file over NFS corrupts it
    from cluster.tracking import default_tracking_uri

    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving MLflow on {host}: it has no authentication; see the README before exposing it",
              file=sys.stderr)
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", default_tracking_uri(workdir),
           "--artifacts-destination", (workdir / "mlartifacts").resolve().as_uri(),
           "--host", host, "--port", str(port), "--workers", "1"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    print(f"MLflow UI for {workdir}: http://{host}:{port}   (Ctrl-C to stop)", flush=True)
    server = subprocess.Popen(cmd, env=env)
    try:
        with _sigterm_as_interrupt():
            return server.wait()
    except KeyboardInterrupt:
        return 0
    finally:  # never leave the server behind when the launcher is stopped (Ctrl-C or SIGTERM)
        if server.poll() is None:
            server.terminate()
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
