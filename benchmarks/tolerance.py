"""How a trained suite's executed FLOPs move with the calibration tolerance, without retraining.

    PYTHONPATH=. python benchmarks/tolerance.py --workdir runs/demo [--tolerances 0.01,0.02,0.05]
                                                [--plan flops|time] [--margin 0.5]

For each tolerance and each sub-task: the stage's own calibration (``operating_point``: the
bisection on the ``dataset.holdout`` images at ``margin × tolerance``, then the whole val split
at τ and at τ = 0), on an engine with that sub-task alone, as its last sharing step would run
it. Prints per tolerance the suite's executed FLOPs / dense and per task FLOPs / dense and the
relative change of its metric from exact on val. Nothing is written to the suite.
"""
from __future__ import annotations

import argparse

import torch
from torch.utils.data import DataLoader, Subset

from mtshare import operating_point as op
from mtshare.data import build_dataset
from mtshare.engine import SparsePolicy
from mtshare.infer import load_suite_engine
from mtshare.report import load_results


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", required=True)
    p.add_argument("--tolerances", default="0.01,0.02,0.03,0.05")
    p.add_argument("--plan", choices=["time", "flops"], default="time")
    p.add_argument("--margin", type=float, default=0.5)
    p.add_argument("--edge-thresholds", type=int, default=25)
    a = p.parse_args()
    torch.set_num_threads(1)
    store = f"{a.workdir}/store"
    results = load_results(store)
    dense = {r["task"]: r["dense_flops"] for r in results.values()}
    base = results["base"]["task"]
    subs = sorted(t for t in dense if t != base)
    # Per sub-task, once: an engine with that sub-task alone (as its stage calibrates it), its
    # holdout images and its val loader. Each calibration starts from τ = 0, so they are reused.
    setups = {}
    for task in subs:
        engine, manifest = load_suite_engine(store, policy=SparsePolicy.for_plan(a.plan))
        for other in subs:
            if other != task:
                del engine.subtasks[other]
        d = manifest["spec"]["dataset"]
        train = build_dataset(d["name"], d["root"], "train", [task], train=False, img_size=d["img_size"])
        holdout = Subset(train, list(range(len(train) - d["holdout"], len(train))))
        val = build_dataset(d["name"], d["root"], "val", [task], train=False, img_size=d["img_size"])
        setups[task] = (engine, op.stack(DataLoader(holdout, batch_size=16), task), DataLoader(val, batch_size=16),
                        d["name"])
    for tol in (float(t) for t in a.tolerances.split(",")):
        total, cells = dense[base], []
        for task, (engine, calib, val, dataset) in setups.items():
            point = op.operating_point(engine, task, calib, val, dataset, tol, a.margin,
                                       meter_options=op.meter_options(task, a.edge_thresholds))
            total += point["flops"]
            change = (point["value"] - point["value_exact"]) / abs(point["value_exact"])
            cells.append(f"{task} {point['flops'] / dense[task]:.3f} ({100 * change:+.2f} %)")
        print(f"tolerance {tol:g}: suite {total / sum(dense.values()):.3f} | " + " | ".join(cells), flush=True)

if __name__ == "__main__":
    main()
