"""Where a pipeline runs: on Ray (one ``TorchTrainer`` per pipeline) or in the driver's process.

Both executors run the same :func:`cluster.stage_runner.run_pipeline_worker`; they differ in
how many workers a pipeline gets, where they are placed, which stepper trains (DeepSpeed under
Ray, plain torch in-process) and who keeps the checkpoints (Ray Train, or a copy to storage).
The driver (``scheduler.py``) calls :meth:`run` from one thread per running pipeline; ``run``
blocks until the pipeline ends and returns ``{"stages": [outcome, ...]}``.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
from pathlib import Path

from mtshare.config import ConfigError, SuiteConfig
from mtshare.stages import StageSpec

from cluster.stage_runner import CHECKPOINTS, cache_root, fetch_checkpoint, pipeline_train_func, run_pipeline_worker
from cluster.storage import Storage, ray_train_storage

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MAX_FAILURES = int(os.environ.get("MTSHARE_MAX_FAILURES", "2"))


class LocalBoard:
    """The progress board of the in-process executor (same interface as :class:`ProgressBoard`)."""

    def __init__(self):
        self._events: list[dict] = []
        self._lock = threading.Lock()

    def push(self, event: dict) -> None:
        with self._lock:
            self._events.append(event)

    def drain(self) -> list[dict]:
        with self._lock:
            out, self._events = self._events, []
        return out


def worker_resources(cfg: SuiteConfig, task: str) -> dict[str, float]:
    """Resources one Ray Train worker of a stage of ``task`` asks for."""
    r = cfg.resources
    res = {"CPU": float(r.cpus_per_worker), **{k: float(v) for k, v in r.custom.items()}}
    if r.gpus_per_worker:
        res["GPU"] = float(r.gpus_per_worker)
    for k, v in r.task_resources.get(task, {}).items():
        res[k] = res.get(k, 0.0) + float(v)
    return res


def can_host(node_resources: dict[str, float], need: dict[str, float]) -> bool:
    """Whether a node offering ``node_resources`` can host one worker needing ``need``."""
    return all(node_resources.get(k, 0.0) >= v for k, v in need.items())


def _field_of(resource: str, cfg: SuiteConfig, task: str) -> str:
    if resource == "CPU":
        return "resources.cpus_per_worker"
    if resource == "GPU":
        return "resources.gpus_per_worker"
    if resource in cfg.resources.task_resources.get(task, {}):
        return f"resources.task_resources.{task}.{resource}"
    return f"resources.custom.{resource}"


class InProcessExecutor:
    """Every stage in the driver's process, one at a time, plain torch (no Ray, no DeepSpeed)."""

    name = "inprocess"

    cluster_address = None

    def __init__(self, cfg: SuiteConfig, storage: Storage):
        self.cfg, self.storage = cfg, storage
        self.board = LocalBoard()

    def capacity(self) -> dict[str, float]:
        return {"slot": 1.0}

    def demand(self, spec: StageSpec) -> dict[str, float]:
        return {"slot": 1.0}

    def check_fits(self, specs: list[StageSpec]) -> None:
        pass

    def preflight(self, specs: list[StageSpec]) -> None:
        pass  # the stages run in this process: the driver's own checks were the pre-flight

    def drain_events(self) -> list[dict]:
        return self.board.drain()

    def run(self, specs: list[StageSpec], job: dict) -> dict:
        def report(metrics: dict, checkpoint_dir: str | None, name: str | None) -> None:
            # What Ray Train's report does with a checkpoint: a copy in the suite's storage.
            if checkpoint_dir:
                for f in sorted(Path(checkpoint_dir).rglob("*")):
                    if f.is_file():
                        self.storage.put(f, f"{CHECKPOINTS}/{job['run']}/{name}/{f.relative_to(checkpoint_dir).as_posix()}")

        start = None
        local = cache_root() / "work" / job["launch_id"] / "start"
        if job.get("resume_from"):
            start = fetch_checkpoint(self.storage, job["resume_from"], local)
        try:
            return run_pipeline_worker({**job, "board": self.board}, device=specs[0].device, report=report,
                                       checkpoint=start)
        finally:
            shutil.rmtree(local, ignore_errors=True)

    def describe(self) -> str:
        return "in-process (plain PyTorch, one stage at a time)"

    def close(self) -> None:
        pass


