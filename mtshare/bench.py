"""Shared-inference benchmark: N independent dense models vs the shared engine, in one run.

What is compared (``python -m launcher bench``, or ``python -m mtshare.bench`` for the extra
options used in docs/benchmarks.md):

1. **independent**: N dense single-task models (encoder ``W_b + M ⊙ δ`` merged, own head),
   run one after the other on the same batch — what serving N separately trained models costs;
2. **engine**: :class:`mtshare.engine.SharedEngine` over the same N tasks: the base once, the
   N − 1 sub-tasks through their deltas;
3. the engine's **FLOPs**: theoretical (``mtshare.flops`` formulas with the measured
   activation densities) and executed (what the chosen paths really ran).

"N tasks" = the base + (N − 1) sub-tasks. The 5 PASCAL-Context tasks are semseg (the base)
+ human_parts, sal, normals, edge, each with its real head (width and channels).

Synthetic mode (no ``workdir``): random base weights; every encoder tensor of every sub-task
gets a delta with exactly a fraction ``sparsity`` of zeros at uniformly random positions
(unstructured, as hard-concrete gates leave them), values ~ N(0, (0.05 · rms W_b)²).
Activation sparsity: random deltas change every token a little, so — as in a trained step3
model, where ``T_τ`` makes the deltas sparse — thresholds decide. They are fitted on the
benchmark batch (:meth:`SharedEngine.fit_thresholds`) so that a fraction ``act_sparsity``
(default: ``sparsity``) of the token rows of every linear's input delta is dropped. The
synthetic outputs are meaningless; the compute is the one a real model at those sparsities
would do.

Workdir mode: the trained suite as ``infer`` serves it (the base and the last sharing step of
every sub-task at its stored operating point τ, ``mtshare.infer.load_suite_engine``), on a batch
of the suite's own val images; ``--img`` and ``--tasks`` come from the suite.

``flops_ratio`` is the engine's *executed* FLOPs over the dense models' (what ran);
``theoretical_flops_ratio`` is the formula of ``mtshare.flops`` at the measured densities.

Timing: ``torch.inference_mode``, default thread count, ``warmup`` untimed iterations, then
``repeats`` timed ones alternating which side goes first (the 2-core machines are shared, so
interleaving keeps both sides under the same load); medians are reported.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from mtshare import flops
from mtshare.engine import CSRMatrix, SharedEngine, SparsePolicy
from mtshare.models import build_model
from mtshare.models.heads import build_head
from mtshare.models.vit import vit_config

PASCAL_TASKS = ("semseg", "human_parts", "sal", "normals", "edge")
PASCAL_CHANNELS = {"semseg": 21, "human_parts": 7, "sal": 2, "normals": 3, "edge": 1}
CONTRACT_KEYS = ("config", "independent_ms", "engine_ms", "time_ratio", "flops_ratio")


class BenchInputError(ValueError):
    """Bad benchmark input (size, sparsity, workdir): the message names the option."""


# --- synthetic suites ---------------------------------------------------------------------------

def synthetic_deltas(encoder_sd: dict[str, torch.Tensor], sparsity: float, scale: float = 0.05,
                     seed: int = 0, gates: str = "element") -> dict[str, torch.Tensor]:
    """A delta per encoder tensor with exactly ``round(sparsity · numel)`` zeros at random places
    (``gates="column"``: of each weight matrix, ``round(sparsity · d_in)`` whole input columns
    are zero, as column gates leave them; vectors as with element gates)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, w in encoder_sd.items():
        rms = max(float(w.float().pow(2).mean().sqrt()) or 1.0, 0.02)
        if gates == "column" and w.dim() >= 2:
            w2 = w.reshape(w.shape[0], -1)
            n_cols = w2.shape[1]
            keep = n_cols - int(round(sparsity * n_cols))
            d = torch.zeros(w2.shape)
            cols = torch.randperm(n_cols, generator=g)[:keep]
            d[:, cols] = torch.randn(w2.shape[0], keep, generator=g) * scale * rms
            out[name] = d.reshape(w.shape).to(w.dtype)
            continue
        n = w.numel()
        keep = n - int(round(sparsity * n))
        flat = torch.zeros(n)
        if keep:
            idx = torch.randperm(n, generator=g)[:keep]
            flat[idx] = torch.randn(keep, generator=g) * scale * rms
        out[name] = flat.reshape(w.shape).to(w.dtype)
    return out


def task_names(n_tasks: int) -> list[str]:
    """The first ``n_tasks`` PASCAL tasks; beyond 5, tasks repeat with a suffix (``sal#2``)."""
    return [PASCAL_TASKS[i % 5] + (f"#{i // 5 + 1}" if i >= 5 else "") for i in range(n_tasks)]


