"""The driver: runs a suite's stage DAG on an executor, keeping ``state.json`` and MLflow current.

    base ──► <task>/step1 ──► <task>/step2 ──► <task>/step3      (every sub-task, concurrently)
    <task>/step0                                                  (references: need nothing)

Scheduling rule: a stage is ready when every stage it depends on is ``done`` — committed in
the state file with the checksum of its checkpoint, which the driver re-reads from storage
before committing. A ready stage is launched together with the steps that follow it in its
sub-task (step1 → step2 → step3) as one *pipeline*: one executor run (for Ray: one Ray Train
``fit``, whose start-up is paid once) that trains the steps in turn. The workers report each
step's end as an event; the driver commits that step (checksum, state file, its own MLflow
run) while the next one trains. So the moment the base is committed, every sub-task pipeline
starts at once, when the cluster has room for it: room is judged from the cluster's total
resources minus what running pipelines asked for (workers × per-worker CPUs/GPUs/custom
resources); Ray's placement does the rest.

Each running pipeline occupies one driver thread that blocks in the executor's ``run``; the
driver's own loop drains progress events, commits finished steps and launches ready stages. A
failed step fails alone: its pipeline's later steps stay ``pending`` (marked blocked) and every
other pipeline goes on. The suite ends ``done`` or ``failed`` with the failed stages and their
errors.

Resume (:meth:`SuiteDriver.run` on an existing state) first verifies every ``done`` stage —
checkpoint present, sha256 equal to the recorded checksum, trained from the inputs that are
current — and re-runs any that fail the check together with everything downstream; stages
that were running, failed or pending run again and pick up their mid-stage resume state.
"""
from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable

from mtshare.config import ConfigError, SuiteConfig
from mtshare.stages import StageSpec, downstream, plan

from cluster.stage_runner import CHECKPOINTS, RESULT_FILE, checkpoint_format, claim_stage, find_resume, make_job
from cluster.state import STATE_KEY, StateBook, driver_identity, new_state
from cluster.storage import Storage
from cluster.tracking import PARENT_TAG
from cluster.workdir import is_workdir_store

log = logging.getLogger(__name__)

PROGRESS_SAVE_EVERY_S = 2.0     # progress (iteration counters) is saved at most this often
CAPACITY_REFRESH_S = 5.0
HEARTBEAT_S = 30.0
STALE_AFTER_S = 3 * HEARTBEAT_S  # no heartbeat for this long: the driver holding the lock is gone
FIT_OVERHEAD_ITERS = 50  # scheduling weight of one stage's start-up, in iterations


def _prev_name(spec: StageSpec) -> str | None:
    return spec.prev_key.rsplit("/", 1)[0] if spec.prev_key else None


def remaining_work(specs: dict[str, StageSpec]) -> dict[str, float]:
    """Per stage: its own cost plus the costliest chain of stages that wait for it, with a stage
    costing its iterations plus ``FIT_OVERHEAD_ITERS`` (starting a Ray Train run is not free).
    Launching the ready stage with the most remaining work first (highest-level-first list
    scheduling) starts the base before everything, then the pipelines' early steps, and lets
    the step0 references fill in before they become the tail of the suite."""
    work: dict[str, float] = {}
    for name in reversed(list(specs)):  # plan order is topological: dependents come later
        after = [work[n] for n, s in specs.items() if name in s.depends_on]
        work[name] = specs[name].optim.iters + FIT_OVERHEAD_ITERS + max(after, default=0.0)
    return work


def check_state_owner(storage: Storage, cfg: SuiteConfig, workdir: Path, run_id: str | None = None) -> StateBook | None:
    """A storage area belongs to one suite run: another suite, or another run of the same suite,
    must not take over its state and checkpoints. The run is named by the id recorded on both
    sides (``suite.json`` and ``state.json``), so a moved, copied or restored work directory
    still owns its storage. Returns the state found there (None for a fresh storage area)."""
    book = StateBook.load(storage)
    if book is None:
        return None
    state = book.state
    names = [s.name for s in plan(cfg)]
    if state.get("suite") != cfg.name or book.names() != names:
        raise ConfigError(f"{storage.uri}/state.json: holds suite '{state.get('suite')}' with stages that do not "
                          f"match this config; use another storage or workdir")
    owner = state.get("workdir")
    if state.get("run_id") and run_id:
        if state["run_id"] != run_id:
            raise ConfigError(f"storage: {storage.uri} belongs to another run of suite '{cfg.name}' (run "
                              f"{state['run_id'][:12]}, started in workdir {owner}); resume it from that run's "
                              f"workdir (or a copy of it) or give this run another storage")
        return book
    if owner and owner != str(Path(workdir).resolve()):  # a state written before run ids
        raise ConfigError(f"storage: {storage.uri} belongs to the run in workdir {owner}; resume it there "
                          f"(`launcher resume --workdir {owner}`) or give this run another storage")
    return book


