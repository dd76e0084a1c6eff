"""``launcher sweep``: each sub-task's accuracy–compute trade-off from one frozen base, on Ray Tune.

A sweep directory holds suites, each an ordinary suite work directory driven by the ordinary
driver (verified checkpoints, resume, Ray Train + DeepSpeed pipelines, MLflow):

    sweep.json          the sweep: config (portable), tasks, targets, row densities, run ids
    base/               the base (and the dense step0 references of the swept tasks)
    trials/<trial>/     one sub-task's step1 → step2 → step3 (+ calibration) at one target weight
                        sparsity (and step3 row density), the base imported from base/ (verified)
    mlflow.db, mlartifacts/   one MLflow experiment: the sweep's run, with the base suite and each
                        trial nested under it (a trial's stages nested under the trial)
    tune/               Ray Tune's experiment state, one folder per launch
    report/             pareto_<task>.png (``launcher report``)

The base runs first. Then every trial is one Ray Tune trial of a grid over (task, target, row
density): a trial is a small driver (0 CPUs, on this node, where the sweep directory is) whose
stages train as Ray Train runs on the cluster's workers; Tune runs as many at once as the
cluster holds pipelines. A failed trial does not stop the others. Running the same command
again resumes the sweep: finished trials are verified and kept (each trial is an idempotent
suite), failed and missing ones run (mid-stage from their checkpoints).
"""
from __future__ import annotations

import contextlib
import copy
import json
import time
import uuid
from pathlib import Path
from typing import Any

from mtshare.config import ConfigError, SuiteConfig, validate_suite
from mtshare.stages import MODEL_FILE, plan

from cluster.workdir import check_writable, prepare_workdir, suite_storage

SWEEP_FILE = "sweep.json"
ROW_OFF = 1.0  # a row density of 1: step3 trains without skipping (train_row_density off)


# --- what a sweep is -------------------------------------------------------------------------

def parse_fractions(text: str, flag: str, *, upper_inclusive: bool) -> list[float]:
    """``0.8,0.9`` → [0.8, 0.9]; each in (0, 1) (or (0, 1] with ``upper_inclusive``)."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag}: a comma-separated list of numbers, got '{text}'") from None
    top = "1]" if upper_inclusive else "1)"
    for v in values:
        if not (0 < v < 1 or (upper_inclusive and v == 1)):
            raise ConfigError(f"{flag}: {v:g} is outside (0, {top}")
    if not values or len(set(values)) != len(values):
        raise ConfigError(f"{flag}: give distinct values, e.g. 0.8,0.9")
    return sorted(values)


def trial_name(task: str, target: float, row: float = ROW_OFF) -> str:
    return f"{task}-w{target:g}" + ("" if row == ROW_OFF else f"-r{row:g}")


def sweep_trials(tasks: list[str], targets: list[float], rows: list[float]) -> list[dict]:
    return [{"name": trial_name(t, w, r), "task": t, "target": w, "row_density": r}
            for t in tasks for w in targets for r in rows]


def base_config(cfg: SuiteConfig, workdir: Path, tasks: list[str]) -> SuiteConfig:
    """The sweep's base suite: the base and, with ``references``, the swept tasks' step0."""
    raw = _sub_raw(cfg, workdir, "base")
    raw.update(name=f"{cfg.name}.base", tasks=list(tasks), steps=[])
    return validate_suite(raw, source=f"{workdir / SWEEP_FILE}")


def trial_config(cfg: SuiteConfig, workdir: Path, trial: dict) -> SuiteConfig:
    """One trial's suite: its task's sharing steps at the trial's target (the base is imported)."""
    raw = _sub_raw(cfg, workdir, f"trials/{trial['name']}")
    task = trial["task"]
    over = copy.deepcopy(raw.get("task_overrides") or {})
    steps = over.setdefault(task, {})
    steps["step1"] = {**steps.get("step1", {}), "target_weight_sparsity": trial["target"], "l0_lambda": 0.0}
    if trial["row_density"] != ROW_OFF:
        steps["step3"] = {**steps.get("step3", {}), "train_row_density": trial["row_density"]}
    raw.update(name=f"{cfg.name}.{trial['name']}", tasks=[task], references=False, task_overrides=over)
    return validate_suite(raw, source=f"{workdir / SWEEP_FILE}")


def _sub_raw(cfg: SuiteConfig, workdir: Path, sub: str) -> dict:
    """A sub-suite's config: the sweep's, with its own storage (a sub-folder of the sweep's) and
    the sweep's MLflow store, and the DeepSpeed file made absolute (Tune trials run elsewhere)."""
    raw = cfg.model_dump(mode="json")
    if cfg.storage:
        raw["storage"] = f"{cfg.storage.rstrip('/')}/{sub}"
    raw["tracking_uri"] = sweep_tracking_uri(cfg, workdir)
    from cluster.checks import ds_config_path

    raw["deepspeed"] = str(Path(ds_config_path(cfg)).absolute())
    return raw