def synthetic_engine(model: str, patch: int, n_tasks: int, sparsity: float, seed: int = 0, gates: str = "element",
                     **engine_kw) -> SharedEngine:
    names = task_names(n_tasks)
    torch.manual_seed(seed)
    base = build_model(model, patch, names[0], PASCAL_CHANNELS[names[0]]).eval()
    enc_sd = base.encoder.state_dict()
    subs = {}
    for i, t in enumerate(names[1:], start=1):
        kind = t.split("#")[0]
        subs[t] = (synthetic_deltas(enc_sd, sparsity, seed=seed + i, gates=gates),
                   build_head(kind, base.encoder.cfg.embed_dim, PASCAL_CHANNELS[kind]).eval())
    return SharedEngine(base.encoder.cfg, names[0], enc_sd, base.head, subs, **engine_kw)


def workdir_suite(workdir: str | Path, batch: int, seed: int = 0, **engine_kw) -> tuple[SharedEngine, torch.Tensor]:
    """The trained suite as served (``mtshare.infer.load_suite_engine``: stored τ) and a batch of
    its own val images (the first ``batch``; repeated when val has fewer)."""
    from mtshare.data import build_dataset
    from mtshare.infer import load_suite_engine

    store = Path(workdir) / "store"
    if not (store / "base" / "model.safetensors").is_file():
        raise BenchInputError(f"--workdir: no base checkpoint at {store / 'base' / 'model.safetensors'}")
    engine, manifest = load_suite_engine(store, **engine_kw)
    d = manifest["spec"]["dataset"]
    try:
        val = build_dataset(d["name"], d["root"], "val", [], train=False, img_size=d["img_size"])
    except Exception as e:  # noqa: BLE001 - DataError or a missing root: name the run's dataset
        raise BenchInputError(f"--workdir: the suite's val images are not readable ({e})") from None
    x = torch.stack([val[i % len(val)]["image"] for i in range(batch)])
    return engine, x


# --- timing ----------------------------------------------------------------------------------------

def _timed(fn: Callable[[], object], cpu: list[float] | None = None) -> float:
    """Wall-clock ms of ``fn()``; appends the process CPU ms to ``cpu`` when given."""
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    t = (time.perf_counter() - t0) * 1e3
    if cpu is not None:
        cpu.append((time.process_time() - c0) * 1e3)
    return t


