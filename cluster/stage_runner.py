"""The pipeline runner: what every Ray Train worker of a pipeline executes.

A *pipeline* is the unit the driver launches: one stage (the base, a step0 reference) or a
sub-task's remaining sharing steps (step1 → step2 → step3), trained in turn by one Ray Train
run so that the run's start-up is paid once per sub-task. ``pipeline_train_func(config)`` is the
``train_loop_per_worker`` of its ``TorchTrainer``; ``config`` is a *job* (:func:`make_job`),
plain JSON plus an optional progress-board actor handle. For each step not yet completed:

1. fetch its inputs from storage into a node-local cache, verifying each one's sha256 (the
   driver took the base's from the state file; the previous step's comes from the step that
   just produced it) *before* it appears under its cache name;
2. train it with the ``mtshare`` Trainer and DeepSpeed as its stepper. Every resume state (the
   Trainer's weights and counters plus DeepSpeed's own checkpoint, one ZeRO shard per rank) is
   reported to Ray Train as a checkpoint; on a restart ``ray.train.get_checkpoint()`` hands it
   back and the step continues where it stopped;
3. upload its outputs (weights first, ``result.json`` last), tell the driver (which commits the
   step: checksum, state file, MLflow run) and report a checkpoint that records the step as
   completed, so that a restart skips it.

A later launch of the pipeline (``resume`` after the driver died) starts from the checkpoint
named by ``<stage>/resume.json`` when it was made from the same inputs and settings. The same
:func:`run_pipeline_worker` runs in-process (``--executor inprocess``: one rank, plain torch
stepper, the checkpoints copied to storage by hand), which keeps one code path.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from mtshare import metrics
from mtshare.checkpoint import sha256_file
from mtshare.stages import MODEL_FILE, StageSpec
from mtshare.train import BEST_FILE, RESUME_DIR, StageFailure, Trainer

from cluster.storage import Storage, StorageError, open_storage, ray_train_storage

RESUME_META = "resume.json"      # <stage>/resume.json: the latest checkpoint of the stage, for a later launch
FAILURE_MARKER = "failed.json"
LAUNCH_FILE = "launch.json"
RESULT_FILE = "result.json"
PIPELINE_FILE = "pipeline.json"  # in every checkpoint: the step it belongs to and the steps completed
CHECKPOINTS = "_checkpoints"     # <storage>/_checkpoints/<run name>/<checkpoint>: Ray Train's storage_path
CACHE_ENV = "MTSHARE_CACHE_DIR"
SYSTEM_METRICS_EVERY_S = 10.0


def run_name(specs: list[StageSpec], launch_id: str) -> str:
    """Ray Train's run name for one launch of a pipeline. A fresh name per launch: Ray rewrites
    its run snapshot in place, and a driver killed mid-write would leave that name unreadable."""
    return f"{specs[0].suite}.{specs[0].name.replace('/', '.')}.{launch_id[:12]}"


def make_job(specs: list[StageSpec], storage: Storage, *, base_sha256: str | None, prev_sha256: str | None,
             ds_config: dict | None, launch_id: str | None = None, board: Any = None,
             cpus_per_worker: float = 1, resume_from: str | None = None) -> dict:
    """Everything a pipeline's workers need, as a dict (Ray Train's ``train_loop_config``).
    ``prev_sha256`` is the committed input of the first step; ``resume_from`` the storage key
    of a checkpoint of an earlier launch to start from (see :func:`find_resume`)."""
    launch_id = launch_id or uuid.uuid4().hex
    return {
        "specs": [s.model_dump(mode="json") for s in specs], "storage": storage.describe(),
        "base_sha256": base_sha256, "prev_sha256": prev_sha256, "deepspeed": ds_config,
        "launch_id": launch_id, "run": run_name(specs, launch_id), "board": board,
        "cpus_per_worker": cpus_per_worker, "resume_from": resume_from,
    }


def checkpoint_format(ds_config: dict | None, deepspeed: bool) -> str:
    if not deepspeed:
        return "torch"
    return f"deepspeed-zero{(ds_config or {}).get('zero_optimization', {}).get('stage', 0)}"


# --- small helpers -------------------------------------------------------------------------

PHASE_EVERY_S = 2.0  # end-of-stage evaluation progress: one event per phase per this many seconds at most


class _Emitter:
    """Sends progress events to the driver's board (a Ray actor or a local object); rank 0 only.
    Fire-and-forget: a lost event costs a progress line, never the stage."""

    def __init__(self, board: Any, stage: str, rank: int):
        self.board, self.stage, self.enabled = board, stage, board is not None and rank == 0

    def __call__(self, kind: str, **fields) -> None:
        if not self.enabled:
            return
        event = {"type": kind, "stage": self.stage, "time": time.time(), **fields}
        push = getattr(self.board.push, "remote", None)
        (push or self.board.push)(event)


def node_identity() -> tuple[str, str]:
    """(node id, host) of this process: the Ray node id when inside Ray, else the host name."""
    host = socket.gethostname()
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id(), host
    except Exception:  # noqa: BLE001 - identity is informative only
        pass
    return f"local:{host}", host


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / "mtshare-cache")


def fetch_verified(storage: Storage, key: str, sha256: str | None, cache: Path) -> Path:
    """A local copy of ``key`` whose sha256 equals ``sha256``, cached per node by content hash.

    The bytes are verified before the copy gets its final name, and a cached copy is
    re-verified before reuse: nothing downstream ever loads a file whose checksum is wrong.
    A mismatch is a :class:`StageFailure` (retrying cannot fix it; ``resume`` re-runs the
    producer once its own verification fails)."""
    if sha256 is None:
        raise StageFailure(f"{key}: no checksum recorded for this input; refusing to load it unverified")
    path = cache / "inputs" / f"{sha256}.safetensors"
    if path.exists() and sha256_file(path) == sha256:
        return path
    try:
        return storage.get(key, path, expected_sha256=sha256)
    except StorageError as e:
        raise StageFailure(str(e)) from None


def _param_digest(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer, in name order: equal digests = equal weights."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()



class _SystemMetrics:
    """Rank 0's machine while a step trains — CPU and memory use, and the GPU's memory and
    utilisation — sampled every ``SYSTEM_METRICS_EVERY_S`` (and at the start and the end of the
    step) and sent as ``log`` events, so that they land in the step's MLflow run under MLflow's
    own ``system/`` names (the UI shows them as system metrics)."""

    def __init__(self, emit: _Emitter, device):
        import threading

        self.emit, self.device = emit, torch.device(device or "cpu")
        self._stop = threading.Event()
        self._thread: Any = None

    def sample(self) -> dict[str, float]:
        import psutil

        m = {"system/cpu_utilization_percentage": psutil.cpu_percent(interval=None),
             "system/system_memory_usage_percentage": psutil.virtual_memory().percent,
             "system/process_memory_usage_megabytes": psutil.Process().memory_info().rss / 2**20}
        if self.device.type == "cuda":
            i = self.device.index or 0
            m[f"system/gpu_{i}_memory_usage_megabytes"] = torch.cuda.memory_allocated(self.device) / 2**20
            try:
                m[f"system/gpu_{i}_utilization_percentage"] = float(torch.cuda.utilization(self.device))
            except Exception:  # noqa: BLE001 - needs NVML; memory is reported all the same
                pass
        return m

    def _send(self) -> None:
        self.emit("log", step=int(self.step()), metrics=self.sample())

    def start(self, step: Callable[[], int]) -> None:
        import threading

        self.step = step
        self._send()

        def loop() -> None:
            while not self._stop.wait(SYSTEM_METRICS_EVERY_S):
                self._send()

        self._thread = threading.Thread(target=loop, name="system-metrics", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5)
            self._send()


# --- fencing, resume pointers, outputs -------------------------------------------------------

def check_owner(storage: Storage, spec: StageSpec, launch_id: str) -> None:
    """Fencing: the driver records the launch that owns a stage (``launch.json``) before starting
    it. An attempt of an older launch — a worker orphaned by a killed driver — must not write
    over the newer attempt's files, so every upload checks ownership first."""
    key = f"{spec.output_dir_key}/{LAUNCH_FILE}"
    if storage.exists(key) and storage.read_json(key).get("launch_id") != launch_id:
        raise StageFailure(f"{spec.name}: superseded by a newer launch of this stage; this attempt stops")


