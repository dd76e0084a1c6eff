"""The stage runner: what every Ray Train worker of a stage executes.

``stage_train_func(config)`` is the ``train_loop_per_worker`` of a ``TorchTrainer``. Its
``config`` is a *stage job* (:func:`make_job`), plain JSON plus an optional progress-board
actor handle, so nothing but the job crosses the driver → worker boundary:

1. rebuild the :class:`StageSpec` from its dict and reopen the suite's storage;
2. fetch inputs from storage into a node-local cache, verifying each one's sha256 (the driver
   took it from the state file) *before* it appears under its cache name;
3. fetch the stage's mid-stage resume state (``resume.pt`` + ``resume.json``) if storage holds
   one made from the same inputs, so a restarted stage continues where it stopped;
4. run the ``mtshare`` Trainer with DeepSpeed as its stepper; every resume checkpoint it
   writes is uploaded to storage (rank 0) and reported to Ray Train (all ranks);
5. upload the outputs (weights first, ``result.json`` last) and report the outcome.

The same :func:`run_stage_worker` also runs in-process (``--executor inprocess``: one rank,
plain torch stepper), which keeps one code path for inputs, resume and outputs.
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

from mtshare.checkpoint import sha256_file
from mtshare.stages import MODEL_FILE, StageSpec
from mtshare.train import BEST_FILE, RESUME_FILE, StageFailure, Trainer

from cluster.storage import Storage, StorageError, open_storage

RESUME_META = "resume.json"
FAILURE_MARKER = "failed.json"
LAUNCH_FILE = "launch.json"
RESULT_FILE = "result.json"
CACHE_ENV = "MTSHARE_CACHE_DIR"


def make_job(spec: StageSpec, storage: Storage, *, base_sha256: str | None, prev_sha256: str | None,
             ds_config: dict | None, launch_id: str | None = None, board: Any = None,
             cpus_per_worker: float = 1) -> dict:
    """Everything a stage's workers need, as a dict (Ray Train's ``train_loop_config``)."""
    return {
        "spec": spec.model_dump(mode="json"), "storage": storage.describe(),
        "base_sha256": base_sha256, "prev_sha256": prev_sha256, "deepspeed": ds_config,
        "launch_id": launch_id or uuid.uuid4().hex, "board": board, "cpus_per_worker": cpus_per_worker,
    }


# --- small helpers -------------------------------------------------------------------------

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


def _inputs_of(job: dict) -> dict:
    return {"base": job["base_sha256"], "prev": job["prev_sha256"]}


def _param_digest(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer, in name order: equal digests = equal weights."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# --- the Trainer with storage-backed resume -------------------------------------------------

class ClusterTrainer(Trainer):
    """``Trainer`` whose mid-stage resume checkpoints also go to shared storage (and to Ray)."""

    def __init__(self, *args, on_resume_saved: Callable[["ClusterTrainer"], None] | None = None, **kwargs):
        self._on_resume_saved = on_resume_saved
        super().__init__(*args, **kwargs)

    def save_resume(self) -> None:
        super().save_resume()  # rank 0 writes out_dir/resume.pt; all ranks pass a barrier
        if self._on_resume_saved is not None:
            self._on_resume_saved(self)


def _resume_blob_key(spec: StageSpec, iteration: int) -> str:
    return f"{spec.output_dir_key}/resume-{iteration:09d}.pt"


def _is_resume_blob(key: str) -> bool:
    name = key.rsplit("/", 1)[-1]
    return name.startswith("resume-") and name.endswith(".pt")


def check_owner(storage: Storage, spec: StageSpec, job: dict) -> None:
    """Fencing: the driver records the launch that owns a stage (``launch.json``) before starting
    it. An attempt of an older launch — a worker orphaned by a killed driver — must not write
    over the newer attempt's files, so every upload checks ownership first."""
    key = f"{spec.output_dir_key}/{LAUNCH_FILE}"
    if storage.exists(key) and storage.read_json(key).get("launch_id") != job["launch_id"]:
        raise StageFailure(f"{spec.name}: superseded by a newer launch of this stage; this attempt stops")


def _upload_resume(storage: Storage, spec: StageSpec, job: dict, out_dir: Path, fmt: str, iteration: int) -> None:
    """A new ``resume-<iteration>.pt`` first, then ``resume.json`` pointing at it (with its
    sha256 and the inputs it was trained from), then the older blobs go. A crash at any point
    leaves ``resume.json`` naming an intact blob: the pointer swap is the commit."""
    check_owner(storage, spec, job)
    local = out_dir / RESUME_FILE
    key = _resume_blob_key(spec, iteration)
    storage.put(local, key)
    storage.write_json(f"{spec.output_dir_key}/{RESUME_META}",
                       {"key": key, "iteration": iteration, "sha256": sha256_file(local), "inputs": _inputs_of(job),
                        "format": fmt, "fingerprint": spec.fingerprint(), "time": time.time()})
    for old in storage.list(spec.output_dir_key):
        if _is_resume_blob(old) and old != key:
            storage.delete(old)