def _progress_board_class():
    import ray

    @ray.remote(num_cpus=0)
    class ProgressBoard:
        """Collects events from stage workers (rank 0): start, inputs verified, per-step
        metrics, checkpoints. The driver drains it a few times a second."""

        def __init__(self):
            self._events: list[dict] = []

        def push(self, event: dict) -> None:
            self._events.append(event)

        def drain(self) -> list[dict]:
            out, self._events = self._events, []
            return out

    return ProgressBoard


class RayExecutor:
    """Each stage is one Ray Train ``TorchTrainer.fit()`` whose workers train with DeepSpeed.

    ``fit()`` blocks while a controller actor runs the worker group, so the driver calls it from
    one thread per running stage; Ray places the workers across the cluster's nodes."""

    name = "ray"

    def __init__(self, cfg: SuiteConfig, storage: Storage, ds_config: dict, address: str | None = None,
                 max_failures: int = DEFAULT_MAX_FAILURES):
        import ray

        self.cfg, self.storage, self.ds_config, self.max_failures = cfg, storage, ds_config, max_failures
        # Read by Ray Train in this process and passed on to its controllers: 60 s by default,
        # too short for a cluster that places workers on nodes still starting.
        os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", f"{cfg.resources.start_timeout_s:g}")
        self.owns_ray = not ray.is_initialized()
        if self.owns_ray:
            connect_ray(address)
        # Where `resume` finds this suite's cluster again (None: a private local Ray).
        local = self.owns_ray and address in (None, "", "local")
        self.cluster_address = None if local else ray.get_runtime_context().gcs_address
        self.board = _progress_board_class().remote()

    # --- resources ---------------------------------------------------------------------------
    def _alive_nodes(self) -> list[dict]:
        import ray

        return [n for n in ray.nodes() if n.get("Alive")]

    def capacity(self) -> dict[str, float]:
        total: dict[str, float] = {}
        for n in self._alive_nodes():
            for k, v in n.get("Resources", {}).items():
                total[k] = total.get(k, 0.0) + float(v)
        return total

    def demand(self, spec: StageSpec) -> dict[str, float]:
        per_worker = worker_resources(self.cfg, spec.task)
        return {k: v * self.cfg.resources.workers for k, v in per_worker.items()}

    def check_fits(self, specs: list[StageSpec]) -> None:
        """Every stage's worker must fit on some node, else the suite could never finish: a
        configuration error, reported before anything runs."""
        nodes = [n.get("Resources", {}) for n in self._alive_nodes()]
        workers = self.cfg.resources.workers
        for spec in specs:
            need = worker_resources(self.cfg, spec.task)
            if any(can_host(node, need) for node in nodes):
                # Ray Train's placement group must hold all the stage's workers at once.
                fit = sum(int(min(node.get(k, 0.0) / v for k, v in need.items() if v > 0) + 1e-9) for node in nodes)
                if fit < workers:
                    raise ConfigError(f"resources.workers: stage {spec.name} needs {workers} workers of {need}, but "
                                      f"the Ray cluster's nodes can hold at most {fit} of them at once")
                continue
            missing = next(k for k, v in need.items() if max((n.get(k, 0.0) for n in nodes), default=0.0) < v)
            best = max((n.get(missing, 0.0) for n in nodes), default=0.0)
            raise ConfigError(
                f"{_field_of(missing, self.cfg, spec.task)}: a worker of stage {spec.name} needs "
                f"{need[missing]:g} {missing}, but no node of the Ray cluster offers more than {best:g}"
            )

    def preflight(self, specs: list[StageSpec]) -> None:
        """Dataset, pretrained weights and a local storage root, checked on every node that can
        host a worker of one of ``specs`` (see :mod:`cluster.preflight`)."""
        from cluster.preflight import check_nodes
        from cluster.storage import LocalStorage

        needs = [worker_resources(self.cfg, t) for t in {s.task for s in specs}]
        hosts = [n for n in self._alive_nodes() if any(can_host(n.get("Resources", {}), need) for need in needs)]
        check_nodes(self.cfg, str(self.storage.root) if isinstance(self.storage, LocalStorage) else None, hosts)

    # --- running -----------------------------------------------------------------------------
    def drain_events(self) -> list[dict]:
        import ray

        return ray.get(self.board.drain.remote())

    def run(self, specs: list[StageSpec], job: dict) -> dict:
        from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        path, fs = ray_train_storage(self.storage)
        r, spec = self.cfg.resources, specs[0]
        trainer = TorchTrainer(
            pipeline_train_func,
            train_loop_config={**job, "board": self.board},
            scaling_config=ScalingConfig(num_workers=r.workers, use_gpu=r.gpus_per_worker > 0,
                                         resources_per_worker=worker_resources(self.cfg, spec.task)),
            run_config=RunConfig(
                name=job["run"], storage_path=path, storage_filesystem=fs,
                failure_config=FailureConfig(max_failures=self.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=1),
                logging_config=LoggingConfig(log_level="WARNING"),
                # As torchrun does: OpenMP threads = the CPUs a worker holds (read at process start).
                worker_runtime_env={"env_vars": {"OMP_NUM_THREADS": str(max(1, int(r.cpus_per_worker)))}},
            ),
            torch_config=TorchConfig(backend="nccl" if spec.device == "cuda" else "gloo",
                                     timeout_s=r.collective_timeout_s),
        )
        try:
            result = trainer.fit()
        except Exception as e:  # noqa: BLE001 - TrainingFailedError & co: the running step failed
            return {"stages": [], "error": short_error(e)}
        metrics = result.metrics or {}
        if "outcome" not in metrics:
            return {"stages": [], "error": "the pipeline's workers reported no outcome"}
        return json.loads(metrics["outcome"])

    def describe(self) -> str:
        import ray

        nodes = self._alive_nodes()
        cpus = sum(n.get("Resources", {}).get("CPU", 0) for n in nodes)
        gpus = sum(n.get("Resources", {}).get("GPU", 0) for n in nodes)
        return f"Ray {ray.__version__}: {len(nodes)} node(s), {cpus:g} CPU, {gpus:g} GPU"

    def close(self) -> None:
        import ray

        try:
            ray.kill(self.board)
        except Exception:  # noqa: BLE001
            pass
        if self.owns_ray:
            ray.shutdown()


