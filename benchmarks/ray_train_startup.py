"""Where a Ray Train run's start-up goes, on this machine (local Ray, CPU, one worker).

    PYTHONPATH=. python benchmarks/ray_train_startup.py [--repeats 3]

Times, per run, side by side in one process:
  fit → train func   TorchTrainer.fit() called → the training function starts on the worker
                     (controller actor, placement group, worker actor with its imports,
                     torch.distributed/gloo set-up)
  imports            mtshare + DeepSpeed imports in the worker
  deepspeed init     deepspeed.initialize of the demo's step1 model (ZeRO-2, gloo)
  train func → fit   the training function returns → fit() returns (report, shutdown)
and, from a finished suite's state file (``--workdir``), each pipeline's measured start-up:
launch → its workers' first event.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path


def _train_func(config: dict) -> None:
    import ray.train

    t_func = time.time()
    import torch

    from cluster.deepspeed_stepper import make_wrap
    from mtshare.models import build_model
    from mtshare.models.delta import add_deltas

    import deepspeed  # noqa: F401 - the import cost is part of what a stage pays

    t_imports = time.time()
    model = build_model("vit_debug", 8, "sal", 1)
    add_deltas(model.encoder)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    make_wrap({"zero_optimization": {"stage": 2}}, 16)(model, opt, 1.0)
    t_ds = time.time()
    # Result.metrics are those of the latest checkpoint: report one (a file), as the stages do.
    with tempfile.TemporaryDirectory() as d:
        Path(d, "t.json").write_text("{}")
        ray.train.report({"t_func": t_func, "t_imports": t_imports, "t_ds": t_ds, "t_end": time.time()},
                         checkpoint=ray.train.Checkpoint.from_directory(d))


def measure(repeats: int) -> list[dict]:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from cluster.executors import connect_ray

    connect_ray(None)
    out = []
    with tempfile.TemporaryDirectory() as storage:
        for i in range(repeats):
            trainer = TorchTrainer(_train_func, scaling_config=ScalingConfig(num_workers=1),
                                   run_config=RunConfig(name=f"startup{i}", storage_path=storage),
                                   torch_config=TorchConfig(backend="gloo"))
            t0 = time.time()
            m = trainer.fit().metrics
            t1 = time.time()
            out.append({"fit_to_func_s": m["t_func"] - t0, "imports_s": m["t_imports"] - m["t_func"],
                        "deepspeed_init_s": m["t_ds"] - m["t_imports"], "func_end_to_fit_s": t1 - m["t_end"],
                        "total_s": t1 - t0})
    ray.shutdown()
    return out


def suite_startups(workdir: Path) -> dict:
    """Per Ray Train run of a finished suite: launch → the workers' first event (s)."""
    state = json.loads((workdir / "store" / "state.json").read_text())
    runs: dict[str, float] = {}
    for st in state["stages"]:  # the first stage of a run is launched with it
        if st.get("run") and st["run"] not in runs and st.get("worker_started"):
            runs[st["run"]] = st["worker_started"] - st["started"]
    return runs


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", type=Path)
    args = p.parse_args()
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    rows = measure(args.repeats)
    keys = list(rows[0])
    print("Ray Train start-up, local Ray, 1 CPU worker (median of %d):" % len(rows))
    for k in keys:
        print(f"  {k:20s} {statistics.median(r[k] for r in rows):6.1f} s")
    if args.workdir:
        runs = suite_startups(args.workdir)
        vals = sorted(runs.values())
        print(f"{args.workdir}: {len(runs)} Ray Train runs; launch → workers up: median {statistics.median(vals):.1f} s, "
              f"total {sum(vals):.0f} s")


if __name__ == "__main__":
    main()
