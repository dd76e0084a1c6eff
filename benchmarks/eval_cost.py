"""What evaluation costs per image at real scale: the meters, one shared-engine pass, one dense forward.

    .venv/bin/python benchmarks/eval_cost.py --img 512 --model vit_base --threads 1 --repeats 3 \\
        --out /tmp/eval_cost.json
    # re-measure the ODS-F pool only, the rest from an earlier JSON; or cost the suite only:
    .venv/bin/python benchmarks/eval_cost.py --measured /tmp/eval_cost.json --measure-pool --out /tmp/eval_cost.json
    .venv/bin/python benchmarks/eval_cost.py --measured /tmp/eval_cost.json

On this CPU, ``--threads`` torch threads (1: one rank's meter work runs on one core), per image:

* ``update()`` of every meter of ``mtshare/metrics.py``, got as the code gets them
  (``mtshare.tasks.get_task(task).new_meter(dataset, **options)``), on synthetic outputs at
  ``--img``²: semseg MIoU (21 classes), human_parts MIoU (7), sal MaxF, normals mean angle,
  depth RMSE (NYUD's meter: PASCAL-Context has no depth), edge ODS-F at 25 and at 99 thresholds
  (max_dist 0.0075, PASCAL-Context). Median over images (and over ``--repeats`` for the cheap
  meters; ODS-F is deterministic and slow, so each image is timed once, on ``--ods-images``).
* one :class:`~mtshare.engine.SharedEngine` pass of ``--model`` at ``--img``² (random weights
  and 90 %-sparse random deltas, as ``mtshare.bench.synthetic_engine`` builds them), every
  sub-task at τ = 0 (its merged weights): ``engine(x, tasks=[t])`` (the base encoder + the
  sub-task's encoder and head: what a val pass of ``operating_point.evaluate_task`` runs) and
  ``engine(x)`` of a base + one sub-task engine (the base head too: what a calibration pass of
  ``engine.calibrate`` runs);
* one dense single-task forward (``mtshare.models.build_model``), batch 1: what in-training
  evaluation runs;
* ODS-F at 99 thresholds in a pool (``mtshare.metrics.set_num_processes(--pool-processes)``)
  beside one process, as the Trainer feeds it: one ``update()`` of a batch of ``--batch`` maps
  (each image's thresholds cut into ceil(4·processes/batch) chunks), interleaved 1, n, n, 1
  with the load average read around each; speedup and efficiency (speedup / n) from the fastest
  run of each (another job on the CPU only adds time). Then the
  chunk pieces of an 8-process batch timed one by one and scheduled on 8 processes on paper:
  the bound the chunking alone puts on the efficiency there. The suite is costed with ODS-F on
  ``resources.cpus_per_worker`` processes per rank = 1-process time / (processes × the
  efficiency measured at n, capped at 1): an extrapolation beyond n.

Plus, on paper: FLOPs per image (``mtshare.flops.dense_flops``) and training FLOPs per
iteration per rank (3 × forward FLOPs × batch size; step3 adds the frozen base encoder's forward
that it runs under no_grad on the same batch), and the checkpoint / resume-state sizes.

The synthetic edge map (see :func:`edge_pair`): GT = the boundaries of a warped Voronoi partition
(30 regions, 1-pixel lines, ~2 % of the pixels); prediction = sigmoid⁻¹ of a smooth probability
map: the GT edges blurred (Gaussian σ 2.5 px, peak 0.95), plus the blurred boundaries of a second,
unrelated partition (15 regions, peak 0.5: false edges), plus a smooth background (σ 8 px, 0-0.08)
and smooth noise (σ 2 px, std 0.03). ODS-F's cost grows with the predicted pixels after
thinning, which this map puts at ~25k at the lowest threshold and ~3k at 0.5.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: runs without PYTHONPATH

import numpy as np
import torch
from scipy import ndimage as ndi

from mtshare import flops
from mtshare import checkpoint as ckpt
from mtshare.bench import PASCAL_CHANNELS, synthetic_deltas, synthetic_engine
from mtshare.bench import _timed as bench_timed
from mtshare.models import build_model
from mtshare.models.delta import add_deltas
from mtshare.tasks import get_task

SUBTASKS = ("human_parts", "sal", "normals", "edge")


# --- synthetic targets and outputs ----------------------------------------------------------------

def _regions(size: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """A label map of ``n`` regions: a Voronoi partition warped by a smooth random field."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    wy = ndi.gaussian_filter(rng.standard_normal((size, size)), size / 25) * 300 * size / 512
    wx = ndi.gaussian_filter(rng.standard_normal((size, size)), size / 25) * 300 * size / 512
    pts = rng.uniform(0, size, (n, 2)).astype(np.float32)
    d = (ys[..., None] + wy[..., None] - pts[:, 0]) ** 2 + (xs[..., None] + wx[..., None] - pts[:, 1]) ** 2
    return d.argmin(-1)