def claim_stage(storage: Storage, spec: StageSpec, launch_id: str) -> None:
    """The driver, before launching: this launch now owns the stage's files (see check_owner)."""
    storage.write_json(f"{spec.output_dir_key}/{LAUNCH_FILE}", {"launch_id": launch_id, "time": time.time()})


def find_resume(storage: Storage, spec: StageSpec, inputs: dict, fmt: str) -> str | None:
    """The storage key of the stage's latest checkpoint from an earlier launch, when it can be
    resumed by this one: same inputs (no upstream stage re-ran), same training settings
    (:meth:`StageSpec.fingerprint`), same optimiser-state format, checkpoint present."""
    meta_key = f"{spec.output_dir_key}/{RESUME_META}"
    if not storage.exists(meta_key):
        return None
    meta = storage.read_json(meta_key)
    if (meta.get("inputs") != inputs or meta.get("format") != fmt
            or meta.get("fingerprint") != spec.fingerprint(for_resume=True)):
        return None
    if not storage.exists(f"{meta['checkpoint']}/{PIPELINE_FILE}"):
        return None  # e.g. removed with the suite's finished checkpoints
    return meta["checkpoint"]


def fetch_checkpoint(storage: Storage, key: str, local: Path) -> Path:
    """Copy a checkpoint directory from storage (the in-process executor's get_checkpoint)."""
    for item in storage.list(key):
        storage.get(item, local / item[len(key) + 1:])
    return local


