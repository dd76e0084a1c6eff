"""The suite report: per task metric, Δ vs its dense step0 reference, delta sparsities, FLOPs and
parameters vs dense; suite totals and Δm.

Built from the ``result.json`` every finished stage leaves in the store. For a sub-task the
*shared* model is its last finished sharing step (step3 when the suite runs all steps), and its
figures are those of its operating point (``mtshare.operating_point``), measured through the
shared engine on the whole val split: ``value`` at the stored τ, ``value_exact`` at τ = 0,
``flops`` what the engine executed, ``delta_activation_sparsity`` the FLOPs-weighted fraction of
token rows it skipped. A sharing step without an operating point (a suite stopped before its
last step) is shown with dense FLOPs and ``value`` = its exact metric.
Δm averages over the sub-tasks that have a step0 reference (the base task is its own dense
model, its contribution would be 0 by construction).

A suite with a ``stream`` section (video, ``mtshare.stream``) adds per task ``stream``: the
metric streamed over the val sequences at the stored temporal τ (``value``) beside the engine
run frame by frame (``value_engine``), and both per-frame FLOPs; and ``suite.stream``: the
per-frame FLOPs of all tasks streamed vs frame by frame.
"""
from __future__ import annotations

import json
from pathlib import Path

from mtshare.metrics import delta_m

STEP_ORDER = ("step3", "step2", "step1")


def load_results(store: str | Path) -> dict[str, dict]:
    """Results by stage name ("base", "<task>/<kind>") found under a local store directory."""
    store = Path(store)
    out = {}
    for f in sorted(store.glob("**/result.json")):
        r = json.loads(f.read_text())
        out[r["stage"]] = r
    return out


def build_report(results: dict[str, dict]) -> dict:
    """The report object of the command-line contract (``report --format json``)."""
    tasks: dict[str, dict] = {}
    base = results.get("base")
    if base:
        tasks[base["task"]] = _row(base, None)
    sub_tasks = sorted({r["task"] for r in results.values() if r["kind"] != "base"})
    for t in sub_tasks:
        shared = next((results[f"{t}/{k}"] for k in STEP_ORDER if f"{t}/{k}" in results), None)
        ref = results.get(f"{t}/step0")
        if shared is None and ref is None:
            continue
        row = _row(shared, ref) if shared else _row(ref, ref)
        row["stage"] = shared["stage"] if shared else ref["stage"]
        tasks[t] = row
    suite = {
        "flops": sum(r["flops"] for r in tasks.values()),
        "dense_flops": sum(r["dense_flops"] for r in tasks.values()),
        "params_stored": sum(r["params_stored"] for r in tasks.values()),
        "params_dense": sum(r["params_dense"] for r in tasks.values()),
        "delta_m": None,
    }
    streams = {t: r["stream"] for t, r in tasks.items() if r.get("stream")}
    if streams and len(streams) == len(tasks):
        suite["stream"] = {"keyframe_every": next(iter(streams.values()))["keyframe_every"],
                           "flops": sum(v["flops"] for v in streams.values()),
                           "flops_engine": sum(v["flops_engine"] for v in streams.values())}
        suite["stream"]["flops_ratio"] = suite["stream"]["flops"] / max(suite["stream"]["flops_engine"], 1e-12)
    with_ref = {t: r for t, r in tasks.items() if r["reference"] is not None and r.get("stage", "").split("/")[-1] != "step0"}
    if with_ref:
        suite["delta_m"] = delta_m(
            {t: r["value"] for t, r in with_ref.items()},
            {t: r["reference"] for t, r in with_ref.items()},
            {t: r["higher_is_better"] for t, r in with_ref.items()},
        )
    return {"tasks": tasks, "suite": suite}


def _row(r: dict, ref: dict | None) -> dict:
    point = r.get("operating_point")
    row = {
        "metric": r["metric_name"], "higher_is_better": r["higher_is_better"],
        "value": point["value"] if point else r["metric"],
        "reference": ref["metric"] if ref else None,
        "delta_weight_sparsity": r.get("delta_weight_sparsity"),
        "delta_activation_sparsity": r.get("delta_activation_sparsity"),
        "flops": r["flops"], "dense_flops": r["dense_flops"],
        "params_stored": r["params_stored"], "params_dense": r["params_dense"],
        "stage": r["stage"],
        # how the reported value was computed: the val split shared by R ranks, pooled (None: an
        # older result that did not record it)
        "eval": (point.get("eval") if point else None) or r.get("eval"),
    }
    if r.get("stream"):
        row["stream"] = {k: v for k, v in r["stream"].items() if k != "calibration"}
    if r["kind"] in ("step1", "step2", "step3"):
        row["value_exact"] = point["value_exact"] if point else r["metric"]
        row["tau"] = point["tau"] if point else None
        row["plan"] = _plan(point)
    return row