def sweep_tracking_uri(cfg: SuiteConfig, workdir: Path) -> str:
    from cluster.tracking import default_tracking_uri

    return cfg.tracking_uri or default_tracking_uri(workdir)


def load_sweep(workdir: Path) -> tuple[SuiteConfig, dict]:
    path = Path(workdir) / SWEEP_FILE
    if not path.exists():
        raise ConfigError(f"{workdir}: no sweep here ({SWEEP_FILE} missing; start one with `launcher sweep`)")
    meta = json.loads(path.read_text())
    return validate_suite(meta["config"], source=str(path), workdir=str(workdir)), meta


def is_sweep(workdir: Path) -> bool:
    return (Path(workdir) / SWEEP_FILE).exists()


def _write_sweep_file(workdir: Path, meta: dict) -> None:
    from mtshare.checkpoint import atomic_write_bytes

    atomic_write_bytes(workdir / SWEEP_FILE, json.dumps(meta, indent=1).encode())


def _sweep_meta(cfg: SuiteConfig, workdir: Path, tasks: list[str], targets: list[float], rows: list[float],
                config_path: Any, overrides: list[str]) -> dict:
    """sweep.json's content: a new sweep, or the existing one when this call asks for the same
    sweep (same config, tasks, targets and row densities); anything else is refused."""
    from cluster.workdir import _portable

    config = _portable(cfg.model_dump(mode="json"), workdir)
    want = {"config": config, "tasks": tasks, "targets": targets, "row_densities": rows}
    path = workdir / SWEEP_FILE
    if path.exists():
        saved = json.loads(path.read_text())
        for key, value in want.items():
            if saved.get(key) != value:
                raise ConfigError(f"{path}: this workdir holds a sweep with other {key.replace('_', ' ')}; run "
                                  f"the same command to resume it, or use another --workdir")
        return saved
    return {"sweep": cfg.name, "run_id": uuid.uuid4().hex, **want, "config_path": str(config_path or ""),
            "overrides": list(overrides), "mlflow_run_id": None, "created": time.time()}


# --- running --------------------------------------------------------------------------------

def run_sweep(cfg: SuiteConfig, workdir: Path, tasks: list[str] | None, targets: list[float],
              rows: list[float] | None = None, address: str | None = None, progress: bool = True,
              config_path: Any = None, overrides: list[str] | None = None) -> int:
    """``launcher sweep``: the base, then every trial on Ray Tune. 0 when every trial finished,
    1 when some failed (the others are kept; run again to resume)."""
    workdir = Path(workdir)
    tasks = list(tasks or cfg.tasks)
    unknown = [t for t in tasks if t not in cfg.tasks]
    if unknown:
        raise ConfigError(f"--tasks: {', '.join(unknown)} not among the config's tasks ({', '.join(cfg.tasks)})")
    if "step1" not in cfg.steps:
        raise ConfigError("steps: a sweep varies step1's target_weight_sparsity; steps must include step1")
    rows = list(rows or [ROW_OFF])
    if rows != [ROW_OFF] and "step3" not in cfg.steps:
        raise ConfigError("--row-densities: set step3's train_row_density; steps must include step3")
    check_writable(workdir, f"--workdir {workdir}")
    meta = _sweep_meta(cfg, workdir, tasks, targets, rows, config_path, overrides or [])
    base_cfg = base_config(cfg, workdir, tasks)
    trials = sweep_trials(tasks, targets, rows)
    trial_config(cfg, workdir, trials[0])  # bad overrides fail here, before anything runs

    from cluster.run import MlflowParent, _tracker, ray_auth_env, run_suite
    from cluster.scheduler import DriverLock

    prepare_workdir(workdir)
    with DriverLock(workdir):
        tracker = _tracker(cfg, workdir)
        sweep_run = tracker.start_suite(cfg.name, cfg.model_dump(mode="json"), json.dumps(meta, indent=1),
                                        {"mtshare.kind": "sweep", "mtshare.workdir": str(workdir.resolve())},
                                        meta.get("mlflow_run_id"))
        _log_sweep_params(tracker, sweep_run, meta)
        meta["mlflow_run_id"] = sweep_run
        _write_sweep_file(workdir, meta)
        parent = MlflowParent(cfg.name, sweep_run)
        from cluster.checks import check_ray_address

        check_ray_address(address)
        with ray_auth_env():  # Ray reads the auth mode when it is imported and connects
            import ray

            from cluster.executors import connect_ray

            owns_ray = not ray.is_initialized()
            if owns_ray:
                connect_ray(address)
        try:
            print(f"sweep {cfg.name}: {len(trials)} trials ({', '.join(tasks)} x targets "
                  f"{', '.join(f'{w:g}' for w in targets)}" + ("" if rows == [ROW_OFF] else
                  f" x row densities {', '.join(f'{r:g}' for r in rows)}") + f"); workdir {workdir}", flush=True)
            print("sweep: the base" + (" and the step0 references" if cfg.references else ""), flush=True)
            rc = run_suite(base_cfg, workdir / "base", progress=progress, parent=parent)
            if rc != 0:
                tracker.finish_suite(sweep_run, "failed")
                print(f"sweep {cfg.name}: the base suite failed; fix the cause and run the same command again")
                return 1
            failed = _run_trials(cfg, workdir, trials, parent)
        finally:
            if owns_ray:
                ray.shutdown()
        from cluster.sweep_report import sweep_report, write_sweep_plots

        report = sweep_report(workdir)
        plots = write_sweep_plots(workdir, report)
        for p in plots:
            with contextlib.suppress(Exception):
                tracker.client.log_artifact(sweep_run, str(p), "report")
        done = sum(1 for t in report["trials"] if t["state"] == "done")
        tracker.finish_suite(sweep_run, "done" if not failed else "failed",
                             {"trials_done": done, "trials_failed": len(failed)})
    from cluster.sweep_report import format_sweep

    print(format_sweep(report))
    print("plots: " + ", ".join(str(p) for p in plots))
    if failed:
        print(f"sweep {cfg.name}: {len(failed)} trial(s) failed: " + "; ".join(failed), flush=True)
        print("fix the cause, then run the same command again: finished trials are kept")
        return 1
    print(f"sweep {cfg.name}: done ({len(trials)} trials). Next: python -m launcher sweep pick --workdir {workdir} "
          f"--out DIR")
    return 0