def _upload_outputs(storage: Storage, spec: StageSpec, launch_id: str, out_dir: Path) -> None:
    """Weights first, ``result.json`` last; then the resume pointer is obsolete."""
    check_owner(storage, spec, launch_id)
    prefix = spec.output_dir_key
    storage.put(out_dir / MODEL_FILE, f"{prefix}/{MODEL_FILE}")
    if (out_dir / BEST_FILE).exists():
        storage.put(out_dir / BEST_FILE, f"{prefix}/{BEST_FILE}")
    storage.put(out_dir / RESULT_FILE, f"{prefix}/{RESULT_FILE}")
    storage.delete(f"{prefix}/{RESUME_META}")
    storage.delete(f"{prefix}/{FAILURE_MARKER}")


# --- one pipeline on one rank ------------------------------------------------------------------

class _Reporter:
    """Reports checkpoints the Ray Train way: every rank calls ``report`` at the same points,
    each with its own directory (Ray Train merges the ranks' files into one checkpoint)."""

    def __init__(self, report: Callable[[dict, str | None, str | None], None], rank: int):
        self.report, self.rank = report, rank

    def checkpoint(self, metrics: dict, directory: Path, name: str, pipeline: dict) -> None:
        if self.rank == 0:
            (directory / PIPELINE_FILE).write_text(json.dumps(pipeline))
        self.report(metrics, str(directory), name)

    def small(self, metrics: dict, name: str, pipeline: dict) -> None:
        """A checkpoint of one small file from rank 0 (the others report metrics only)."""
        directory = Path(tempfile.mkdtemp(prefix="mtshare-ckpt-"))
        try:
            if self.rank == 0:
                self.checkpoint(metrics, directory, name, pipeline)
            else:
                self.report(metrics, None, None)
        finally:
            shutil.rmtree(directory, ignore_errors=True)


def run_pipeline_worker(job: dict, *, rank: int = 0, world_size: int = 1, device: torch.device | str | None = None,
                        wrap: Callable | None = None, report: Callable[[dict, str | None, str | None], None] | None = None,
                        checkpoint: Path | None = None, work_dir: Path | None = None) -> dict:
    """Train a pipeline's steps on this rank. Returns ``{"stages": [outcome, ...]}`` for the
    steps run by this attempt, an outcome being ``{"stage", "status": "done"|"failed",
    "checksum", "error", "node", "param_digests", "iteration", ...}`` (meaningful on rank 0).

    ``report(metrics, checkpoint_dir, checkpoint_name)`` is called by every rank at the same
    points (Ray Train's rule); ``checkpoint`` is the directory to start from (Ray Train's
    ``get_checkpoint()``); ``wrap`` is the Trainer's stepper factory."""
    specs = [StageSpec(**d) for d in job["specs"]]
    storage = open_storage(job["storage"])
    reporter = _Reporter(report or (lambda metrics, ckpt_dir, name: None), rank)
    fmt = checkpoint_format(job.get("deepspeed"), wrap is not None)
    node, host = node_identity()
    pipeline = {"stage": None, "completed": {}}
    if checkpoint is not None and (checkpoint / PIPELINE_FILE).exists():
        pipeline = json.loads((checkpoint / PIPELINE_FILE).read_text())
    prev_sha = job["prev_sha256"]
    outcomes: list[dict] = []
    for spec in specs:
        if spec.name in pipeline["completed"]:  # committed by an earlier attempt of this launch
            prev_sha = pipeline["completed"][spec.name]
            continue
        resume_dir = checkpoint if pipeline["stage"] == spec.name else None
        outcome = _run_step(spec, job, storage, prev_sha, resume_dir, reporter, pipeline, fmt, node, host,
                            rank=rank, world_size=world_size, device=device, wrap=wrap, work_dir=work_dir)
        outcomes.append(outcome)
        if outcome["status"] != "done":
            break  # later steps need this one's output
        prev_sha = outcome["checksum"]
        pipeline = {"stage": None, "completed": {**pipeline["completed"], spec.name: prev_sha}}
        _Emitter(job.get("board"), spec.name, rank)("done", outcome=outcome)  # the driver commits it
        reporter.small({"completed": spec.name}, f"{spec.name.replace('/', '.')}.done", pipeline)
    # The last report carries the outcomes: Ray Train's ``Result.metrics`` are those of the
    # latest *checkpoint*, so they travel with one (a small ``pipeline.json``).
    final = {"stages": outcomes}
    reporter.small({"outcome": json.dumps(final)}, "outcome", {**pipeline, "outcome": final})
    return final