def fetch_resume(storage: Storage, spec: StageSpec, job: dict, out_dir: Path, fmt: str) -> int | None:
    """Place the stage's stored resume state in ``out_dir`` when it is valid for this run: same
    inputs, same training settings (:meth:`StageSpec.fingerprint`), same optimiser-state format,
    intact bytes. Returns its iteration, or None."""
    meta_key = f"{spec.output_dir_key}/{RESUME_META}"
    (out_dir / RESUME_FILE).unlink(missing_ok=True)
    if not storage.exists(meta_key):
        return None
    meta = storage.read_json(meta_key)
    if meta.get("inputs") != _inputs_of(job) or meta.get("format") != fmt:
        return None  # made from other inputs (an upstream stage was re-run) or another stepper
    fingerprint = spec.fingerprint()
    if meta.get("fingerprint", fingerprint) != fingerprint:
        return None  # the stage's settings were changed (`resume --set ...`): start it afresh
    try:
        storage.get(meta["key"], out_dir / RESUME_FILE, expected_sha256=meta["sha256"])
    except Exception:  # noqa: BLE001 - a missing or damaged blob only costs the progress it held
        return None
    return int(meta["iteration"])


def _upload_outputs(storage: Storage, spec: StageSpec, job: dict, out_dir: Path) -> None:
    """Weights first, ``result.json`` last; then the resume state is obsolete (pointer first)."""
    check_owner(storage, spec, job)
    prefix = spec.output_dir_key
    storage.put(out_dir / MODEL_FILE, f"{prefix}/{MODEL_FILE}")
    if (out_dir / BEST_FILE).exists():
        storage.put(out_dir / BEST_FILE, f"{prefix}/{BEST_FILE}")
    storage.put(out_dir / RESULT_FILE, f"{prefix}/{RESULT_FILE}")
    storage.delete(f"{prefix}/{RESUME_META}")
    storage.delete(f"{prefix}/{FAILURE_MARKER}")
    for key in storage.list(prefix):
        if _is_resume_blob(key):
            storage.delete(key)


def claim_stage(storage: Storage, spec: StageSpec, launch_id: str) -> None:
    """The driver, before launching: this launch now owns the stage's files (see check_owner)."""
    storage.write_json(f"{spec.output_dir_key}/{LAUNCH_FILE}", {"launch_id": launch_id, "time": time.time()})


# --- one stage on one rank ------------------------------------------------------------------

