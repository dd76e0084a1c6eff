"""Report plots: accuracy vs FLOPs per task (dense step0 vs shared) and delta sparsity per layer."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mtshare import checkpoint as ckpt
from mtshare.report import STEP_ORDER


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def accuracy_vs_flops(results: dict[str, dict], path: str | Path) -> Path:
    """One subplot per sub-task: its metric against GFLOPs/image for step0 (dense), each sharing
    step, and the served operating point (engine at τ, and at τ = 0) of the last one; the base's
    cost not included."""
    plt = _plt()
    tasks = sorted({r["task"] for r in results.values() if r["kind"] != "base"})
    fig, axes = plt.subplots(1, max(len(tasks), 1), figsize=(3.4 * max(len(tasks), 1), 3.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for kind, marker in (("step0", "s"), *((k, "o") for k in reversed(STEP_ORDER))):
            r = results.get(f"{task}/{kind}")
            if r is None:
                continue
            point = r.get("operating_point")
            marks = [(kind, r["flops"], r["metric"], marker)] if not point else [
                (f"{kind} τ=0", point["flops_exact"], point["value_exact"], marker),
                (f"{kind} at τ", point["flops"], point["value"], "*")]
            for label, fl, value, m in marks:
                ax.scatter(fl / 1e9, value, marker=m, s=40, label=label)
                ax.annotate(label, (fl / 1e9, value), fontsize=7, xytext=(3, 3), textcoords="offset points")
        r = next((v for v in results.values() if v["task"] == task), None)
        ax.set_title(f"{task} ({r['metric_name']}, {'↑' if r['higher_is_better'] else '↓'})", fontsize=9)
        ax.set_xlabel("GFLOPs / image")
        ax.grid(alpha=0.3)
    return _save(fig, path)


def layer_sparsity(store: str | Path, results: dict[str, dict], path: str | Path) -> Path:
    """Fraction of zero delta entries per encoder tensor group (patch embed, then qkv / proj /
    fc1 / fc2 of each block), one line per sub-task's final sharing step."""
    plt = _plt()
    store = Path(store)
    fig, ax = plt.subplots(figsize=(8, 3.4))
    labels: list[str] = []
    for task in sorted({r["task"] for r in results.values() if r["kind"] != "base"}):
        stage = next((f"{task}/{k}" for k in STEP_ORDER if f"{task}/{k}" in results), None)
        if stage is None:
            continue
        tensors, manifest = ckpt.load_tensors(store / stage / "model.safetensors", None)
        names = [n for n in manifest["delta_shapes"] if n.endswith(".weight") and ("blocks" in n or "patch_embed" in n)
                 and "norm" not in n]
        sparsity = []
        for n in names:
            numel = int(np.prod(manifest["delta_shapes"][n]))
            sparsity.append(1.0 - tensors[f"delta.{n}.values"].numel() / numel)
        ax.plot(range(len(names)), sparsity, marker=".", label=task)
        labels = [n.replace("blocks.", "b").replace(".weight", "").replace("attn.", "").replace("mlp.", "") for n in names]
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
    ax.set_ylabel("delta sparsity")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def pareto_plot(task: str, sweep: dict, path: str | Path) -> Path:
    """A sweep's trials of one sub-task: metric at the operating point against executed GFLOPs
    per image, the Pareto front as a line, the reference with its tolerance band, the chosen
    trial circled. ``sweep``: one task's entry of ``cluster.sweep_report.sweep_report``."""
    plt = _plt()
    done = [t for t in sweep["trials"] if t["state"] == "done"]
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    for t in done:
        x = t["flops"] / 1e9
        ax.scatter(x, t["value"], s=36, color="tab:blue" if t["trial"] in sweep["pareto"] else "tab:gray", zorder=3)
        ax.annotate(t["trial"].split("-", 1)[1], (x, t["value"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    front = sorted((t for t in done if t["trial"] in sweep["pareto"]), key=lambda t: t["flops"])
    if front:
        ax.plot([t["flops"] / 1e9 for t in front], [t["value"] for t in front], color="tab:blue", lw=1,
                label="Pareto front")
    ref, tol = sweep["reference"], sweep["tolerance"]
    if ref:
        higher = done[0]["higher_is_better"] if done else True
        edge = ref["value"] * (1 - tol) if higher else ref["value"] * (1 + tol)
        ax.axhline(ref["value"], color="tab:green", lw=1, label=f"reference ({ref['kind']})")
        ax.axhspan(min(edge, ref["value"]), max(edge, ref["value"]), color="tab:green", alpha=0.12,
                   label=f"within {tol:.1%}")
    if sweep["chosen"]:
        c = sweep["chosen"]
        ax.scatter(c["flops"] / 1e9, c["value"], s=160, facecolors="none", edgecolors="tab:red", lw=1.5,
                   zorder=4, label=f"chosen: {c['trial']}")
    name = done[0]["metric_name"] if done else "metric"
    arrow = "↑" if (done[0]["higher_is_better"] if done else True) else "↓"
    ax.set_title(f"{task}: {name} ({arrow}) vs executed GFLOPs / image", fontsize=9)
    ax.set_xlabel("GFLOPs / image (sub-task, engine at its operating point)")
    ax.set_ylabel(f"{name} at the operating point (val)")
    ax.xaxis.set_major_locator(plt.MaxNLocator(5))
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)