class _SafeTracker:
    """MLflow calls that must not kill a running suite: a failure is logged and skipped."""

    def __init__(self, tracker):
        self.tracker = tracker

    def __getattr__(self, name: str):
        def call(*args, **kwargs):
            if self.tracker is None:
                return None
            try:
                return getattr(self.tracker, name)(*args, **kwargs)
            except Exception as e:  # noqa: BLE001
                log.warning("mlflow: %s failed: %s", name, e)
                return None

        return call


class DriverLock:
    """``<workdir>/driver.lock``: one driver per suite. A lock left by a dead driver is taken
    over: on this host when its pid is gone; on another host (whose processes we cannot see: a
    lost node, a killed Ray Job) when the suite's state file has had no heartbeat from that
    driver for ``STALE_AFTER_S`` and the lock itself is older than that."""

    def __init__(self, workdir: Path, storage: Storage | None = None):
        self.path = Path(workdir) / "driver.lock"
        self.storage = storage

    def __enter__(self) -> "DriverLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = f"{socket.gethostname()} {os.getpid()}"
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self.check_free()
                self.path.unlink(missing_ok=True)  # left by a dead driver
                continue
            with os.fdopen(fd, "w") as f:
                f.write(me)
            return self
        raise ConfigError(f"{self.path}: could not take the driver lock")

    def check_free(self) -> None:
        """Raise :class:`ConfigError` when a live driver holds the lock (read-only)."""
        if self.path.exists() and self._holder_alive():
            raise ConfigError(f"{self.path}: another driver ({self.path.read_text().strip()}) is running "
                              f"this suite; wait for it or stop it first")

    def _holder_alive(self) -> bool:
        try:
            host, pid = self.path.read_text().split()
        except (OSError, ValueError):
            return False
        if host != socket.gethostname():
            return self._heartbeat_fresh(host, int(pid))
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return int(pid) != os.getpid()

    def _heartbeat_fresh(self, host: str, pid: int) -> bool:
        now = time.time()
        try:
            if now - self.path.stat().st_mtime < STALE_AFTER_S:
                return True  # just taken: its driver may not have written the state file yet
            state = self.storage.read_json(STATE_KEY) if self.storage is not None else None
        except Exception:  # noqa: BLE001 - cannot tell: be safe
            return True
        if state is None:
            return True
        driver = state.get("driver") or {}
        if (driver.get("host"), driver.get("pid")) != (host, pid):
            return False  # the state names another (later) driver: this lock is a leftover
        return now - float(driver.get("heartbeat") or 0) < STALE_AFTER_S

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)