def run_stage_worker(job: dict, *, rank: int = 0, world_size: int = 1, device: torch.device | str | None = None,
                     wrap: Callable | None = None, report: Callable[[dict, str | None], None] | None = None,
                     work_dir: Path | None = None) -> dict:
    """Train one stage on this rank. Returns the outcome (meaningful on rank 0):
    ``{"status": "done"|"failed", "checksum", "error", "node", "param_digests", "iteration"}``.

    ``report(metrics, checkpoint_dir)`` is called by every rank at the same points (Ray Train's
    rule); ``wrap`` is the Trainer's stepper factory (DeepSpeed under Ray, plain torch in-process).
    """
    spec = StageSpec(**job["spec"])
    storage = open_storage(job["storage"])
    node, host = node_identity()
    emit = _Emitter(job.get("board"), spec.name, rank)
    report = report or (lambda metrics, ckpt_dir: None)
    fmt = f"deepspeed-zero{(job.get('deepspeed') or {}).get('zero_optimization', {}).get('stage', 0)}" if wrap else "torch"
    outcome = {"stage": spec.name, "node": node, "host": host, "world_size": world_size}

    # A deterministic failure (non-finite loss) of this launch was already seen by an earlier
    # attempt: every rank reads the same marker here, before any collective, and stops cleanly
    # instead of letting Ray Train retry a run that cannot succeed.
    marker = f"{spec.output_dir_key}/{FAILURE_MARKER}"
    if storage.exists(marker) and storage.read_json(marker).get("launch_id") == job["launch_id"]:
        outcome.update(status="failed", error=storage.read_json(marker)["error"])
        return _finish(report, rank, outcome)

    work = Path(work_dir or cache_root() / "work" / job["launch_id"] / f"rank{rank}")
    out_dir = work / spec.output_dir_key
    out_dir.mkdir(parents=True, exist_ok=True)
    emit("start", node=node, host=host, world_size=world_size, pid=os.getpid())

    def on_resume_saved(trainer: ClusterTrainer) -> None:
        if rank == 0:
            _upload_resume(storage, spec, job, out_dir, fmt, trainer.iteration)
        # Ray Train gets a small pointer to the stored resume state (its run history lists the
        # checkpoints); the state itself lives once, in the suite's storage.
        pointer = {"storage": storage.uri, "key": _resume_blob_key(spec, trainer.iteration), "iteration": trainer.iteration}
        _report(report, rank, {"iteration": trainer.iteration}, "resume_pointer.json", pointer)
        emit("checkpoint", iteration=trainer.iteration)

    def on_log(metrics: dict, step: int) -> None:
        emit("log", step=step, metrics={k: float(v) for k, v in metrics.items()})

    try:
        base_path, prev_path = _fetch_inputs(storage, spec, job, emit, node)
        resumed = fetch_resume(storage, spec, job, out_dir, fmt)
        trainer = ClusterTrainer(
            spec, out_dir, base_path=base_path, base_sha256=job["base_sha256"], prev_path=prev_path,
            device=device, wrap=wrap, on_log=on_log, on_resume_saved=on_resume_saved,
        )
        emit("resume", iteration=resumed or 0, iters=spec.optim.iters)
        outcome["stepper"] = {"class": type(trainer.stepper).__name__,
                              "optimizer": type(getattr(trainer.stepper, "optimizer", None)).__name__,
                              "zero_stage": getattr(trainer.stepper, "zero_stage", None)}
        result = trainer.train()
        if rank == 0:
            _upload_outputs(storage, spec, job, out_dir)
    except StageFailure as e:
        outcome.update(status="failed", error=str(e))
        if world_size == 1:  # nothing else to coordinate with: stop without a retry
            return _finish(report, rank, outcome)
        storage.write_json(marker, {"launch_id": job["launch_id"], "error": str(e)})
        raise  # Ray Train stops the group; the restarted attempt reads the marker above
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the stage's files of value are in storage

    digests = [_param_digest(trainer.model)]
    if world_size > 1:  # every rank's weights, so a test (and the MLflow run) can compare them
        digests = [None] * world_size
        dist.all_gather_object(digests, _param_digest(trainer.model))
    outcome.update(status="done", checksum=result["checksum"], error=None, param_digests=digests,
                   iteration=result["iterations"], resumed_from=result.get("resumed_from"))
    return _finish(report, rank, outcome)


def _fetch_inputs(storage: Storage, spec: StageSpec, job: dict, emit: _Emitter, node: str) -> tuple[Path | None, Path | None]:
    """The frozen base and the previous step's output, verified, from the node-local cache."""
    cache = cache_root()
    base_path = prev_path = None
    if spec.base_key:
        base_path = fetch_verified(storage, spec.base_key, job["base_sha256"], cache)
        emit("input", role="base", key=spec.base_key, sha256=job["base_sha256"], node=node, verified=True)
    if spec.prev_key:
        prev_path = fetch_verified(storage, spec.prev_key, job["prev_sha256"], cache)
        emit("input", role="prev", key=spec.prev_key, sha256=job["prev_sha256"], node=node, verified=True)
    return base_path, prev_path


def _report(report: Callable, rank: int, metrics: dict, name: str, payload: dict) -> None:
    """Every rank reports; rank 0 attaches a one-file checkpoint holding ``payload``."""
    ckpt_dir = None
    if rank == 0:
        ckpt_dir = Path(tempfile.mkdtemp(prefix="mtshare-ckpt-"))
        (ckpt_dir / name).write_text(json.dumps(payload))
    try:
        report(metrics, str(ckpt_dir) if ckpt_dir else None)
    finally:
        if ckpt_dir:
            shutil.rmtree(ckpt_dir, ignore_errors=True)


def _finish(report: Callable, rank: int, outcome: dict) -> dict:
    """The last report of a stage. Ray Train's ``Result.metrics`` are those of the latest
    *checkpoint*, so the outcome travels with one (a small ``outcome.json``)."""
    _report(report, rank, {"outcome": json.dumps(outcome)}, "outcome.json", outcome)
    return outcome


# --- the Ray Train entry point ----------------------------------------------------------------

def stage_train_func(config: dict) -> None:
    """``train_loop_per_worker`` of a stage's ``TorchTrainer`` (runs on every worker)."""
    import ray.train
    import ray.train.torch

    from cluster.deepspeed_stepper import make_wrap

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    spec = StageSpec(**config["spec"])
    torch.set_num_threads(max(1, int(config.get("cpus_per_worker") or 1)))
    device = ray.train.torch.get_device() if spec.device == "cuda" else torch.device("cpu")
    wrap = make_wrap(config["deepspeed"] or {}, spec.optim.batch_size)

    def report(metrics: dict, checkpoint_dir: str | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    run_stage_worker(config, rank=rank, world_size=world, device=device, wrap=wrap, report=report)