def run_bench(model: str = "vit_small", img: int = 224, batch: int = 1, tasks: int = 5, sparsity: float = 0.9,
              workdir: str | None = None, device: str = "cpu", *, act_sparsity: float | None = None,
              patch: int = 16, threshold_mode: str = "token", repeats: int | None = None, warmup: int = 1,
              budget_s: float = 20.0, seed: int = 0, policy: SparsePolicy | None = None, threads: int | None = None,
              delta_gates: str = "element", log: Callable[[str], None] | None = None) -> dict:
    """Run the benchmark; returns the result dict (the ``bench --format json`` object)."""
    log = log or (lambda s: None)
    if tasks < 1:
        raise BenchInputError("--tasks: need at least 1 task")
    if not 0.0 <= sparsity <= 1.0:
        raise BenchInputError(f"--sparsity: {sparsity} is not a fraction in [0, 1]")
    if device == "cuda" and not torch.cuda.is_available():
        raise BenchInputError("--device cuda: no CUDA device on this machine")
    act_sparsity = sparsity if act_sparsity is None else act_sparsity
    if threads:
        torch.set_num_threads(threads)
    load_before = os.getloadavg()[0]
    kw = dict(device=device, policy=policy, threshold_mode=threshold_mode)
    if workdir:
        engine, x = workdir_suite(workdir, batch, seed, **kw)
        x = x.to(device)
        img = x.shape[-1]
        source = str(workdir)
    else:
        engine = synthetic_engine(model, patch, tasks, sparsity, seed=seed, gates=delta_gates, **kw)
        source = "synthetic"
    cfg = engine.cfg
    if img % cfg.patch_size:
        raise BenchInputError(f"--img: {img} is not divisible by the patch size {cfg.patch_size}")
    names = engine.tasks
    log(f"building {len(names)} dense models for {names}")
    dense = {t: engine.dense_model(t) for t in names}
    if not workdir:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, 3, img, img, generator=g).to(device)

    # Thresholds (synthetic mode) and the FLOPs / path statistics, from one untimed pass (the
    # fitting pass applies each τ as soon as it is set: its outputs are the engine's outputs).
    # The independent outputs double as the first warm-up.
    engine.collect_stats = True
    with torch.inference_mode():
        if not workdir and len(names) > 1:
            shared_out = engine.fit_thresholds(x, 1.0 - act_sparsity)
        else:
            shared_out = engine(x)
        stats = {t: engine.last_stats[t] for t in names}
        ind_out = {t: dense[t](x) for t in names}
    rel_err = {t: float((shared_out[t].float() - ind_out[t].float()).norm() / ind_out[t].float().norm().clamp_min(1e-30))
               for t in names}
    del shared_out, ind_out

    log("counting dense FLOPs")
    dense_flops = {t: flops.dense_flops(dense[t], img) for t in names}
    theo = {names[0]: dense_flops[names[0]]}
    for t in names[1:]:
        theo[t] = flops.shared_flops(dense[t], img, engine.delta_nnz(t), stats[t].act_density, dense_total=dense_flops[t])
    ind_total = sum(dense_flops.values())
    theo_total = sum(theo.values())
    exec_total = sum(st.executed_flops for st in stats.values())

    # Timing: interleaved, medians.
    engine.collect_stats = False
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run_independent():
        for t in names:
            dense[t](x)
        sync()

    def run_engine():
        engine(x)
        sync()

    ind_ms, eng_ms, ind_cpu, eng_cpu = [], [], [], []
    with torch.inference_mode():
        t_iter = 0.0
        for _ in range(max(warmup, 0)):
            t_iter = _timed(run_independent) + _timed(run_engine)
        if repeats is None:
            if t_iter == 0.0:
                t_iter = _timed(run_independent) + _timed(run_engine)
            repeats = int(min(15, max(3, budget_s * 1e3 // max(t_iter, 1e-3))))
        log(f"timing {repeats} repeats (~{t_iter / 1e3:.1f} s each)")
        for r in range(repeats):
            if r % 2 == 0:
                ind_ms.append(_timed(run_independent, ind_cpu))
                eng_ms.append(_timed(run_engine, eng_cpu))
            else:
                eng_ms.append(_timed(run_engine, eng_cpu))
                ind_ms.append(_timed(run_independent, ind_cpu))
    engine.collect_stats = True

    ind_med, eng_med = statistics.median(ind_ms), statistics.median(eng_ms)
    time_ratio = eng_med / ind_med
    flops_ratio = exec_total / ind_total  # what the engine ran, not what the formula promises
    per_task = {}
    for t in names:
        st = stats[t]
        per_task[t] = {
            "role": "base" if t == engine.base_task else "sub-task",
            "weight_density": None if t == engine.base_task else engine.weight_density(t),
            "dense_flops": dense_flops[t], "theoretical_flops": theo[t], "executed_flops": st.executed_flops,
            "act_density": st.to_dict()["act_density"], "row_density": st.to_dict()["row_density"],
            "rows_skipped": st.rows_skipped,
            "paths": st.path_counts(), "output_rel_err": rel_err[t],
        }
    return {
        "config": {
            "model": f"{cfg.embed_dim}d/{cfg.depth}L" if workdir else model, "patch": cfg.patch_size, "img": img,
            "batch": batch, "tasks": len(names), "task_names": names, "base_task": engine.base_task,
            "sparsity": None if workdir else sparsity, "act_sparsity": None if workdir else act_sparsity,
            "delta_gates": None if workdir else delta_gates,
            "threshold_mode": threshold_mode, "source": source, "device": device, "dtype": "float32",
            "threads": torch.get_num_threads(), "repeats": repeats, "warmup": warmup,
            # other processes on the machine: the 1-min load average before and after the run
            "load_avg": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            "policy": dataclasses.asdict(engine.policy),
        },
        "independent_ms": ind_med,
        "engine_ms": eng_med,
        "time_ratio": time_ratio,
        "flops_ratio": flops_ratio,
        "executed_flops_ratio": exec_total / ind_total,
        "theoretical_flops_ratio": theo_total / ind_total,
        "time_over_flops": time_ratio / flops_ratio,
        "independent_images_per_s": batch * 1e3 / ind_med,
        "engine_images_per_s": batch * 1e3 / eng_med,
        # robustness on a shared machine: best-of wall times, and process CPU time (with one
        # thread, CPU time excludes the time other processes held the cores)
        "time_ratio_min": min(eng_ms) / min(ind_ms),
        "independent_cpu_ms": statistics.median(ind_cpu),
        "engine_cpu_ms": statistics.median(eng_cpu),
        "cpu_time_ratio": statistics.median(eng_cpu) / statistics.median(ind_cpu),
        "independent_ms_all": ind_ms,
        "engine_ms_all": eng_ms,
        "independent_cpu_ms_all": ind_cpu,
        "engine_cpu_ms_all": eng_cpu,
        "flops": {"independent": ind_total, "engine_theoretical": theo_total, "engine_executed": exec_total},
        "per_task": per_task,
    }


def format_table(r: dict) -> str:
    c = r["config"]
    gf = 1e9
    lines = [
        f"bench: {c['model']}/{c['patch']} {c['img']}x{c['img']} batch {c['batch']}, {c['tasks']} tasks "
        f"({c['base_task']} base + {c['tasks'] - 1} sub-tasks), "
        + (f"sparsity {c['sparsity']:.2f} weights / {c['act_sparsity']:.2f} activation rows ({c['threshold_mode']})"
           if c["sparsity"] is not None else f"trained suite {c['source']} at its operating points (stored tau), its val images")
        + f", {c['device']} {c['threads']} threads, {c['repeats']} repeats, load avg {c['load_avg'][0]}",
        "",
        f"{'':28s}{'median ms':>12s}{'images/s':>10s}{'GFLOPs/img':>12s}",
        f"{'independent (' + str(c['tasks']) + ' dense)':28s}{r['independent_ms']:12.1f}"
        f"{r['independent_images_per_s']:10.2f}{r['flops']['independent'] / gf:12.2f}",
        f"{'shared engine':28s}{r['engine_ms']:12.1f}{r['engine_images_per_s']:10.2f}"
        f"{r['flops']['engine_theoretical'] / gf:12.2f}  (executed {r['flops']['engine_executed'] / gf:.2f})",
        "",
        f"time ratio engine/independent {r['time_ratio']:.3f} | executed FLOPs ratio {r['flops_ratio']:.3f} "
        f"(theoretical {r['theoretical_flops_ratio']:.3f}) | time ratio / FLOPs ratio {r['time_over_flops']:.2f}",
        f"(best-of time ratio {r['time_ratio_min']:.3f}, CPU-time ratio {r['cpu_time_ratio']:.3f})",
        "",
        f"{'task':14s}{'role':10s}{'w density':>10s}{'act dens':>10s}{'row dens':>10s}{'GFLOPs th/ex/dense':>22s}  paths",
    ]
    for t, p in r["per_task"].items():
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(
            f"{t:14s}{p['role']:10s}{fmt(p['weight_density']):>10s}{fmt(p['act_density']):>10s}{fmt(p['row_density']):>10s}"
            f"{p['theoretical_flops'] / gf:8.2f}/{p['executed_flops'] / gf:.2f}/{p['dense_flops'] / gf:.2f}  "
            + ", ".join(f"{k}:{v}" for k, v in sorted(p["paths"].items()))
        )
    return "\n".join(lines)


# --- crossover measurement (the SparsePolicy constants) --------------------------------------------

def measure_crossovers(model: str = "vit_base", img: int = 512, batch: int = 1, repeats: int = 5,
                       log: Callable[[str], None] = print) -> dict:
    """Time each sparse path against the dense GEMM it replaces on one block's linear shapes.

    Ratios < 1 mean the sparse path is faster. Gather: index_select → GEMM → index_add_ on a
    fraction r of rows vs ``addmm`` on all rows. CSR weight: ``CSRMatrix`` (embedding_bag) and
    ``torch.sparse.mm`` on the same CSR vs the dense GEMM with the full weight. CSR activation:
    building the CSR of the delta + product with ``W_bᵀ`` vs the dense GEMM. Engine gather: the
    whole path a sub-task's linear runs with a τ (the delta ``x_s − x_b``, its row maxima, the
    kept rows, a copy of ``y_b``, the GEMM on the kept rows, the scatter-add) vs the merged GEMM
    ``F.linear(x_s, W, b)``, beside :meth:`SparsePolicy.gather_limit` for the shape.
    """
    cfg = vit_config(model, 16)
    d, hid = cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio)
    n = batch * ((img // 16) ** 2 + 1)
    shapes = {"qkv": (d, 3 * d), "proj": (d, d), "fc1": (d, hid), "fc2": (hid, d)}
    g = torch.Generator().manual_seed(0)

    def med(fn):
        calls = max(1, int(5.0 / max(_timed(fn), 1e-3)))  # ≥ ~5 ms per sample: sub-ms ops time as loops

        def loop():
            for _ in range(calls):
                fn()
        return statistics.median(_timed(loop) for _ in range(repeats)) / calls

    out: dict = {"model": model, "img": img, "batch": batch, "tokens": n, "threads": torch.get_num_threads(),
                 "gather": {}, "csr_weight": {}, "torch_sparse_mm": {}, "csr_act": {}, "engine_gather": {},
                 "gather_limit": {k: SparsePolicy().gather_limit(*v) for k, v in shapes.items()}}
    with torch.inference_mode():
        for lname, (d_in, d_out) in shapes.items():
            x = torch.randn(n, d_in, generator=g)
            w = torch.randn(d_out, d_in, generator=g)
            y = torch.randn(n, d_out, generator=g)
            dense = med(lambda: y.clone().addmm_(x, w.t()))
            for r in (0.1, 0.25, 0.5, 0.75, 0.9):
                idx = torch.randperm(n, generator=g)[: int(r * n)].sort().values
                t = med(lambda: y.clone().index_add_(0, idx, F.linear(x.index_select(0, idx), w)))
                out["gather"].setdefault(str(r), {})[lname] = t / dense
            for dens in (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3):
                wd = w * (torch.rand(w.shape, generator=g) < dens)
                csr = CSRMatrix(wd)
                t = med(lambda: csr.linear(x, add=y))
                out["csr_weight"].setdefault(str(dens), {})[lname] = t / dense
                if dens in (0.05, 0.1):
                    tcsr = wd.to_sparse_csr()
                    t = med(lambda: y.clone().add_(torch.sparse.mm(tcsr, x.t().contiguous()).t()))
                    out["torch_sparse_mm"].setdefault(str(dens), {})[lname] = t / dense
            bias = torch.randn(d_out, generator=g)
            y_b = F.linear(x, w, bias)
            x_s = x + torch.rand(n, 1, generator=g) * torch.randn(n, d_in, generator=g)  # rows differ in size
            merged = med(lambda: F.linear(x_s, w, bias))
            row_max = (x_s - x).abs().amax(dim=1)
            for r in (0.1, 0.25, 0.5, 0.75, 0.9):
                tau = float(row_max.quantile(1.0 - r))

                def engine_gather():
                    delta = x_s - x
                    keep = (torch.maximum(delta.amax(dim=1), delta.amin(dim=1).neg_()) >= tau).nonzero().squeeze(1)
                    return y_b.clone().index_add_(0, keep, F.linear(delta.index_select(0, keep), w))
                out["engine_gather"].setdefault(str(r), {})[lname] = med(engine_gather) / merged
            wt = w.t().contiguous()
            for dens in (0.01, 0.02, 0.05, 0.1):
                xd = x * (torch.rand(x.shape, generator=g) < dens)
                t = med(lambda: y.clone().add_(CSRMatrix(xd).matmul(wt)))
                out["csr_act"].setdefault(str(dens), {})[lname] = t / dense
            log(f"{lname}: dense GEMM {dense:.2f} ms ({n}x{d_in} -> {d_out})")
    log("gather_limit (kept rows): " + "  ".join(f"{k} {v:.2f}" for k, v in out["gather_limit"].items()))
    for key in ("gather", "engine_gather", "csr_weight", "torch_sparse_mm", "csr_act"):
        for dens, per in out[key].items():
            per["mean"] = sum(per.values()) / len(per)
            log(f"{key:16s} density {dens:>5s}: " + "  ".join(f"{k} {v:.2f}" for k, v in per.items()))
    return out


# --- command line --------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mtshare.bench", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vit_small")
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tasks", type=int, default=5)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--act-sparsity", type=float, default=None, help="token rows dropped (default: --sparsity)")
    p.add_argument("--mode", choices=["token", "element"], default="token", help="threshold mode")
    p.add_argument("--delta-gates", choices=["element", "column"], default="element",
                   help="synthetic deltas: zeros at random entries, or whole zero input columns (column gates)")
    p.add_argument("--workdir")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--sweep", type=str, default=None, help="comma-separated sparsities, one run each")
    p.add_argument("--crossover", action="store_true", help="measure the sparse-path crossovers instead")
    p.add_argument("--format", choices=["table", "json"], default="table")
    a = p.parse_args(argv)
    log = lambda s: print(s, file=sys.stderr)  # noqa: E731
    if a.crossover:
        r = measure_crossovers(a.model, a.img, a.batch, log=log)
        print(json.dumps(r))
        return 0
    sparsities = [float(s) for s in a.sweep.split(",")] if a.sweep else [a.sparsity]
    for s in sparsities:
        r = run_bench(a.model, a.img, a.batch, a.tasks, s, a.workdir, a.device,
                      act_sparsity=a.act_sparsity, threshold_mode=a.mode, repeats=a.repeats, warmup=a.warmup,
                      threads=a.threads, delta_gates=a.delta_gates, log=log)
        print(json.dumps(r) if a.format == "json" else format_table(r) + "\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