class SuiteDriver:
    """Runs (or resumes) one suite. ``run()`` returns the final state dict."""

    def __init__(self, cfg: SuiteConfig, workdir: Path, storage: Storage, executor: Any, tracker: Any = None, *,
                 ds_config: dict | None = None, config_text: str = "", on_update: Callable[[dict], None] | None = None,
                 poll_s: float = 0.3, run_id: str | None = None, parent_run_id: str | None = None):
        self.cfg, self.workdir, self.storage, self.executor = cfg, Path(workdir), storage, executor
        self.tracker = _SafeTracker(tracker)
        self.ds_config = ds_config
        self.config_text = config_text
        self.on_update = on_update or (lambda state: None)
        self.poll_s = poll_s
        self.run_id = run_id
        self.parent_run_id = parent_run_id  # the suite's MLflow run nests under it (a sweep's)
        self.specs = {s.name: s for s in plan(cfg)}
        self.order = list(self.specs)
        self.work = remaining_work(self.specs)
        self.book: StateBook | None = None
        self.idle = False  # set when run() found a finished, verified suite and did nothing
        # Running pipelines by the name of their first stage: (future, demand, stage names).
        self.running: dict[str, tuple[cf.Future, dict[str, float], list[str]]] = {}
        self._last_progress_save = 0.0
        self._capacity: dict[str, float] = {}
        self._capacity_at = 0.0
        self._mirror = self._mirror_dir()

    # --- setup ---------------------------------------------------------------------------
    def _mirror_dir(self) -> Path | None:
        """Where ``result.json`` files are mirrored for ``launcher report`` (which reads
        ``<workdir>/store``) when the storage is elsewhere, e.g. in S3."""
        return None if is_workdir_store(self.storage, self.workdir) else self.workdir / "store"

    def _open_state(self) -> StateBook:
        book = check_state_owner(self.storage, self.cfg, self.workdir, self.run_id)
        if book is None:
            state = new_state(self.cfg.name, list(self.specs.values()))
            state["run_id"] = self.run_id
            book = StateBook(self.storage, state)
        # Informational: where the run was last driven from (a moved work directory updates it).
        book.update(save=False, workdir=str(self.workdir.resolve()))
        if self.run_id and not book.state.get("run_id"):
            book.update(save=False, run_id=self.run_id)
        return book

    def _check_done(self, spec: StageSpec, st: dict) -> str | None:
        """Why a ``done`` stage cannot be trusted, or None when it can."""
        if not self.storage.exists(spec.output_key):
            return "checkpoint missing"
        if not self.storage.exists(f"{spec.output_dir_key}/{RESULT_FILE}"):
            return "result.json missing"
        if self.storage.sha256(spec.output_key) != st["checksum"]:
            return f"checksum mismatch of {spec.output_key}"
        if st.get("fingerprint") and st["fingerprint"] != spec.fingerprint():
            return "its configuration changed"
        for role, up in (("base", "base" if spec.base_key else None), ("prev", _prev_name(spec))):
            if up and (st.get("inputs", {}).get(role) or {}).get("sha256") != self.book.stage(up)["checksum"]:
                return f"trained from an older {up}"
        return None

    def _verify_finished(self) -> list[str]:
        """Demote every untrustworthy ``done`` stage (and its downstream) to ``pending``."""
        rerun: list[str] = []
        for name in self.order:
            st = self.book.stage(name)
            if st["status"] != "done" or name in rerun:
                continue
            problem = self._check_done(self.specs[name], st)
            if problem is None:
                continue
            log.warning("%s: %s; re-running it and everything downstream", name, problem)
            self.book.update(name, save=False, status="pending", error=f"re-run: {problem}", checksum=None)
            rerun.append(name)
            for d in downstream(list(self.specs.values()), name):
                if self.book.stage(d)["status"] == "done":
                    self.book.update(d, save=False, status="pending", error=f"re-run: upstream {name} re-runs")
                rerun.append(d)
        return rerun

    def _start_tracking(self) -> None:
        state = self.book.state
        tags = {"mtshare.workdir": str(self.workdir.resolve()), "mtshare.storage": self.storage.uri,
                "mtshare.executor": self.executor.name}
        if self.parent_run_id:
            tags[PARENT_TAG] = self.parent_run_id
        parent = self.tracker.start_suite(self.cfg.name, self.cfg.model_dump(mode="json"), self.config_text, tags,
                                          state.get("mlflow_run_id"))
        self.book.update(save=False, mlflow_run_id=parent,
                         mlflow_experiment_id=getattr(self.tracker.tracker, "experiment_id", None))

    # --- the loop --------------------------------------------------------------------------
    def run(self) -> dict:
        from mtshare.suite import ensure_dataset

        self.book = self._open_state()
        rerun = self._verify_finished()
        all_done = all(self.book.stage(n)["status"] == "done" for n in self.order)
        if not rerun and all_done and self.book.state.get("state") == "done":
            # A finished, verified suite: resume is idempotent, so touch nothing (state file,
            # MLflow runs, checkpoints) and start nothing.
            self.idle = True
            return self.book.snapshot()
        for name in self.order:  # interrupted or failed before: run again (resuming mid-stage)
            st = self.book.stage(name)
            if st["status"] in ("running", "failed"):
                self.book.update(name, save=False, status="pending")
            elif st["status"] == "pending" and (st.get("error") or "").startswith("blocked"):
                self.book.update(name, save=False, error=None)  # its upstream gets another chance
        self.book.update(save=False, state="running", error=None, driver=driver_identity(), ended=None,
                         started=self.book.state.get("started") or time.time())
        self._start_tracking()
        self.book.save()
        todo = [self.specs[n] for n in self.order if self.book.stage(n)["status"] != "done"]
        self.executor.check_fits(todo)  # the CLI checked already; for library callers
        ensure_dataset(self.cfg)
        pool = cf.ThreadPoolExecutor(max_workers=max(1, len(todo)), thread_name_prefix="stage")
        try:
            self._loop(pool)
        except BaseException:
            # Ctrl-C / SIGTERM: record it and leave at once. The stage threads stay blocked in
            # fit() until Ray shuts down (the executor's close()); waiting for them would mean
            # waiting for every running stage to finish.
            self._interrupted()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        return self._finish()

    def _loop(self, pool: cf.ThreadPoolExecutor) -> None:
        while True:
            self._apply_events(self.executor.drain_events())
            for name, (fut, _, names) in list(self.running.items()):
                if fut.done():
                    del self.running[name]
                    self._apply_events(self.executor.drain_events())  # its last events first
                    self._on_finished(names, fut)
            launched = self._launch_ready(pool)
            if time.time() - self._last_progress_save > HEARTBEAT_S:
                self.book.save()  # the heartbeat `status` uses to tell a live driver from a dead one
                self._last_progress_save = time.time()
            self.on_update(self.book.snapshot())
            if not self.running and not launched:
                return
            futures = [f for f, _, _ in self.running.values()]
            cf.wait(futures, timeout=self.poll_s, return_when=cf.FIRST_COMPLETED)

    def _in_pipelines(self) -> set[str]:
        return {n for _, _, names in self.running.values() for n in names}

    def _ready(self) -> list[StageSpec]:
        ready = []
        taken = self._in_pipelines()
        for name in self.order:
            st = self.book.stage(name)
            if st["status"] != "pending" or name in taken:
                continue
            deps = [self.book.stage(d) for d in self.specs[name].depends_on]
            if all(d["status"] == "done" for d in deps):
                ready.append(self.specs[name])
            elif any(d["status"] == "failed" or (d.get("error") or "").startswith("blocked") for d in deps):
                bad = next(d["name"] for d in deps if d["status"] != "done")
                if not (st.get("error") or "").startswith("blocked"):
                    self.book.update(name, error=f"blocked: {bad} did not finish")
        return sorted(ready, key=lambda spec: -self.work[spec.name])

    def _capacity_now(self) -> dict[str, float]:
        if time.time() - self._capacity_at > CAPACITY_REFRESH_S:
            self._capacity, self._capacity_at = self.executor.capacity(), time.time()
        return self._capacity

    def _fits(self, demand: dict[str, float]) -> bool:
        if not self.running:
            return True  # never deadlock on accounting: Ray's own placement has the last word
        cap = self._capacity_now()
        used: dict[str, float] = {}
        for _, d, _ in self.running.values():
            for k, v in d.items():
                used[k] = used.get(k, 0.0) + v
        return all(used.get(k, 0.0) + v <= cap.get(k, 0.0) + 1e-9 for k, v in demand.items())

    def _launch_ready(self, pool: cf.ThreadPoolExecutor) -> bool:
        launched = False
        for spec in self._ready():
            demand = self.executor.demand(spec)
            if not self._fits(demand):
                continue
            self._launch(pool, spec, demand)
            launched = True
        return launched

    def pipeline_of(self, spec: StageSpec) -> list[StageSpec]:
        """``spec`` and the pending steps that follow it in its sub-task, in order."""
        specs = [spec]
        while True:
            nxt = next((s for s in self.specs.values() if s.depends_on and _prev_name(s) == specs[-1].name), None)
            if nxt is None or self.book.stage(nxt.name)["status"] != "pending":
                return specs
            specs.append(nxt)

    def _launch(self, pool: cf.ThreadPoolExecutor, spec: StageSpec, demand: dict[str, float]) -> None:
        specs = self.pipeline_of(spec)
        base_sha = self.book.stage("base")["checksum"] if spec.base_key else None
        prev = _prev_name(spec)
        prev_sha = self.book.stage(prev)["checksum"] if prev else None
        fmt = checkpoint_format(self.ds_config, self.executor.name == "ray")
        resume_from = find_resume(self.storage, spec, {"base": base_sha, "prev": prev_sha}, fmt)
        job = make_job(specs, self.storage, base_sha256=base_sha, prev_sha256=prev_sha, ds_config=self.ds_config,
                       cpus_per_worker=self.cfg.resources.cpus_per_worker, resume_from=resume_from)
        for s in specs:
            claim_stage(self.storage, s, job["launch_id"])
            self.book.update(s.name, save=False, run=job["run"])  # the Ray Train run that trains it
        self._start_stage(spec)
        self.running[spec.name] = (pool.submit(self.executor.run, specs, job), demand, [s.name for s in specs])

    def _start_stage(self, spec: StageSpec) -> None:
        """A step begins: ``running`` in the state file, its MLflow run (re)opened."""
        st = self.book.stage(spec.name)
        run_id = self.tracker.start_stage(
            self.book.state["mlflow_run_id"], spec,
            {"workers": self.cfg.resources.workers, "executor": self.executor.name,
             "zero_stage": (self.ds_config or {}).get("zero_optimization", {}).get("stage", "-")},
            st.get("mlflow_run_id"),
        ) or st.get("mlflow_run_id")
        self.book.update(spec.name, status="running", started=time.time(), ended=None, error=None, node=None,
                         host=None, mlflow_run_id=run_id, iteration=0, phase=None)

    # --- events and outcomes ----------------------------------------------------------------
    def _apply_events(self, events: list[dict]) -> None:
        dirty = False
        for ev in events:
            name = ev.get("stage")
            if name not in self.specs:
                continue
            st = self.book.stage(name)
            kind = ev["type"]
            if kind == "start" and st["status"] == "pending":  # the pipeline's next step begins
                self._start_stage(self.specs[name])
                st = self.book.stage(name)
            if kind == "done":
                if st["status"] == "running":
                    self._commit(name, ev["outcome"])
                continue
            if kind == "start":
                self.book.update(name, save=False, attempts=st["attempts"] + 1, node=ev["node"], host=ev.get("host"),
                                 worker_started=ev["time"], worker_pid=ev.get("pid"))
                dirty = True
            elif kind == "input":
                inputs = dict(st.get("inputs") or {})
                inputs[ev["role"]] = {"key": ev["key"], "sha256": ev["sha256"], "verified_on": ev["node"]}
                self.book.update(name, save=False, inputs=inputs)
                dirty = True
            elif kind == "resume":
                self.book.update(name, save=False, iteration=ev["iteration"], resumed_from=ev["iteration"] or None)
                dirty = True
            elif kind == "checkpoint":
                self.book.update(name, save=False, checkpoint_iteration=ev["iteration"])
                dirty = True
            elif kind == "phase":  # the end-of-stage evaluations (rank 0's share of each)
                self.book.update(name, save=False, phase={k: ev[k] for k in ("phase", "done", "total", "ranks")})
                dirty = True
            elif kind == "log":
                self.book.update(name, save=False, iteration=max(int(ev["step"]), st.get("iteration") or 0))
                if st.get("mlflow_run_id"):
                    self.tracker.log_metrics(st["mlflow_run_id"], ev["metrics"], ev["step"], ev["time"])
        if dirty or (events and time.time() - self._last_progress_save > PROGRESS_SAVE_EVERY_S):
            self.book.save()
            self._last_progress_save = time.time()

    def _on_finished(self, names: list[str], fut: cf.Future) -> None:
        """A pipeline ended: steps committed from events stay; the outcomes commit the others
        (an event can be lost); the running step without an outcome failed with the run's error;
        steps after a failure stay pending, blocked."""
        try:
            result = fut.result()
        except Exception as e:  # noqa: BLE001 - the executor itself failed
            from cluster.executors import short_error

            result = {"stages": [], "error": short_error(e)}
        outcomes = {o["stage"]: o for o in result.get("stages", [])}
        for name in names:
            st = self.book.stage(name)
            if st["status"] == "pending" and name not in outcomes:
                continue  # never started: blocked by an earlier step (see _ready)
            if st["status"] == "done":
                continue
            if st["status"] == "pending":
                self._start_stage(self.specs[name])
            self._commit(name, outcomes.get(name) or {"status": "failed", "error": result.get("error") or "unknown error"})

    def _commit(self, name: str, outcome: dict) -> None:
        """Record a step's end: ``done`` after its checkpoint is verified in storage, else ``failed``."""
        spec = self.specs[name]
        st = self.book.stage(name)
        if outcome.get("status") == "done":
            problem = self._commit_check(spec, outcome)
            if problem is None:
                result = self.storage.read_json(f"{spec.output_dir_key}/{RESULT_FILE}")
                self._mirror_result(spec, result)
                self.book.update(name, status="done", checksum=outcome["checksum"], ended=time.time(), error=None,
                                 iteration=result.get("iterations", st.get("iteration")),
                                 fingerprint=spec.fingerprint(),
                                 param_digests=outcome.get("param_digests"), stepper=outcome.get("stepper"),
                                 world_size=outcome.get("world_size"))
                self.tracker.finish_stage(st["mlflow_run_id"], result, outcome["checksum"],
                                          f"{self.storage.uri}/{spec.output_key}", None)
                return
            outcome = {"status": "failed", "error": problem}
        self.book.update(name, status="failed", ended=time.time(), error=outcome.get("error") or "unknown error")
        self.tracker.finish_stage(st["mlflow_run_id"], None, None, None, outcome.get("error") or "failed")

    def _commit_check(self, spec: StageSpec, outcome: dict) -> str | None:
        """The checkpoint in storage must be the one the workers wrote (same sha256)."""
        try:
            stored = self.storage.sha256(spec.output_key)
        except Exception as e:  # noqa: BLE001
            return f"{spec.output_key}: unreadable after the stage ({e})"
        if stored != outcome.get("checksum"):
            return f"{spec.output_key}: stored sha256 {stored[:12]}… differs from the one trained"
        return None

    def _mirror_result(self, spec: StageSpec, result: dict) -> None:
        if self._mirror is None:
            return
        import json

        from mtshare.checkpoint import atomic_write_bytes

        atomic_write_bytes(self._mirror / spec.output_dir_key / RESULT_FILE, json.dumps(result, indent=1).encode())

    def _interrupted(self) -> None:
        for name in self._in_pipelines():
            if self.book.stage(name)["status"] == "running":
                self.book.update(name, save=False, status="failed", ended=time.time(), error="interrupted: driver stopped")
        self.book.update(state="failed", error="interrupted: driver stopped", ended=time.time())

    def _finish(self) -> dict:
        failed = [s for s in self.book.state["stages"] if s["status"] == "failed"]
        blocked = [s for s in self.book.state["stages"] if s["status"] == "pending"]
        if failed or blocked:
            parts = [f"{s['name']} ({s['error']})" for s in failed] + [f"{s['name']} (not run: {s['error']})" for s in blocked]
            self.book.update(save=False, state="failed", error="failed stages: " + "; ".join(parts))
        else:
            self.book.update(save=False, state="done", error=None)
            self.storage.delete_prefix(CHECKPOINTS)  # every step is committed: no resume state is needed
        self.book.update(ended=time.time())
        self.tracker.finish_suite(self.book.state["mlflow_run_id"], self.book.state["state"], self._summary())
        self.on_update(self.book.snapshot())
        return self.book.snapshot()

    def _summary(self) -> dict[str, float]:
        """Suite figures for the parent run (from the report of finished stages)."""
        from mtshare.report import build_report

        results = {}
        for s in self.book.state["stages"]:
            if s["status"] == "done":
                try:
                    results[s["name"]] = self.storage.read_json(f"{s['name']}/{RESULT_FILE}")
                except Exception:  # noqa: BLE001
                    pass
        if not results:
            return {}
        try:
            suite = build_report(results)["suite"]
        except Exception as e:  # noqa: BLE001 - a report problem must not fail the suite
            log.warning("report: %s", e)
            return {}
        out = {f"suite_{k}": v for k, v in suite.items() if isinstance(v, (int, float))}
        out["stages_done"] = float(len(results))
        return out