def _run_step(spec: StageSpec, job: dict, storage: Storage, prev_sha: str | None, resume_dir: Path | None,
              reporter: _Reporter, pipeline: dict, fmt: str, node: str, host: str, *, rank: int, world_size: int,
              device, wrap, work_dir: Path | None) -> dict:
    emit = _Emitter(job.get("board"), spec.name, rank)
    launch_id = job["launch_id"]
    inputs = {"base": job["base_sha256"], "prev": prev_sha}
    outcome = {"stage": spec.name, "node": node, "host": host, "world_size": world_size}

    # A deterministic failure (non-finite loss) of this launch was already seen by an earlier
    # attempt: every rank reads the same marker here, before any collective, and stops cleanly
    # instead of letting Ray Train retry a run that cannot succeed.
    marker = f"{spec.output_dir_key}/{FAILURE_MARKER}"
    if storage.exists(marker) and storage.read_json(marker).get("launch_id") == launch_id:
        return {**outcome, "status": "failed", "error": storage.read_json(marker)["error"]}

    work = Path(work_dir or cache_root() / "work" / launch_id / f"rank{rank}")
    out_dir = work / spec.output_dir_key
    out_dir.mkdir(parents=True, exist_ok=True)
    emit("start", node=node, host=host, world_size=world_size, pid=os.getpid())

    reported: list[int] = []

    def on_checkpoint(directory: Path) -> None:
        it = trainer.iteration
        name = f"{spec.name.replace('/', '.')}.it{it:09d}"
        reporter.checkpoint({"iteration": it}, directory, name, {**pipeline, "stage": spec.name})
        reported.append(it)
        if rank == 0:  # where a later launch finds it (Ray Train's name for it is per launch)
            check_owner(storage, spec, launch_id)
            storage.write_json(f"{spec.output_dir_key}/{RESUME_META}",
                               {"checkpoint": f"{CHECKPOINTS}/{job['run']}/{name}", "iteration": it,
                                "inputs": inputs, "format": fmt, "fingerprint": spec.fingerprint(for_resume=True),
                                "time": time.time()})
        if len(reported) > 1:
            # Ray Train's controller takes a report in once the next one is queued (a queue of
            # one): the previous checkpoint is the one a restart of this launch surely gets.
            emit("checkpoint", iteration=reported[-2])

    last_phase: dict = {}

    def on_progress(phase: str, done: int, total: int) -> None:
        """The end-of-stage evaluations, on the status table: at each new phase, its end, and
        at most every PHASE_EVERY_S seconds between."""
        now = time.time()
        if phase == last_phase.get("phase") and done < total and now - last_phase.get("time", 0) < PHASE_EVERY_S:
            return
        last_phase.update(phase=phase, time=now)
        emit("phase", phase=phase, done=int(done), total=int(total), ranks=world_size)

    def on_log(metrics: dict, step: int) -> None:
        if "resumed_from" in metrics:
            emit("resume", iteration=int(metrics["resumed_from"]), iters=spec.optim.iters)
        emit("log", step=step, metrics={k: float(v) for k, v in metrics.items()})

    sampler = _SystemMetrics(emit, device) if emit.enabled else None
    try:
        base_path, prev_path = _fetch_inputs(storage, spec, job["base_sha256"], prev_sha, emit, node)
        trainer = Trainer(spec, out_dir, base_path=base_path, base_sha256=job["base_sha256"], prev_path=prev_path,
                          device=device, wrap=wrap, on_log=on_log, on_checkpoint=on_checkpoint,
                          resume_dir=resume_dir or out_dir / RESUME_DIR, on_progress=on_progress)
        if sampler is not None:
            sampler.start(lambda: trainer.iteration)
        outcome["stepper"] = {"class": type(trainer.stepper).__name__,
                              "optimizer": type(getattr(trainer.stepper, "optimizer", None)).__name__,
                              "zero_stage": getattr(trainer.stepper, "zero_stage", None)}
        result = trainer.train()
        if rank == 0:
            _upload_outputs(storage, spec, launch_id, out_dir)
    except StageFailure as e:
        outcome.update(status="failed", error=str(e))
        if world_size == 1:  # nothing else to coordinate with: stop without a retry
            return outcome
        storage.write_json(marker, {"launch_id": launch_id, "error": str(e)})
        raise  # Ray Train stops the group; the restarted attempt reads the marker above
    finally:
        if sampler is not None:
            sampler.stop()
        shutil.rmtree(work, ignore_errors=True)  # the stage's files of value are in storage

    digests = [_param_digest(trainer.model)]
    if world_size > 1:  # every rank's weights, so a test (and the MLflow run) can compare them
        digests = [None] * world_size
        dist.all_gather_object(digests, _param_digest(trainer.model))
    outcome.update(status="done", checksum=result["checksum"], error=None, param_digests=digests,
                   iteration=result["iterations"], resumed_from=result.get("resumed_from"))
    return outcome


