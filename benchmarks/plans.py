"""What each engine plan costs on a trained suite, on this machine, side by side in one process.

    PYTHONPATH=. python benchmarks/plans.py --workdir runs/demo [--batch 16] [--repeats 40]

On the suite's own val images (``mtshare.bench.workdir_suite``), one thread, interleaved, medians:
  independent   the N dense models, one after the other (the bench's reference)
  stored        the engine at the τ stored in the checkpoints (the plan the suite was calibrated with)
  time plan     the stored τ, minus those of layers whose kept rows on this batch exceed the gather
                crossover for their shape (``SparsePolicy.gather_limit``): those layers run merged.
                On a suite calibrated with ``calibration.plan: flops`` this approximates the time
                plan (a time-plan calibration may settle on another row density).
  all merged    no τ: every layer one GEMM with its merged weight (no activation sharing)
Per plan: time / independent, executed FLOPs / independent, and their quotient.
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch

from mtshare import flops
from mtshare.bench import _timed, workdir_suite


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", required=True)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=40)
    a = p.parse_args()
    torch.set_num_threads(1)
    engine, x = workdir_suite(a.workdir, a.batch)
    tasks = engine.tasks
    subs = [t for t in tasks if t != engine.base_task]
    dense = {t: engine.dense_model(t) for t in tasks}
    dense_total = sum(flops.dense_flops(dense[t], x.shape[-1]) for t in tasks)

    stored = {t: dict(engine.thresholds[t]) for t in subs}
    engine.collect_stats = True
    with torch.inference_mode():
        engine(x)
    kept = {t: engine.last_stats[t].row_density for t in subs}

    def pays(name: str, t: str) -> bool:
        d_out, d_in = engine.base[f"{name}.weight"].shape
        return kept[t][name] <= engine.policy.gather_limit(d_in, d_out)

    plans = {"stored": stored,
             "time plan": {t: {n: v for n, v in stored[t].items() if pays(n, t)} for t in subs},
             "all merged": {t: {} for t in subs}}
    executed = {}
    for name, tau in plans.items():
        engine.thresholds.update({t: dict(v) for t, v in tau.items()})
        with torch.inference_mode():
            engine(x)
        executed[name] = sum(s.executed_flops for s in engine.last_stats.values()) / dense_total
    engine.collect_stats = False

    def run(name):
        if name == "independent":
            for t in tasks:
                dense[t](x)
        else:
            engine.thresholds.update({t: dict(v) for t, v in plans[name].items()})
            engine(x)

    names = ["independent", *plans]
    times = {n: [] for n in names}
    with torch.inference_mode():
        for n in names:
            run(n)  # warm-up
        for i in range(a.repeats):
            for n in (names if i % 2 == 0 else names[::-1]):
                times[n].append(_timed(lambda: run(n)))
    ind = statistics.median(times["independent"])
    out = {"workdir": a.workdir, "batch": a.batch, "repeats": a.repeats, "independent_ms": ind, "plans": {}}
    for n in plans:
        t = statistics.median(times[n]) / ind
        out["plans"][n] = {"time_ratio": t, "flops_ratio": executed[n], "time_over_flops": t / executed[n],
                           "layers_with_tau": sum(len(v) for v in plans[n].values())}
        print(f"{n:11s} time {t:.3f}  executed FLOPs {executed[n]:.3f}  time/FLOPs {t / executed[n]:.2f}  "
              f"layers with τ {out['plans'][n]['layers_with_tau']}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