def _boundary(lab: np.ndarray) -> np.ndarray:
    b = np.zeros(lab.shape, bool)
    b[:-1] |= lab[:-1] != lab[1:]
    b[:, :-1] |= lab[:, :-1] != lab[:, 1:]
    return b


def edge_pair(size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(logits [1,1,S,S], target [1,S,S] int64 in {0,1}, pixel statistics); see the module doc."""
    rng = np.random.default_rng(seed)
    gt = _boundary(_regions(size, 30, rng))
    false_edges = _boundary(_regions(size, 15, rng))
    p = ndi.gaussian_filter(gt.astype(float), 2.5)
    q = ndi.gaussian_filter(false_edges.astype(float), 2.5)
    bg = ndi.gaussian_filter(rng.standard_normal((size, size)), 8)
    noise = ndi.gaussian_filter(rng.standard_normal((size, size)), 2)
    prob = (0.95 * p / p.max() + 0.5 * q / q.max() + 0.08 * (bg - bg.min()) / (bg.max() - bg.min())
            + 0.03 * noise / noise.std())
    prob = np.clip(prob, 1e-4, 1 - 1e-4)
    logit = torch.from_numpy(np.log(prob / (1 - prob))).float()[None, None]
    stats = {"gt_fraction": float(gt.mean()), "pred_pixels_at_0.01": int((prob >= 0.01).sum()),
             "pred_pixels_at_0.5": int((prob >= 0.5).sum())}
    return logit, torch.from_numpy(gt.astype(np.int64))[None], stats


def dense_pairs(size: int, seed: int) -> dict[str, tuple[str, torch.Tensor, torch.Tensor]]:
    """Per meter: (task, dataset, output, target) of one image, plausible but synthetic."""
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, task, classes in (("miou_semseg_21", "semseg", 21), ("miou_parts_7", "human_parts", 7)):
        lab = torch.from_numpy(_regions(size, 12, rng) % classes).long()[None]
        lab[0, torch.from_numpy(ndi.binary_dilation(_boundary(lab[0].numpy()), iterations=2))] = 255
        logits = torch.randn(1, classes, size, size, generator=g)
        logits.scatter_add_(1, lab.clamp(max=classes - 1)[:, None], torch.full((1, 1, size, size), 2.0))
        out[name] = (task, "pascal_context", logits, lab)
    sal = torch.from_numpy(_regions(size, 6, rng) == 0).long()[None]
    sal_logits = torch.randn(1, 2, size, size, generator=g)
    sal_logits[:, 1] += 3.0 * (2 * sal[0].float() - 1)
    out["maxf_sal"] = ("sal", "pascal_context", sal_logits, sal)
    normals = torch.nn.functional.normalize(torch.randn(1, 3, size, size, generator=g), dim=1)
    normals[:, :, : size // 16] = 0  # a band of invalid pixels
    out["normals"] = ("normals", "pascal_context", normals + 0.2 * torch.randn(1, 3, size, size, generator=g), normals)
    depth = 1 + 9 * torch.rand(1, 1, size, size, generator=g)
    out["rmse_depth"] = ("depth", "nyud", depth + 0.3 * torch.randn(1, 1, size, size, generator=g), depth)
    return out


def _timed(fn) -> float:
    """Seconds of ``fn()`` (``mtshare.bench``'s timer, which counts ms)."""
    return bench_timed(fn) / 1e3


# --- measurements ----------------------------------------------------------------------------------

def measure_meters(img: int, repeats: int, images: int, ods_images: int, log) -> dict:
    res: dict = {}
    samples: dict[str, list[float]] = {}
    pairs = [dense_pairs(img, 100 + i) for i in range(images)]
    for r in range(repeats):
        for p in pairs:
            for name, (task, dataset, pred, target) in p.items():
                meter = get_task(task).new_meter(dataset)
                samples.setdefault(name, []).append(_timed(lambda: meter.update(pred, target)))
    for name, s in samples.items():
        res[name] = {"median_s": statistics.median(s), "samples": len(s), "images": images}
    edges = [edge_pair(img, 200 + i) for i in range(ods_images)]
    for n in (25, 99):
        times, values = [], []
        for i, (logit, target, _) in enumerate(edges):
            meter = get_task("edge").new_meter("pascal_context", n_thresholds=n)
            times.append(_timed(lambda: meter.update(logit, target)))
            values.append(meter.compute())
            log(f"  odsf {n} thresholds, image {i}: {times[-1]:.1f} s (ODS-F {values[-1]:.3f})")
        res[f"odsf_{n}"] = {"median_s": statistics.median(times), "all_s": times, "images": len(edges),
                            "odsf": values, "max_dist": meter.max_dist}
    res["edge_maps"] = [e[2] for e in edges]
    return res


def _load() -> float:
    return os.getloadavg()[0]


def _schedule(pieces: list[float], workers: int) -> float:
    """Makespan of ``pieces`` (seconds, in submission order) on ``workers`` processes that each take
    the next piece when free (what ``ProcessPoolExecutor.map`` does)."""
    free = [0.0] * workers
    for t in pieces:
        i = free.index(min(free))
        free[i] += t
    return max(free)


def pool_summary(pool: dict) -> dict:
    """``pool`` with its per-image times (the fastest of each configuration's runs: another job on
    the CPU only adds time), speedup and efficiency (speedup / processes) set from its runs."""
    t1 = min(r["per_image_s"] for r in pool["runs"] if r["processes"] == 1)
    tn = min(r["per_image_s"] for r in pool["runs"] if r["processes"] == pool["processes"])
    return {**pool, "per_image_s_1": t1, "per_image_s_n": tn, "speedup": t1 / tn, "efficiency": t1 / tn / pool["processes"]}


def measure_odsf_pool(img: int, batch: int, processes: int, thresholds: int, log, schedule_for: int = 8) -> dict:
    """ODS-F per image with ``set_num_processes(processes)`` beside 1 process, as the Trainer feeds
    it: one ``update()`` of a batch of ``batch`` edge maps (the per-rank batch; each image's
    thresholds are cut into ceil(4·processes/batch) chunks). Interleaved A B B A (A: 1 process,
    B: the pool, warmed before each B so its spawn is not counted: a worker keeps its pool), the
    load average read around each. Then each (image, chunk) piece of a ``schedule_for``-process
    batch timed alone in this process, and that batch's makespan on ``schedule_for`` processes
    (list scheduling in submission order): the bound the chunking alone puts on the efficiency there."""
    from mtshare import edge_match, metrics

    edges = [edge_pair(img, 200 + i) for i in range(batch)]
    logits = torch.cat([e[0] for e in edges])
    target = torch.cat([e[1] for e in edges])
    small = [edge_pair(64, 900 + i) for i in range(batch)]
    s_logits, s_target = torch.cat([e[0] for e in small]), torch.cat([e[1] for e in small])

    def run(n: int) -> dict:
        metrics.set_num_processes(n)
        if n > 1:  # spawn the pool and import the matcher in its workers, untimed
            get_task("edge").new_meter("pascal_context", n_thresholds=thresholds).update(s_logits, s_target)
        meter = get_task("edge").new_meter("pascal_context", n_thresholds=thresholds)
        before = _load()
        t = _timed(lambda: meter.update(logits, target))
        r = {"processes": n, "batch_s": t, "per_image_s": t / batch, "load_before": before,
             "load_after": _load(), "odsf": meter.compute(), "state": {k: v.tolist() for k, v in meter.state().items()}}
        log(f"  odsf {thresholds} thresholds, batch of {batch}, {n} process(es): {t:.1f} s "
            f"({t / batch:.1f} s per image; load {before:.2f} -> {r['load_after']:.2f})")
        return r

    runs = [run(n) for n in (1, processes, processes, 1)]
    metrics.set_num_processes(1)
    same = all(r["state"] == runs[0]["state"] for r in runs)
    res = pool_summary({"thresholds": thresholds, "batch": batch, "processes": processes, "img": img,
                        "chunks_per_image": min(thresholds, max(1, -(-4 * processes // batch))), "same_counts": same,
                        "runs": [{k: v for k, v in r.items() if k != "state"} for r in runs]})
    log(f"  speedup {res['speedup']:.2f} at {processes} processes, efficiency {res['efficiency']:.2f}, "
        f"same counts: {same}")
    if schedule_for:
        # the chunking of a batch on schedule_for processes (as edge_match._match_images cuts it)
        n_chunks = min(thresholds, max(1, -(-4 * schedule_for // batch)))
        meter = get_task("edge").new_meter("pascal_context", n_thresholds=thresholds)
        cuts = np.array_split(np.arange(thresholds), n_chunks)
        probs = torch.sigmoid(logits[:, 0].double()).numpy()
        gts = (target == 1).numpy()
        pieces = [_timed(lambda: edge_match._match_thresholds(pr, g, meter.thresholds[c], meter.max_dist, True))
                  for pr, g in zip(probs, gts) for c in cuts]
        serial = sum(pieces)
        span = _schedule(pieces, schedule_for)
        res["schedule"] = {"processes": schedule_for, "chunks_per_image": n_chunks, "pieces_s": pieces,
                           "serial_s": serial, "makespan_s": span, "efficiency_bound": serial / span / schedule_for}
        log(f"  {schedule_for} processes: {n_chunks} chunks per image, serial {serial:.1f} s, "
            f"makespan {span:.1f} s, efficiency bound {res['schedule']['efficiency_bound']:.2f}")
    return res


def measure_models(model: str, patch: int, img: int, repeats: int, log) -> dict:
    res: dict = {}
    x = torch.randn(1, 3, img, img, generator=torch.Generator().manual_seed(0))
    log("building the synthetic engine (semseg base + 4 sub-tasks, 90 % sparse deltas)")
    engine = synthetic_engine(model, patch, 5, 0.9, seed=0)
    base = engine.base_task
    for t in engine.subtasks:
        engine.thresholds[t] = {}  # τ = 0: every sub-task runs its merged weights (exact)
    # FLOPs the engine executes, from one counted pass per configuration
    engine.collect_stats = True
    executed = {}
    with torch.inference_mode():
        for t in SUBTASKS:
            engine(x, tasks=[t])
            executed[t] = engine.last_stats[t].executed_flops
    engine.collect_stats = False
    dense = {t: engine.dense_model(t) for t in (base, *SUBTASKS)}
    dense_fl = {t: flops.dense_flops(dense[t], img) for t in dense}
    enc_fl = flops.dense_flops(dense[base].encoder, img)
    res["flops"] = {"dense_forward": dense_fl, "encoder_forward": enc_fl,
                    # the base encoder runs densely, the sub-task (merged) adds its encoder and head
                    "engine_val_pass_executed": {t: enc_fl + executed[t] for t in SUBTASKS}}
    with torch.inference_mode():
        # warm-up
        engine(x, tasks=[SUBTASKS[0]])
        dense[base](x)
        val, cal, dns = ({t: [] for t in SUBTASKS}, {t: [] for t in SUBTASKS}, {t: [] for t in dense})
        for r in range(repeats):
            for t in SUBTASKS:
                val[t].append(_timed(lambda: engine(x, tasks=[t])))
                log(f"  engine val pass {t}: {val[t][-1]:.2f} s")
            for t in ("edge",):
                cal[t].append(_timed(lambda: engine(x, tasks=[base, t])))
                log(f"  engine calibration pass (base head too) {t}: {cal[t][-1]:.2f} s")
            for t in (base, "edge", "normals"):
                dns[t].append(_timed(lambda: dense[t](x)))
                log(f"  dense forward {t}: {dns[t][-1]:.2f} s")
    med = lambda d: {k: statistics.median(v) for k, v in d.items() if v}  # noqa: E731
    res["engine_val_pass_s"] = med(val)
    res["engine_calibration_pass_s"] = med(cal)
    res["dense_forward_s"] = med(dns)
    res["engine_val_pass_s_all"] = val
    res["dense_forward_s_all"] = {k: v for k, v in dns.items() if v}
    return res, dense, engine


def measure_storage(model: str, patch: int, dense: dict, engine, img: int) -> dict:
    """Bytes of the checkpoints a suite writes (measured by writing them) and of the resume state
    (on paper: weights + counters in trainer.pt, DeepSpeed's module states, and the ZeRO-2 optimizer
    state summed over ranks: fp32 copy + Adam exp_avg + exp_avg_sq of every trainable parameter)."""
    base = engine.base_task
    res: dict = {}
    with tempfile.TemporaryDirectory() as d:
        m = dense[base]
        ckpt.save_dense(Path(d) / "base.safetensors", m.encoder.state_dict(), m.head.state_dict(), {"kind": "x"})
        res["base_checkpoint_bytes"] = os.path.getsize(Path(d) / "base.safetensors")
        for t in ("edge", "normals"):
            deltas = synthetic_deltas(m.encoder.state_dict(), 0.9, seed=1)
            ckpt.save_subtask(Path(d) / f"{t}.safetensors", deltas, dense[t].head.state_dict(), {}, base_sha256="0" * 64)
            res[f"subtask_checkpoint_bytes_{t}"] = os.path.getsize(Path(d) / f"{t}.safetensors")
    nbytes = lambda ts: sum(v.numel() * v.element_size() for v in ts)  # noqa: E731
    for t in ("edge", "normals"):
        tm = build_model(model, patch, t, PASCAL_CHANNELS[t])
        dense_state = nbytes(tm.state_dict().values())
        dense_train = sum(p.numel() for p in tm.parameters())
        add_deltas(tm.encoder)
        sd = tm.state_dict()
        share_state = nbytes(sd.values())
        head = sum(p.numel() for p in tm.head.parameters())
        delta = sum(v.numel() for k, v in sd.items() if k.endswith(".delta"))
        alpha = sum(v.numel() for k, v in sd.items() if "log_alpha" in k)
        res[t] = {"dense_state_bytes": dense_state, "dense_trainable": dense_train,
                  "sharing_state_bytes": share_state, "head_params": head, "delta_params": delta,
                  "alpha_params": alpha}
        opt = lambda n: 3 * 4 * n  # noqa: E731  (fp32 partition + exp_avg + exp_avg_sq)
        res[t]["resume_bytes"] = {
            "dense (base/step0)": 2 * dense_state + opt(dense_train),
            "step1": 2 * share_state + opt(delta + alpha + head),
            "step2/step3": 2 * share_state + opt(delta + head),
        }
    return res


# --- one suite at real scale, on paper from the measured figures -------------------------------------

def _n_evals(iters: int, every: int) -> int:
    """Evaluations of a stage: at every ``eval_every`` iteration and at the last one."""
    return iters // every + (1 if iters % every else 0)


def pool_efficiency(meters: dict) -> float | None:
    """The ODS-F pool's parallel efficiency measured at its processes (speedup / processes), capped
    at 1 for the extrapolation; None when not measured."""
    pool = meters.get("odsf_pool")
    return None if pool is None else min(1.0, pool["efficiency"])


def meter_s(meters: dict, task: str, thresholds: int, processes: int = 1) -> float:
    """Seconds of one image's ``update()`` of ``task``'s meter (edge: ODS-F at ``thresholds``, counts
    other than the two measured interpolated per threshold, on ``processes`` processes: the
    measured 1-process time / (processes × the efficiency measured at the pool's processes), an
    extrapolation beyond them)."""
    if task != "edge":
        return meters[{"semseg": "miou_semseg_21", "human_parts": "miou_parts_7", "sal": "maxf_sal",
                       "normals": "normals", "depth": "rmse_depth"}[task]]["median_s"]
    t25, t99 = meters["odsf_25"]["median_s"], meters["odsf_99"]["median_s"]
    t = t25 + (t99 - t25) * (thresholds - 25) / (99 - 25)
    eff = pool_efficiency(meters)
    if processes > 1:
        if eff is None:
            raise ValueError("no ODS-F pool measurement (odsf_pool) to cost several processes from")
        t /= processes * eff
    return t


def _bounds(n: int, R: int, r: int) -> tuple[int, int]:
    """Rank r's contiguous share of n items (``mtshare.evaluation.Ranks.bounds``)."""
    q, rem = divmod(n, R)
    start = r * q + min(r, rem)
    return start, start + q + (r < rem)


def bisection_metric_images(holdout: int, R: int) -> tuple[int, int, int]:
    """One calibration metric call, sharded as ``operating_point.calibrate_task`` does it: each
    holdout image scored once, into the meter of the half it belongs to, by the rank whose
    contiguous share holds it; then the halves' meters are merged over the ranks. Returns
    (image-updates on the slowest rank = the call's wall time in meter updates, image-updates in
    all, the largest wait of one rank in one collective)."""
    per_rank = [b - a for a, b in (_bounds(holdout, R, r) for r in range(R))]
    return max(per_rank), sum(per_rank), max(per_rank) - min(per_rank)


def suite_plan(m: dict, config: str, train_images: int, val_images: int, peak_tflops: float, util: float,
               ranks: tuple[int, ...] = (1, 4), cal_thresholds: int | None = None,
               processes: int | None = None) -> list[dict]:
    """Per stage of the suite ``config`` (read with ``load_suite_config``, each stage's optim from
    ``cfg.optim_for(task, kind)``: task overrides honoured): training compute (on paper: FLOPs →
    GPU-hours at ``util`` of ``peak_tflops``), evaluation and calibration wall time with R ranks
    (GPU passes converted by FLOPs, meters at their measured CPU time: one core per rank, edge's
    ODS-F on ``processes`` processes per rank, default ``resources.cpus_per_worker``), storage
    written. ``cal_thresholds``: ODS-F thresholds of the calibration bisection (default:
    ``calibration.edge_thresholds``, else the stage's ``edge_thresholds``); the val figures at τ and
    at τ = 0 use the stage's ``edge_thresholds``."""
    from mtshare.config import load_suite_config

    cfg = load_suite_config(config)
    eff = peak_tflops * 1e12 * util
    W = cfg.resources.workers
    P = int(cfg.resources.cpus_per_worker) if processes is None else processes
    fl = m["flops"]
    enc = fl["encoder_forward"]
    base = cfg.base_task
    head_base = fl["dense_forward"][base] - enc
    st = m["storage"]
    cal = cfg.calibration
    holdout = cfg.dataset.holdout
    rows = []
    stages = [(base, "base")] + [(t, k) for t in cfg.tasks for k in (["step0"] if cfg.references else []) + cfg.steps]
    for task, kind in stages:
        o = cfg.optim_for(task, kind)
        f_dense = fl["dense_forward"][task]
        per_iter = (3 * f_dense + (enc if kind == "step3" else 0)) * o.batch_size  # per rank
        train_flops = per_iter * W * o.iters
        gpu_h = train_flops / eff / 3600
        n_ev = _n_evals(o.iters, o.eval_every)
        t_meter = meter_s(m["meters"], task, o.edge_thresholds, P)
        gpu_fwd = f_dense / eff
        row = {"stage": f"{task} {kind}", "task": task, "kind": kind, "iters": o.iters, "eval_every": o.eval_every,
               "global_batch": o.batch_size * W, "train_pflop": train_flops / 1e15, "gpu_hours": gpu_h,
               "train_wall_h": gpu_h / W, "evals": n_ev, "meter_s_per_image": t_meter, "odsf_processes": P,
               "eval_h": {}, "calibration_h": {}}
        for R in ranks:
            per_eval = val_images / R * (gpu_fwd + t_meter)
            row["eval_h"][R] = n_ev * per_eval / 3600
        if kind == cfg.steps[-1] and task != base:
            ct = cal_thresholds or cal.edge_thresholds or o.edge_thresholds
            t_cal_meter = meter_s(m["meters"], task, ct, P)
            f_val = fl["engine_val_pass_executed"][task]
            f_cal = f_val + head_base  # engine(images) of base + one sub-task: the base head runs too
            passes = cal.steps + 1  # the exact pass + one per bisection step
            for R in ranks:
                wall_imgs, _, wait_imgs = bisection_metric_images(holdout, R)
                bisect = passes * (holdout / R * f_cal / eff + wall_imgs * t_cal_meter)
                val = 2 * val_images / R * (f_val / eff + t_meter)  # at τ and at τ = 0
                row["calibration_h"][R] = {"bisection": bisect / 3600, "val": val / 3600, "total": (bisect + val) / 3600,
                                           "metric_wall_images": wall_imgs, "metric_calls": passes,
                                           "largest_merge_wait_s": wait_imgs * t_cal_meter}
            row["calibration_thresholds"] = ct if task == "edge" else None
            row["calibration_meter_s_per_image"] = t_cal_meter
        # storage: model + best (written once each, best rewritten on improvement), resume state every ckpt_every
        # measured for edge (E = 3072 head, as semseg and sal) and normals (E = 1536, as human_parts)
        key = task if task in st else ("normals" if task == "human_parts" else "edge")
        if kind == "base":
            ckpt_bytes = st["base_checkpoint_bytes"]
            resume = st[key]["resume_bytes"]["dense (base/step0)"]
        elif kind == "step0":
            ckpt_bytes = st[key]["dense_state_bytes"]
            resume = st[key]["resume_bytes"]["dense (base/step0)"]
        else:
            ckpt_bytes = st[f"subtask_checkpoint_bytes_{key}"]
            resume = st[key]["resume_bytes"]["step1" if kind == "step1" else "step2/step3"]
        n_ckpt = (o.iters - 1) // o.ckpt_every
        row["storage"] = {"checkpoint_bytes": ckpt_bytes, "outputs_bytes": 2 * ckpt_bytes, "resume_bytes": resume,
                          "resume_written_bytes": n_ckpt * resume, "resume_checkpoints": n_ckpt}
        rows.append(row)
    return rows


def format_suite(rows: list[dict], ranks=(1, 4)) -> str:
    gb = 1e9
    head = ("| stage | iters × global batch | train PFLOP | GPU-h (on paper) | in-training evals | "
            + " | ".join(f"eval h, R={R}" for R in ranks) + " | "
            + " | ".join(f"calibration + op. point h, R={R}" for R in ranks)
            + " | outputs GB | resume state GB (× n written) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        cal = [f"{r['calibration_h'][R]['total']:.2f} ({r['calibration_h'][R]['bisection']:.2f} + "
               f"{r['calibration_h'][R]['val']:.2f})" if r["calibration_h"] else "–" for R in ranks]
        s = r["storage"]
        lines.append(f"| {r['stage']} | {r['iters']} × {r['global_batch']} | {r['train_pflop']:.0f} | "
                     f"{r['gpu_hours']:.1f} | {r['evals']} | "
                     + " | ".join(f"{r['eval_h'][R]:.2f}" for R in ranks) + " | " + " | ".join(cal)
                     + f" | {s['outputs_bytes'] / gb:.3f} | {s['resume_bytes'] / gb:.2f} (× {s['resume_checkpoints']}) |")
    lines.append("")
    lines.append(summarize(rows, ranks))
    return "\n".join(lines)


def pipeline_hours(rows: list[dict], R: int, workers: int = 4) -> dict[str, float]:
    """Wall hours per pipeline (training on ``workers`` GPUs, in-training evals and the
    calibration with R ranks), in the order the suite runs them: base, then each sub-task's
    sharing steps; step0 references beside them."""
    out: dict[str, float] = {}
    for r in rows:
        key = "base" if r["kind"] == "base" else (f"{r['task']} step0" if r["kind"] == "step0" else f"{r['task']} step1-3")
        cal = r["calibration_h"][R]["total"] if r["calibration_h"] else 0.0
        out[key] = out.get(key, 0.0) + r["gpu_hours"] / workers + r["eval_h"][R] + cal
    return out


def summarize(rows: list[dict], ranks=(1, 4)) -> str:
    lines = []
    for R in ranks:
        p = pipeline_hours(rows, R)
        subs = {k: v for k, v in p.items() if k.endswith("step1-3")}
        worst = max(subs, key=subs.get)
        lines.append(f"R={R}: wall h per pipeline: " + ", ".join(f"{k} {v:.1f}" for k, v in p.items())
                     + f"; critical path base + {worst} = {p['base'] + subs[worst]:.1f} h")
    lines.append(f"training on paper: {sum(r['gpu_hours'] for r in rows):.0f} GPU-h in all")
    for r in rows:
        if r["calibration_h"]:
            lines.append(f"{r['stage']} calibration (meter {r['calibration_meter_s_per_image']:.2f} s per image"
                         + (f", {r['calibration_thresholds']} thresholds" if r["calibration_thresholds"] else "")
                         + "): " + ", ".join(
                f"R={R}: {c['metric_calls']} metric calls × {c['metric_wall_images']} image-updates on the slowest "
                f"path, bisection {c['bisection']:.2f} h, val at τ and τ=0 {c['val']:.2f} h, largest wait in one "
                f"merge {c['largest_merge_wait_s']:.0f} s" for R, c in r["calibration_h"].items()))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--img", type=int, default=512)
    p.add_argument("--model", default="vit_base")
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--images", type=int, default=4, help="images per cheap meter")
    p.add_argument("--ods-images", type=int, default=3, help="edge maps timed for ODS-F (once each, 25 and 99)")
    p.add_argument("--batch", type=int, default=4, help="per-rank training batch (configs/pascal_context.yaml)")
    p.add_argument("--skip-models", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--suite", default="configs/pascal_context.yaml", help="the suite costed on paper")
    p.add_argument("--train-images", type=int, default=4998)
    p.add_argument("--val-images", type=int, default=5105)
    p.add_argument("--gpu-tflops", type=float, default=312.0, help="GPU peak (A100 bf16 dense: 312)")
    p.add_argument("--util", type=float, default=0.35, help="fraction of the peak reached")
    p.add_argument("--measured", default=None, help="a JSON this script wrote: cost the suite from it, measure nothing")
    p.add_argument("--pool-processes", type=int, default=2, help="ODS-F pool measured beside 1 process (0: skip)")
    p.add_argument("--measure-pool", action="store_true", help="with --measured: (re-)measure the ODS-F pool only")
    a = p.parse_args()
    log = lambda s: print(s, flush=True)  # noqa: E731
    if a.measured:
        m = json.loads(Path(a.measured).read_text())
        if a.measure_pool:
            torch.set_num_threads(a.threads)
            log(f"ODS-F pool (load average {_load():.2f})")
            m["meters"]["odsf_pool"] = measure_odsf_pool(a.img, a.batch, a.pool_processes, 99, log)
        report_suite(m, a)
        if a.out:
            Path(a.out).write_text(json.dumps(m, indent=1))
        return
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.strip()
    out: dict = {"config": {"img": a.img, "model": a.model, "patch": a.patch, "threads": torch.get_num_threads(),
                            "repeats": a.repeats, "images": a.images, "ods_images": a.ods_images,
                            "cpu": cpu.split(":", 1)[-1].strip(), "torch": torch.__version__,
                            "python": platform.python_version(), "load_avg_before": os.getloadavg()[0]}}
    log("meters")
    out["meters"] = measure_meters(a.img, a.repeats, a.images, a.ods_images, log)
    if a.pool_processes:
        out["meters"]["odsf_pool"] = measure_odsf_pool(a.img, a.batch, a.pool_processes, 99, log)
    if not a.skip_models:
        log("models")
        models, dense, engine = measure_models(a.model, a.patch, a.img, a.repeats, log)
        out.update(models)
        fl = out["flops"]
        enc, b = fl["encoder_forward"], a.batch
        out["train_flops_per_iter_per_rank"] = {
            t: {"dense (base/step0/step1/step2)": 3 * f * b, "step3": (3 * f + enc) * b}
            for t, f in fl["dense_forward"].items()}
        out["storage"] = measure_storage(a.model, a.patch, dense, engine, a.img)
    out["config"]["load_avg_after"] = os.getloadavg()[0]
    out["config"]["wall_s"] = time.perf_counter() - t0

    m = out["meters"]
    log(f"\n{out['config']['cpu']}, {a.threads} thread(s), {a.img}x{a.img}, per image (median)")
    log(f"{'':44s}{'seconds':>10s}")
    for k in ("miou_semseg_21", "miou_parts_7", "maxf_sal", "normals", "rmse_depth", "odsf_25", "odsf_99"):
        log(f"{'meter ' + k:44s}{m[k]['median_s']:10.3f}")
    if not a.skip_models:
        for t, s in out["engine_val_pass_s"].items():
            log(f"{'engine pass base+' + t + ' (tau=0)':44s}{s:10.3f}   "
                f"{out['flops']['engine_val_pass_executed'][t] / 1e9:.0f} GFLOPs")
        for t, s in out["engine_calibration_pass_s"].items():
            log(f"{'engine calibration pass base+' + t + ' +base head':44s}{s:10.3f}")
        for t, s in out["dense_forward_s"].items():
            log(f"{'dense forward ' + t:44s}{s:10.3f}   {out['flops']['dense_forward'][t] / 1e9:.0f} GFLOPs")
        log(f"{'encoder forward FLOPs':44s}{'':10s}   {out['flops']['encoder_forward'] / 1e9:.0f} GFLOPs")
    log(f"wall {out['config']['wall_s']:.0f} s")
    if not a.skip_models:
        report_suite(out, a)
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1))
        print(f"wrote {a.out}", flush=True)


def report_suite(m: dict, a) -> None:
    """Print (and add to ``m``) the suite's stages on paper: as configured (ODS-F on
    ``resources.cpus_per_worker`` processes, extrapolated from the pool's measured efficiency;
    edge calibrated at ``calibration.edge_thresholds``), then variants: edge calibrated at 99,
    ODS-F on one process."""
    pool = m["meters"].get("odsf_pool")
    if pool:
        pool = m["meters"]["odsf_pool"] = pool_summary(pool)
    m["suite"] = {"config": a.suite, "train_images": a.train_images, "val_images": a.val_images,
                  "gpu_tflops": a.gpu_tflops, "util": a.util, "odsf_pool_efficiency_used": pool_efficiency(m["meters"])}
    if pool:
        print(f"\nODS-F pool: {pool['per_image_s_1']:.1f} s per image on 1 process, {pool['per_image_s_n']:.1f} s on "
              f"{pool['processes']} (batch of {pool['batch']}): speedup {pool['speedup']:.2f}, efficiency "
              f"{pool['efficiency']:.2f} (used: {pool_efficiency(m['meters']):.2f}, extrapolated to the config's "
              f"processes)", flush=True)
        if "schedule" in pool:
            sc = pool["schedule"]
            print(f"its chunking on {sc['processes']} processes (pieces timed alone, scheduled on paper): "
                  f"{sc['chunks_per_image']} chunks per image, efficiency at most {sc['efficiency_bound']:.2f}", flush=True)
    variants = (("as_configured", {}), ("edge_calibrated_at_99", {"cal_thresholds": 99}),
                ("odsf_one_process", {"processes": 1}))
    for label, kw in variants:
        rows = suite_plan(m, a.suite, a.train_images, a.val_images, a.gpu_tflops, a.util, **kw)
        m["suite"][label] = rows
        print(f"\n{a.suite} on paper ({label}): {a.gpu_tflops:g} TFLOP/s peak at {a.util:.0%}, "
              f"meters at the measured CPU times, one core per rank, ODS-F on {rows[0]['odsf_processes']} "
              f"process(es) per rank", flush=True)
        print(format_suite(rows) if label == "as_configured" else summarize(rows), flush=True)


if __name__ == "__main__":
    main()