def _plan(point: dict | None) -> str:
    """How the engine ran the sub-task's encoder linears on val: 'sparse', 'sparse, N% of layers
    merged', or 'dense' (no row skipped anywhere: sharing activations did not pay within the
    tolerance), or 'no operating point'. 'sparse (column blocks)': delta weights as dense column
    blocks (column gates) rather than CSR."""
    if not point:
        return "no operating point"
    merged = point["paths"].get("merged", 0.0)
    if merged >= 1.0 or not point["rows_skipped"]:
        return "dense"  # no layer skipped a row: only the delta weights are shared
    sparse = "sparse (column blocks)" if any(k.endswith("+cols") for k in point["paths"]) else "sparse"
    return sparse if merged == 0 else f"{sparse}, {100 * merged:.0f}% of layers merged"


def format_report(report: dict) -> str:
    """A fixed-width text table (what ``launcher report`` prints)."""
    def pct(x):
        return "-" if x is None else f"{100 * x:5.1f}%"

    def num(x):
        return "-" if x is None else f"{x:.4f}"

    head = (f"{'task':<12} {'stage':<12} {'metric':<6} {'value':>8} {'exact':>8} {'ref':>8} {'Δ ref':>8} {'δW sp':>7} "
            f"{'rows sk':>7} {'GFLOPs':>8} {'dense':>8} {'×dense':>6} {'params':>9} {'dense':>9}  plan")
    lines = [head, "-" * len(head)]
    for t, r in report["tasks"].items():
        ref = r["reference"]
        delta = "-" if ref is None else f"{r['value'] - ref:+.4f}"
        lines.append(
            f"{t:<12} {r.get('stage', ''):<12} {r['metric']:<6} {r['value']:>8.4f} {num(r.get('value_exact')):>8} "
            f"{num(ref):>8} {delta:>8} {pct(r['delta_weight_sparsity']):>7} {pct(r['delta_activation_sparsity']):>7} "
            f"{r['flops'] / 1e9:>8.4f} {r['dense_flops'] / 1e9:>8.4f} {r['flops'] / max(r['dense_flops'], 1e-12):>6.3f} "
            f"{r['params_stored']:>9,} {r['params_dense']:>9,}  {r.get('plan', 'dense (base)')}"
        )
    s = report["suite"]
    lines.append("-" * len(head))
    dm = "-" if s["delta_m"] is None else f"{s['delta_m']:+.2f}%"
    lines.append(
        f"suite: {s['flops'] / 1e9:.4f} GFLOPs/image vs {s['dense_flops'] / 1e9:.4f} dense "
        f"({s['flops'] / max(s['dense_flops'], 1e-12):.3f}x); params stored {s['params_stored']:,} vs "
        f"{s['params_dense']:,} dense ({s['params_stored'] / max(s['params_dense'], 1):.3f}x); Δm {dm}"
    )
    lines.append("sub-tasks: value at the operating point (stored τ) through the shared engine on the whole val "
                 "split; exact = τ 0; rows sk = token rows skipped (FLOPs-weighted); GFLOPs = executed per image")
    if "stream" in s:
        st = s["stream"]
        lines += ["", f"video stream (val sequences, keyframe every {st['keyframe_every']}; split = the block from which a "
                  f"sub-task streams on its own caches; per frame):",
                  f"{'task':<12} {'split':>5} {'streamed':>9} {'frame by frame':>15} {'rows recomp':>12} {'GFLOPs':>8} "
                  f"{'frame by frame':>15} {'ratio':>6}"]
        for t, r in report["tasks"].items():
            v = r["stream"]
            split = "-" if r["stage"] == "base" else v["split_layer"]  # the base has no split
            lines.append(f"{t:<12} {split:>5} {v['value']:>9.4f} {v['value_engine']:>15.4f} {pct(v['rows_recomputed']):>12} "
                         f"{v['flops'] / 1e9:>8.4f} {v['flops_engine'] / 1e9:>15.4f} "
                         f"{v['flops'] / max(v['flops_engine'], 1e-12):>6.3f}")
        lines.append(f"suite: {st['flops'] / 1e9:.4f} GFLOPs/frame streamed vs {st['flops_engine'] / 1e9:.4f} frame by "
                     f"frame ({st['flops_ratio']:.3f}x)")
    return "\n".join(lines)