def _log_sweep_params(tracker, run_id: str, meta: dict) -> None:
    with contextlib.suppress(Exception):  # already logged on an earlier launch (params are immutable)
        tracker._log_params(run_id, {"sweep.tasks": ",".join(meta["tasks"]),
                                     "sweep.targets": ",".join(f"{w:g}" for w in meta["targets"]),
                                     "sweep.row_densities": ",".join(f"{r:g}" for r in meta["row_densities"])})


def concurrent_trials(cfg: SuiteConfig, tasks: list[str]) -> int:
    """How many trial pipelines the cluster holds at once: its capacity over the workers of the
    most demanding swept task's pipeline (``resources.task_resources`` may differ per task; at
    least 1; Ray's placement has the last word)."""
    import ray

    from cluster.executors import worker_resources

    total = ray.cluster_resources()
    fits = []
    for task in tasks:
        need = {k: v * cfg.resources.workers for k, v in worker_resources(cfg, task).items() if v > 0}
        fits.append(int(min(total.get(k, 0.0) / v for k, v in need.items()) + 1e-9))
    return max(1, min(fits))


def _run_trials(cfg: SuiteConfig, workdir: Path, trials: list[dict], parent) -> list[str]:
    """Every trial as one Ray Tune trial; returns '<trial> (<error>)' for those that failed."""
    import os

    import ray
    from ray import tune

    from cluster.executors import short_error

    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"  # trials read the sweep directory by its path
    k = concurrent_trials(cfg, sorted({t["task"] for t in trials}))
    print(f"sweep: {len(trials)} trials, up to {k} at once", flush=True)
    # The trial driver holds no CPU (its stages' workers do) and runs on this node, where the
    # sweep directory and its MLflow store are.
    here = f"node:{ray.util.get_node_ip_address()}"
    trainable = tune.with_resources(run_trial, {"cpu": 0, "custom_resources": {here: 0.001}})
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(trials), "sweep_dir": str(workdir.resolve()),
                     "parent": list(parent)},
        tune_config=tune.TuneConfig(max_concurrent_trials=k, reuse_actors=False,
                                    trial_name_creator=_tune_trial_name, trial_dirname_creator=_tune_trial_name),
        run_config=tune.RunConfig(name=f"launch-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}",
                                  storage_path=str((workdir / "tune").resolve()),
                                  failure_config=tune.FailureConfig(max_failures=0), verbose=1),
    )
    grid = tuner.fit()
    failed = []
    for result in grid:
        name = result.config["trial"]["name"]
        if result.error is not None:
            failed.append(f"{name} ({short_error(result.error)})")
    return failed


def _tune_trial_name(trial) -> str:
    return trial.config["trial"]["name"]


