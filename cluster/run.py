"""What the launcher's ``run`` and ``resume`` verbs call: check everything that only reads,
create the work directory, take the driver lock, and drive the suite on an executor.

Bad input raises :class:`mtshare.config.ConfigError` (the launcher exits 2 with its message);
a suite that ends ``failed`` returns 1.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from mtshare.config import ConfigError, SuiteConfig, validate_suite
from mtshare.stages import plan

from cluster.checks import (
    check_data, check_pretrained_weights, check_ray_address, check_storage, check_tracking, first_line, mlflow_env,
    suite_ds_config,
)
from cluster.storage import Storage
from cluster.workdir import (
    check_suite_file, check_writable, load_suite, prepare_workdir, suite_storage, suite_tracking_uri, write_suite_file,
)


def run_suite(cfg: SuiteConfig, workdir: Path, config_path: Any = None, overrides: list[str] | None = None,
              address: str | None = None, progress: bool = True, executor: str = "ray",
              parent: MlflowParent | None = None) -> int:
    """``launcher run``: the suite on local Ray (or the cluster at ``address``). 0 done, 1 failed.
    ``executor="inprocess"`` runs the same driver with every stage in this process (no Ray).
    Running again into the same workdir with the same config continues the suite (as resume).
    ``parent``: the suite's MLflow run goes into that experiment, nested under that run (a
    sweep's base and trials). Bad input raises ConfigError (or DataError) before anything is
    written under the workdir."""
    workdir = Path(workdir)
    check_writable(workdir, f"--workdir {workdir}")
    storage = suite_storage(cfg, workdir)
    run_id = check_suite_file(workdir, cfg)
    ds_config = suite_ds_config(cfg)
    record = lambda executor: write_suite_file(workdir, cfg, storage, config_path, overrides or [],  # noqa: E731
                                               run_id, executor.cluster_address)
    return _drive(cfg, workdir, storage, ds_config, executor, address, progress, run_id, before_start=record,
                  parent=parent)


def resume_suite(workdir: Path, address: str | None = None, executor: str = "ray", progress: bool = True,
                 overrides: list[str] | None = None) -> int:
    """``launcher resume``: verify finished stages, run the rest. 0 done, 1 failed.

    Without ``address`` it goes to the Ray cluster the suite ran on (``suite.json``), or starts
    a local Ray for a suite that ran on one; ``address="local"`` runs it on this machine.

    ``overrides`` (``--set key=value``) fix the saved config first, e.g. after a stage failed
    on a bad setting. They may not change which stages the suite has. A finished stage whose
    settings they change (see :meth:`StageSpec.fingerprint`) is re-run with its downstream."""
    workdir = Path(workdir)
    cfg, meta = load_suite(workdir)
    if overrides:
        cfg = _overridden(workdir, cfg, meta, overrides)
    storage = suite_storage(cfg, workdir)
    ds_config = suite_ds_config(cfg)
    run_id = meta.get("run_id")
    if address is None and executor == "ray" and meta.get("address"):
        address = meta["address"]
        try:
            check_ray_address(address)
        except ConfigError as e:
            raise ConfigError(f"{workdir / 'suite.json'}: the suite ran on the Ray cluster at {address}, which does "
                              f"not answer ({str(e).rsplit('(', 1)[-1].rstrip(')')}); start it, or resume elsewhere "
                              f"with --address (local: this machine)") from None
    record = None
    if overrides:  # recorded once every check has passed, under the driver lock
        record = lambda executor: write_suite_file(  # noqa: E731
            workdir, cfg, storage, meta.get("config_path"), [*meta.get("overrides", []), *overrides], run_id,
            executor.cluster_address)
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


def _make_executor(cfg: SuiteConfig, storage: Storage, ds_config: dict, name: str, address: str | None):
    if name == "inprocess":
        from cluster.executors import InProcessExecutor

        return InProcessExecutor(cfg, storage)
    check_ray_address(address)  # before importing Ray: an unreachable address fails in milliseconds
    from cluster.executors import RayExecutor

    try:
        with ray_auth_env():  # a token at hand: token mode, as Ray would choose, without its notice on stderr
            return RayExecutor(cfg, storage, ds_config, address=address)
    except Exception as e:  # noqa: BLE001 - ConnectionError, TimeoutError, auth errors at connect time
        raise ConfigError(f"--address {address}: cannot reach the Ray cluster "
                          f"({type(e).__name__}: {first_line(e)})") from None


class MlflowParent(NamedTuple):
    experiment: str
    run_id: str


def _drive(cfg: SuiteConfig, workdir: Path, storage: Storage, ds_config: dict, executor_name: str,
           address: str | None, progress: bool, run_id: str | None, before_start=None,
           parent: MlflowParent | None = None) -> int:
    """Check everything that can be checked without writing (pretrained weights, data, storage,
    state ownership, MLflow server, cluster fit), then create the workdir, take the driver lock,
    record the suite (``before_start(executor)``), start tracking and the driver."""
    from cluster.progress import ProgressView
    from cluster.scheduler import DriverLock, SuiteDriver, check_state_owner

    lock = DriverLock(workdir, storage)
    lock.check_free()  # read-only early answer; taking the lock below decides
    check_pretrained_weights(cfg)
    check_data(cfg)
    check_storage(storage)
    check_state_owner(storage, cfg, workdir, run_id)
    check_tracking(cfg, workdir)
    executor = _make_executor(cfg, storage, ds_config, executor_name, address)
    try:
        executor.check_fits(plan(cfg))
        executor.preflight(plan(cfg))  # where the stages will run: each node that can host one
        prepare_workdir(workdir)  # the first write: everything above only reads
        lock.__enter__()
    except BaseException:
        executor.close()
        raise
    try:
        if before_start is not None:
            before_start(executor)
        tracker = _tracker(cfg, workdir, parent.experiment if parent else None)
        # The live table only on a terminal: in a log file, under nohup or in a Ray Job's log a
        # Live display would print nothing until the end, so those get one line per transition.
        view = ProgressView(live=progress and sys.stdout.isatty())
        view.note(f"suite {cfg.name}: workdir {workdir}, storage {storage.uri}, MLflow {tracker.uri}")
        view.note(f"executor: {executor.describe()}")
        config_text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
        driver = SuiteDriver(cfg, workdir, storage, executor, tracker, ds_config=ds_config, config_text=config_text,
                             run_id=run_id, on_update=view.update,
                             parent_run_id=parent.run_id if parent else None)
        with view, sigterm_as_interrupt():
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


def _tracker(cfg: SuiteConfig, workdir: Path, experiment: str | None = None):
    from cluster.tracking import Tracker

    mlflow_env()
    uri = suite_tracking_uri(cfg, workdir)
    artifacts = workdir / "mlartifacts" if cfg.tracking_uri is None else None
    try:
        return Tracker(uri, experiment=experiment or cfg.name, artifact_root=artifacts)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"tracking_uri: cannot use MLflow at {uri} ({type(e).__name__}: {first_line(e)})") from None


@contextlib.contextmanager
def ray_auth_env():
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


@contextlib.contextmanager
def sigterm_as_interrupt():
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
        store_dir = Path(tracking_uri.removeprefix("sqlite:///")).parent  # a sweep's suites share its store
        print(f"MLflow: python -m launcher ui --workdir {store_dir}   (then open http://127.0.0.1:5000)")
    else:
        print(f"MLflow: {tracking_uri}")

