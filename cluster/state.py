"""The suite state file: ``state.json`` in the suite's storage, the source of truth for
``status`` and ``resume``.

One driver writes it (under a lock, atomically, after every transition); anyone may read it.
Each stage records ``status`` (pending / running / done / failed), ``attempts`` (worker-group
starts, counting Ray Train restarts), ``node``, ``started`` / ``ended`` (Unix seconds),
``checksum`` (sha256 of its ``model.safetensors`` in storage), ``mlflow_run_id`` and ``error``
— the schema of ``status --format json`` (DESIGN.md) — plus bookkeeping the driver needs:
``inputs`` (the checksums the stage was trained from, verified by its workers), ``iteration``
/ ``iters`` (progress), ``host``, ``run`` (the Ray Train run of the pipeline that trains it).
"""
from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any

from mtshare.stages import StageSpec

from cluster.storage import Storage

STATE_KEY = "state.json"
STATUSES = ("pending", "running", "done", "failed")
SCHEMA_KEYS = ("name", "task", "step", "status", "attempts", "node", "started", "ended", "checksum",
               "mlflow_run_id", "error")
FORMAT_VERSION = 1


def new_stage_entry(spec: StageSpec) -> dict:
    return {
        "name": spec.name, "task": spec.task, "step": spec.kind, "status": "pending", "attempts": 0,
        "node": None, "started": None, "ended": None, "checksum": None, "mlflow_run_id": None, "error": None,
        "host": None, "inputs": {}, "iteration": 0, "iters": spec.optim.iters, "depends_on": list(spec.depends_on),
    }


def new_state(suite: str, specs: list[StageSpec]) -> dict:
    return {
        "version": FORMAT_VERSION, "suite": suite, "state": "pending", "mlflow_run_id": None,
        "mlflow_experiment_id": None, "created": time.time(), "updated": time.time(), "driver": None,
        "error": None, "stages": [new_stage_entry(s) for s in specs],
    }


def status_view(state: dict) -> dict:
    """The ``status --format json`` object: exactly DESIGN.md's schema."""
    return {
        "suite": state["suite"], "state": state["state"],
        "stages": [{k: s.get(k) for k in SCHEMA_KEYS} for s in state["stages"]],
    }


def driver_identity() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time()}


class StateBook:
    """The driver's handle on ``state.json``: thread-safe updates, each saved atomically."""

    def __init__(self, storage: Storage, state: dict):
        self.storage = storage
        self.state = state
        self._lock = threading.RLock()

    @classmethod
    def load(cls, storage: Storage) -> "StateBook | None":
        if not storage.exists(STATE_KEY):
            return None
        return cls(storage, storage.read_json(STATE_KEY))

    def stage(self, name: str) -> dict:
        for s in self.state["stages"]:
            if s["name"] == name:
                return s
        raise KeyError(name)

    def names(self) -> list[str]:
        return [s["name"] for s in self.state["stages"]]

    def update(self, name: str | None = None, save: bool = True, **fields: Any) -> None:
        """Set fields of one stage (or of the suite when ``name`` is None) and save."""
        with self._lock:
            target = self.stage(name) if name else self.state
            if "status" in fields and fields["status"] not in STATUSES:
                raise ValueError(f"bad status {fields['status']!r}")
            target.update(fields)
            if save:
                self.save()

    def save(self) -> None:
        with self._lock:
            self.state["updated"] = time.time()
            if self.state.get("driver"):
                self.state["driver"]["heartbeat"] = self.state["updated"]
            self.storage.write_json(STATE_KEY, self.state)

    def snapshot(self) -> dict:
        """A deep-enough copy for readers in other threads (the progress display)."""
        with self._lock:
            return {**self.state, "stages": [dict(s) for s in self.state["stages"]]}
