"""MLflow tracking: one parent run per suite, one nested run per stage.

Only the driver talks to MLflow. Workers send their per-step metrics (rank 0, via the
Trainer's ``on_log``) to the driver's progress board; the driver logs them. This keeps the
embedded default (``sqlite:///<workdir>/mlflow.db``, artifacts under ``<workdir>/mlartifacts``)
correct on any cluster — the workers never need to reach the database file — and gives
sqlite a single writer.

Run ids are stable across resume: the state file keeps them and a re-run stage logs into its
existing run (status back to RUNNING), so MLflow shows one run per stage, not one per attempt.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from mtshare.stages import StageSpec

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"
MAX_PARAM_LEN = 500  # MLflow accepts more, but long values make the UI unreadable


def default_tracking_uri(workdir: Path) -> str:
    return f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}"


# Filesystems where sqlite's file locks cannot be trusted (several hosts, one file).
NETWORK_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "ceph", "glusterfs", "beegfs", "9p",
              "fuse.sshfs", "fuse.s3fs", "fuse.gcsfuse", "fuse.juicefs", "fuse.glusterfs", "fuse.ceph")


def network_fs(path: Path, mounts: str | None = None) -> str | None:
    """The network filesystem type ``path`` lives on (from ``/proc/mounts``: the longest mount
    point that contains it), or None for a local one (or where mounts cannot be read)."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return None
    target = Path(path).resolve()  # symlinks followed as far as they exist
    best, best_type = "", None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        if (str(target) == point or str(target).startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, best_type = point, fields[2]
    return best_type if best_type in NETWORK_FS else None


def flatten(d: Any, prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` → ``{"a.b": "1"}`` (MLflow params are flat strings)."""
    out: dict[str, str] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = (json.dumps(d) if isinstance(d, (list, dict)) else str(d))[:MAX_PARAM_LEN]
    return out


class Tracker:
    """Thin layer over ``MlflowClient`` (no global fluent state: safe from the driver's threads)."""

    def __init__(self, tracking_uri: str, experiment: str, artifact_root: Path | None = None):
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri
        self.client = MlflowClient(tracking_uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            location = artifact_root.resolve().as_uri() if artifact_root else None
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
        else:
            self.experiment_id = exp.experiment_id

    # --- runs ------------------------------------------------------------------------------
    def _reopen(self, run_id: str | None) -> str | None:
        """The run id if that run still exists (a deleted mlflow.db means a new run)."""
        if not run_id:
            return None
        try:
            self.client.get_run(run_id)
        except Exception:  # noqa: BLE001 - MlflowException: not found
            return None
        self.client.update_run(run_id, status="RUNNING")
        return run_id

    def start_suite(self, name: str, config: dict, config_text: str, tags: dict, run_id: str | None = None) -> str:
        """The suite's parent run (reused when ``run_id`` still exists): config as params and artifact."""
        reused = self._reopen(run_id)
        if reused:
            return reused
        run = self.client.create_run(self.experiment_id, run_name=name, tags={"mtshare.kind": "suite", **tags})
        rid = run.info.run_id
        self._log_params(rid, flatten(config))
        self.client.log_text(rid, config_text, "suite.yaml")
        return rid

    def start_stage(self, parent_id: str, spec: StageSpec, extra_params: dict, run_id: str | None = None) -> str:
        """A stage's nested run (reused when ``run_id`` still exists)."""
        reused = self._reopen(run_id)
        if reused:
            return reused
        tags = {PARENT_TAG: parent_id, "mtshare.stage": spec.name, "mtshare.task": spec.task, "mtshare.kind": spec.kind}
        run = self.client.create_run(self.experiment_id, run_name=spec.name, tags=tags)
        params = {"task": spec.task, "kind": spec.kind, "model.flavor": spec.model.flavor,
                  "model.patch_size": spec.model.patch_size, "dataset": spec.dataset.name,
                  "img_size": spec.dataset.img_size, "depends_on": ",".join(spec.depends_on) or "-",
                  **{f"optim.{k}": v for k, v in spec.optim.model_dump().items()}, **extra_params}
        self._log_params(run.info.run_id, {k: str(v)[:MAX_PARAM_LEN] for k, v in params.items()})
        return run.info.run_id

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int, timestamp: float | None = None) -> None:
        from mlflow.entities import Metric

        ts = int((timestamp or time.time()) * 1000)
        batch = [Metric(k, float(v), ts, int(step)) for k, v in metrics.items() if _is_number(v)]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(run_id, metrics=batch[i:i + 1000])

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def finish_stage(self, run_id: str, result: dict | None, checksum: str | None, checkpoint: str | None,
                     error: str | None) -> None:
        """Final figures (eval metric, FLOPs, parameters, sparsities), checkpoint path + checksum."""
        if result:
            figures = {k: v for k, v in result.items() if _is_number(v) and k not in ("iterations",)}
            figures[f"final_{result.get('metric_name', 'metric')}"] = result.get("metric")
            point = result.get("operating_point") or {}  # the served figures (engine at τ, whole val split)
            figures.update({f"op_{k}": v for k, v in point.items() if _is_number(v)})
            self.log_metrics(run_id, figures, step=int(result.get("iterations") or 0))
        tags = {"mtshare.checksum": checksum or "-", "mtshare.checkpoint": checkpoint or "-"}
        if error:
            tags["mtshare.error"] = error[:5000]
        self.set_tags(run_id, tags)
        self.client.set_terminated(run_id, status="FAILED" if error else "FINISHED")

    def finish_suite(self, run_id: str, state: str, summary: dict[str, float] | None = None) -> None:
        if summary:
            self.log_metrics(run_id, summary, step=0)
        self.client.set_terminated(run_id, status="FINISHED" if state == "done" else "FAILED")

    def _log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k[:250], v) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i:i + 100])


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # NaN is not logged