def _fetch_inputs(storage: Storage, spec: StageSpec, base_sha: str | None, prev_sha: str | None, emit: _Emitter,
                  node: str) -> tuple[Path | None, Path | None]:
    """The frozen base and the previous step's output, verified, from the node-local cache."""
    cache = cache_root()
    base_path = prev_path = None
    if spec.base_key:
        base_path = fetch_verified(storage, spec.base_key, base_sha, cache)
        emit("input", role="base", key=spec.base_key, sha256=base_sha, node=node, verified=True)
    if spec.prev_key:
        prev_path = fetch_verified(storage, spec.prev_key, prev_sha, cache)
        emit("input", role="prev", key=spec.prev_key, sha256=prev_sha, node=node, verified=True)
    return base_path, prev_path


# --- the Ray Train entry point ----------------------------------------------------------------

def pipeline_train_func(config: dict) -> None:
    """``train_loop_per_worker`` of a pipeline's ``TorchTrainer`` (runs on every worker)."""
    import ray.train
    import ray.train.torch

    from cluster.deepspeed_stepper import make_wrap

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    spec = StageSpec(**config["specs"][0])
    device = torch.device("cpu")
    if spec.device == "cuda":
        device = ray.train.torch.get_device()
        torch.cuda.set_device(device)  # before anything allocates: NCCL and DeepSpeed use the current device
    cpus = max(1, int(config.get("cpus_per_worker") or 1))
    torch.set_num_threads(cpus)
    metrics.set_num_processes(cpus)  # ODS-F matching (CPU bound, outside torch) on the same CPUs
    wrap = make_wrap(config["deepspeed"] or {}, spec.optim.batch_size)

    def report(metrics: dict, checkpoint_dir: str | None, name: str | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name if checkpoint else None)

    # This launch's latest checkpoint after a restart; else the earlier launch's that the driver
    # found (Ray Train v2 leaves that to the training function: resume_from_checkpoint is gone).
    start = ray.train.get_checkpoint()
    if start is None and config.get("resume_from"):
        path, fs = ray_train_storage(open_storage(config["storage"]))
        start = ray.train.Checkpoint(path=f"{path}/{config['resume_from'][len(CHECKPOINTS) + 1:]}", filesystem=fs)
    if start is None:
        run_pipeline_worker(config, rank=rank, world_size=world, device=device, wrap=wrap, report=report)
        return
    with start.as_directory() as directory:
        run_pipeline_worker(config, rank=rank, world_size=world, device=device, wrap=wrap, report=report,
                            checkpoint=Path(directory))