def run_trial(config: dict) -> None:
    """One Tune trial: the trial's suite, the base imported from the sweep's base suite. Its
    driver's output goes to ``trials/<trial>/driver.log``; its figures to Tune and MLflow."""
    from ray import tune

    from cluster.run import MlflowParent, run_suite

    sweep_dir, trial = Path(config["sweep_dir"]), config["trial"]
    cfg, _ = load_sweep(sweep_dir)
    tcfg = trial_config(cfg, sweep_dir, trial)
    trial_dir = sweep_dir / "trials" / trial["name"]
    import_base(sweep_dir, cfg, tcfg, trial_dir)
    with open(trial_dir / "driver.log", "a") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        rc = run_suite(tcfg, trial_dir, progress=False, parent=MlflowParent(*config["parent"]))
    from cluster.sweep_report import trial_figures

    figures = trial_figures(trial_dir, trial)
    _log_trial(tcfg, trial_dir, trial, figures, config["parent"][0])
    if rc != 0:
        raise RuntimeError(f"trial {trial['name']} failed: {figures.get('error') or 'see its driver.log'}")
    tune.report({k: v for k, v in figures.items() if isinstance(v, (int, float))})


def _log_trial(tcfg: SuiteConfig, trial_dir: Path, trial: dict, figures: dict, experiment: str) -> None:
    """The trial's own MLflow run (its suite run, nested under the sweep's): the swept values
    as params, the served figures as metrics, so the UI's compare views show the trade-off."""
    from cluster.run import _tracker
    from cluster.workdir import read_state

    with contextlib.suppress(Exception):  # figures in MLflow are a view; the sweep's outcome stands
        run_id = read_state(trial_dir).get("mlflow_run_id")
        if not run_id:
            return
        tracker = _tracker(tcfg, trial_dir, experiment)
        with contextlib.suppress(Exception):
            tracker._log_params(run_id, {"sweep.task": trial["task"], "sweep.target_weight_sparsity": str(trial["target"]),
                                         "sweep.train_row_density": str(trial["row_density"])})
        tracker.set_tags(run_id, {"mtshare.kind": "trial", "mtshare.trial": trial["name"]})
        tracker.log_metrics(run_id, {k: v for k, v in figures.items() if isinstance(v, (int, float))}, step=0)


def import_base(sweep_dir: Path, cfg: SuiteConfig, tcfg: SuiteConfig, trial_dir: Path) -> None:
    """Give a new trial suite the sweep's base: copy the base checkpoint and result into the
    trial's storage (verified against the base suite's checksum) and record the base stage as
    done in the trial's state file, so its driver verifies it like any finished stage and runs
    only the sub-task's steps. A trial that has a state file already keeps it."""
    from cluster.state import StateBook, new_state
    from cluster.workdir import check_suite_file, load_suite, write_suite_file

    trial_dir.mkdir(parents=True, exist_ok=True)
    storage = suite_storage(tcfg, trial_dir)
    if StateBook.load(storage) is not None:
        return
    base_dir = sweep_dir / "base"
    bcfg, _ = load_suite(base_dir)
    bstorage = suite_storage(bcfg, base_dir)
    bstate = StateBook.load(bstorage)
    base = bstate.stage("base") if bstate else None
    if not base or base["status"] != "done":
        raise RuntimeError(f"{base_dir}: the sweep's base has not finished")
    specs = plan(tcfg)
    if specs[0].model_copy(update={"suite": bcfg.name}) != plan(bcfg)[0]:
        raise RuntimeError(f"{trial_dir}: the trial's base settings differ from the sweep's base")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for name in (MODEL_FILE, "result.json"):
            local = bstorage.get(f"base/{name}", Path(tmp) / name,
                                 expected_sha256=base["checksum"] if name == MODEL_FILE else None)
            storage.put(local, f"base/{name}")
    if storage.sha256(f"base/{MODEL_FILE}") != base["checksum"]:
        raise RuntimeError(f"{storage.uri}/base/{MODEL_FILE}: the copy of the base differs from the original")
    run_id = check_suite_file(trial_dir, tcfg)
    state = new_state(tcfg.name, specs)
    state["run_id"] = run_id
    book = StateBook(storage, state)
    book.update("base", save=False, status="done", checksum=base["checksum"], started=base.get("started"),
                ended=base.get("ended"), iteration=base.get("iteration"), fingerprint=specs[0].fingerprint(),
                attempts=base.get("attempts", 1), node=base.get("node"), host=base.get("host"),
                error=None, imported_from=f"{bstorage.uri}/base")
    write_suite_file(trial_dir, tcfg, storage, None, [], run_id, None)
    book.save()