def connect_ray(address: str | None) -> None:
    """Start a local Ray (``address`` None) or join a cluster so that workers can import the
    project: locally through PYTHONPATH (workers inherit the raylet's environment); inside a
    submitted Ray Job the job's ``py_modules`` already hold it; otherwise the packages travel
    as ``py_modules``."""
    import ray

    common = dict(include_dashboard=False, log_to_driver=False, configure_logging=True, logging_level="WARNING")
    if address in (None, "", "local"):
        # One machine: no node can be preempted, and the watcher is one more process per stage.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        paths = [str(REPO_ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        ray.init(address="local", **common)
        return
    common.pop("include_dashboard")
    if os.environ.get("RAY_JOB_SUBMISSION_ID") or os.environ.get("MTSHARE_IN_RAY_JOB"):
        ray.init(address=address, **common)
        return
    modules = [str(REPO_ROOT / m) for m in ("mtshare", "cluster")]
    ray.init(address=address, runtime_env={"py_modules": modules}, **common)


_ERROR_LINE = re.compile(r"^\s*((?:[\w.]+\.)?(\w*(?:Error|Failure|Exception|Interrupt)))\s*:\s*(.+)$")


def short_error(exc: BaseException) -> str:
    """One readable line from a (possibly remote) exception: the innermost ``Type: message``."""
    text = str(exc)
    found = None
    for line in text.splitlines():
        m = _ERROR_LINE.match(line)
        if m and "Traceback" not in line and not m.group(2).startswith(("WorkerGroup", "TrainingFailed")):
            found = f"{m.group(2)}: {m.group(3).strip()}"
    if found:
        return found[:2000]
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(exc).__name__)
    return f"{type(exc).__name__}: {first}"[:2000]

