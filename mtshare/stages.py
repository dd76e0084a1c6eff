"""Stage specs and the suite DAG.

A suite expands into stages:

    base (dense, base task) ──► <task>/step1 ──► <task>/step2 ──► <task>/step3   (per sub-task)
    <task>/step0 (dense single-task reference, independent of the base)

Each :class:`StageSpec` is small and self-contained (a plain dict crosses process and Ray
boundaries); it names its inputs and its output by *storage keys* (paths relative to the
suite's storage root), never by the driver's memory.
"""
from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict

from mtshare.config import CalibrationConfig, DatasetConfig, ModelConfig, OptimConfig, StreamConfig, SuiteConfig

StageKind = Literal["base", "step0", "step1", "step2", "step3"]
MODEL_FILE = "model.safetensors"
# Settings that do not change a stage's result (left out of StageSpec.fingerprint). The dataset
# root is where the data lives, not what it is: moving the data must not re-run the suite.
BOOKKEEPING = {"optim": ("log_every", "ckpt_every", "fail_at_iter"), "dataset": ("num_workers", "synthesize", "root")}


class StageSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    suite: str
    name: str                 # "base" or "<task>/<kind>"
    task: str
    kind: StageKind
    dataset: DatasetConfig
    model: ModelConfig
    optim: OptimConfig
    device: Literal["cpu", "cuda"] = "cpu"
    precision: Literal["fp32", "bf16"] = "fp32"
    seed: int = 0
    workers: int = 1                 # data-parallel workers: the global batch is optim.batch_size x workers
    depends_on: list[str] = []
    base_key: str | None = None      # storage key of the frozen base checkpoint (sub-task steps)
    prev_key: str | None = None      # storage key of the previous step's output (step2, step3)
    calibration: CalibrationConfig | None = None  # the task's last sharing step: calibrate its operating point
    stream: StreamConfig | None = None  # base and last sharing steps of a video suite: temporal τ + stream figures

    @property
    def output_dir_key(self) -> str:
        return self.name

    @property
    def output_key(self) -> str:
        return f"{self.name}/{MODEL_FILE}"

    @property
    def is_subtask_step(self) -> bool:
        return self.kind in ("step1", "step2", "step3")

    def fingerprint(self, *, for_resume: bool = False) -> str:
        """sha256 of what determines the stage's result. Bookkeeping (logging and checkpoint
        intervals, data-loader workers, the fault knob, the data's location) is left out:
        changing it on ``resume`` does not make a finished stage stale; changing anything else
        does. ``for_resume``: whether a mid-stage resume state may be continued, which another
        worker count may do (DeepSpeed re-partitions its elastic checkpoint)."""
        d = self.model_dump(mode="json")
        for section, keys in BOOKKEEPING.items():
            for key in keys:
                d[section].pop(key, None)
        if d.get("stream") is None:  # (absent before video streams: finished suites stay current)
            d.pop("stream", None)
        if d.get("calibration") and d["calibration"].get("edge_thresholds") is None:
            d["calibration"].pop("edge_thresholds")  # (absent before it was a setting: the same)
        if for_resume:
            d.pop("workers")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def stage_name(task: str, kind: str) -> str:
    return "base" if kind == "base" else f"{task}/{kind}"


def plan(cfg: SuiteConfig) -> list[StageSpec]:
    """The suite's stages in a valid execution order (dependencies first)."""
    common = dict(suite=cfg.name, dataset=cfg.dataset, model=cfg.model, device=cfg.device,
                  precision=cfg.precision, seed=cfg.seed, workers=cfg.resources.workers)
    base = StageSpec(name="base", task=cfg.base_task, kind="base", optim=cfg.optim_for(cfg.base_task, "base"),
                     stream=cfg.stream, **common)
    stages = [base]
    if cfg.references:
        for t in cfg.tasks:
            stages.append(StageSpec(name=stage_name(t, "step0"), task=t, kind="step0", optim=cfg.optim_for(t, "step0"), **common))
    for t in cfg.tasks:
        prev = None
        for kind in cfg.steps:
            deps = ["base"] + ([prev.name] if prev else [])
            spec = StageSpec(
                name=stage_name(t, kind), task=t, kind=kind, optim=cfg.optim_for(t, kind), depends_on=deps,
                base_key=base.output_key, prev_key=prev.output_key if prev else None,
                calibration=cfg.calibration if kind == cfg.steps[-1] else None,
                stream=cfg.stream if kind == cfg.steps[-1] else None, **common,
            )
            stages.append(spec)
            prev = spec
    return stages


def downstream(stages: list[StageSpec], name: str) -> list[str]:
    """Names of every stage that (transitively) depends on ``name``."""
    out: list[str] = []
    frontier = {name}
    for s in stages:  # plan order is topological
        if frontier & set(s.depends_on):
            out.append(s.name)
            frontier.add(s.name)
    return out
