"""A sweep's figures, its Pareto fronts, the suggested operating points, and ``sweep pick``.

Every figure is the one the trial's suite serves: its last sharing step's operating point,
measured through the shared engine on the whole val split (``mtshare.operating_point``).

Per sub-task: the **Pareto front** of its finished trials (metric at the operating point vs
the FLOPs the engine executes per image: no other trial is at least as cheap and at least as
good, and better in one), and the **chosen** trial: the cheapest whose metric is within
``tolerance`` (relative) of the task's reference, which is its dense step0 model when the sweep
trained references, else its densest finished trial (lowest target, no row skipping).
"""
from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path

from mtshare.config import ConfigError
from mtshare.report import STEP_ORDER, build_report, load_results
from mtshare.stages import MODEL_FILE, plan

from cluster.sweep import ROW_OFF, load_sweep, sweep_trials, trial_config
from cluster.workdir import SUITE_FILE, local_store, read_state

DEFAULT_TOLERANCE = 0.01


def _trial_state(trial_dir: Path) -> dict | None:
    """A trial suite's state file, or None when the trial has not started."""
    if not (trial_dir / SUITE_FILE).exists():
        return None
    try:
        return read_state(trial_dir)
    except ConfigError:
        return None


def trial_figures(trial_dir: Path, trial: dict) -> dict:
    """A trial's state and, when it finished, its served figures."""
    out = {"trial": trial["name"], "task": trial["task"], "target": trial["target"],
           "row_density": trial["row_density"], "state": "pending", "error": None}
    state = _trial_state(trial_dir)
    if state is None:
        return out
    out.update(state=state.get("state"), error=state.get("error"))
    if out["state"] != "done":
        return out
    store = local_store(trial_dir)
    results = load_results(store)
    last = next((results[f"{trial['task']}/{k}"] for k in STEP_ORDER if f"{trial['task']}/{k}" in results), None)
    if last is None:
        return {**out, "state": "failed", "error": "no finished sharing step"}
    point = last.get("operating_point") or {}
    out.update(stage=last["stage"], metric_name=last["metric_name"], higher_is_better=last["higher_is_better"],
               value=point.get("value", last["metric"]), value_exact=point.get("value_exact", last["metric"]),
               weight_sparsity=last.get("delta_weight_sparsity"), rows_skipped=last.get("delta_activation_sparsity"),
               flops=last["flops"], dense_flops=last["dense_flops"], flops_ratio=last["flops"] / last["dense_flops"],
               params_stored=last["params_stored"],
               stored_bytes=(store / last["stage"] / MODEL_FILE).stat().st_size, tau=point.get("tau"))
    return out


def sweep_status(workdir: Path) -> dict:
    """Per trial: its suite's state and how many of its steps are done (``status`` of a sweep)."""
    workdir = Path(workdir)
    cfg, meta = load_sweep(workdir)
    out = []
    for t in sweep_trials(meta["tasks"], meta["targets"], meta["row_densities"]):
        trial_dir = workdir / "trials" / t["name"]
        entry = {"trial": t["name"], "state": None, "steps_done": 0, "steps": len(cfg.steps), "error": None}
        state = _trial_state(trial_dir)
        if state:
            entry.update(state=state.get("state"), error=state.get("error"),
                         steps_done=sum(s["status"] == "done" for s in state["stages"] if s["name"] != "base"))
        out.append(entry)
    return {"sweep": cfg.name, "trials": out}


def pareto_front(trials: list[dict]) -> list[dict]:
    """The finished trials no other one dominates (cheaper-or-equal FLOPs and better-or-equal
    metric, strictly in one), cheapest first."""
    def score(t):
        return t["value"] if t["higher_is_better"] else -t["value"]

    front = [p for p in trials if not any(
        q["flops"] <= p["flops"] and score(q) >= score(p) and (q["flops"] < p["flops"] or score(q) > score(p))
        for q in trials)]
    return sorted(front, key=lambda t: t["flops"])


def within(value: float, reference: float, higher_is_better: bool, tolerance: float) -> bool:
    loss = (reference - value) if higher_is_better else (value - reference)
    return loss <= (tolerance + 1e-12) * abs(reference)  # (1e-12: 1.0 - 0.99 is 0.0100000000000000009)


def sweep_report(workdir: Path, tolerance: float = DEFAULT_TOLERANCE) -> dict:
    """Trials, Pareto front and chosen trial per task (see the module docstring), plus the
    base suite's report (base and step0 references)."""
    workdir = Path(workdir)
    cfg, meta = load_sweep(workdir)
    base_dir = workdir / "base"
    base_results = load_results(local_store(base_dir)) if (base_dir / SUITE_FILE).exists() else {}
    trials = [trial_figures(workdir / "trials" / t["name"], t)
              for t in sweep_trials(meta["tasks"], meta["targets"], meta["row_densities"])]
    tasks = {}
    for task in meta["tasks"]:
        mine = [t for t in trials if t["task"] == task]
        done = [t for t in mine if t["state"] == "done"]
        ref = base_results.get(f"{task}/step0")
        if ref is not None:
            reference = {"kind": "step0", "stage": ref["stage"], "value": ref["metric"]}
        elif done:
            densest = min(done, key=lambda t: (t["target"], -t["row_density"]))
            reference = {"kind": "densest trial", "trial": densest["trial"], "value": densest["value"]}
        else:
            reference = None
        front = pareto_front(done)
        ok = [t for t in done if reference and within(t["value"], reference["value"], t["higher_is_better"], tolerance)]
        chosen = min(ok, key=lambda t: (t["flops"], -t["value"] if t["higher_is_better"] else t["value"]), default=None)
        tasks[task] = {"reference": reference, "trials": mine, "pareto": [t["trial"] for t in front],
                       "chosen": chosen, "tolerance": tolerance}
    report = build_report(base_results) if base_results else {"tasks": {}, "suite": {}}
    return {**report, "sweep": tasks, "trials": trials, "name": cfg.name}


def format_sweep(report: dict) -> str:
    lines = []
    for task, s in report["sweep"].items():
        ref = s["reference"]
        head = f"{task}: reference " + (f"{ref['kind']} {ref['value']:.4f}" if ref else "none (no finished trial)")
        lines.append(head + f"; tolerance {s['tolerance']:.1%}")
        lines.append(f"  {'trial':18s} {'state':8s} {'value':>8s} {'exact':>8s} {'δW sp':>6s} {'rows sk':>7s} "
                     f"{'GFLOPs':>8s} {'×dense':>6s} {'KiB':>7s}")
        for t in s["trials"]:
            if t["state"] != "done":
                lines.append(f"  {t['trial']:18s} {t['state'] or '-':8s} {(t.get('error') or '')[:70]}")
                continue
            mark = " <- chosen" if s["chosen"] and s["chosen"]["trial"] == t["trial"] else ""
            mark += " (pareto)" if t["trial"] in s["pareto"] else ""
            lines.append(f"  {t['trial']:18s} {'done':8s} {t['value']:8.4f} {t['value_exact']:8.4f} "
                         f"{t['weight_sparsity']:6.1%} {t['rows_skipped'] or 0:7.1%} {t['flops'] / 1e9:8.4f} "
                         f"{t['flops_ratio']:6.3f} {t['stored_bytes'] / 1024:7.1f}{mark}")
        if not s["chosen"]:
            lines.append(f"  no finished trial within {s['tolerance']:.1%} of the reference")
    lines.append("value: metric at the trial's operating point through the shared engine on the whole val split; "
                 "GFLOPs: executed per image (sub-task only); KiB: its stored checkpoint")
    return "\n".join(lines)


def write_sweep_plots(workdir: Path, report: dict) -> list[Path]:
    from mtshare.plots import pareto_plot

    out = Path(workdir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    return [pareto_plot(task, s, out / f"pareto_{task}.png") for task, s in report["sweep"].items()
            if any(t["state"] == "done" for t in s["trials"])]


# --- sweep pick ---------------------------------------------------------------------------------

def pick(workdir: Path, out: Path, tolerance: float = DEFAULT_TOLERANCE) -> Path:
    """Assemble a servable suite in ``out``: the sweep's base (and step0 references) and the
    chosen trial's steps of every sub-task, each checkpoint copied and verified against the
    checksum its suite recorded; a ``suite.json`` and a state file marking every stage done
    (``report``, ``infer``, ``bench --workdir`` and ``status`` read it like any suite), and
    ``picked.json`` saying where each part came from."""
    from cluster.state import StateBook, new_state
    from cluster.storage import LocalStorage
    from cluster.workdir import write_suite_file

    workdir, out = Path(workdir), Path(out)
    cfg, meta = load_sweep(workdir)
    report = sweep_report(workdir, tolerance)
    missing = [t for t, s in report["sweep"].items() if s["chosen"] is None]
    if missing:
        best = "; ".join(_closest(report["sweep"][t]) for t in missing)
        raise ConfigError(f"--tolerance: no finished trial of {', '.join(missing)} is within {tolerance:.1%} of its "
                          f"reference ({best}); raise --tolerance or finish the sweep")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out}: exists and is not empty")
    chosen = {t: s["chosen"] for t, s in report["sweep"].items()}
    overrides = {}
    for task, c in chosen.items():
        tcfg = trial_config(cfg, workdir, {"name": c["trial"], "task": task, "target": c["target"],
                                           "row_density": c["row_density"]})
        overrides[task] = tcfg.task_overrides[task]
    raw = cfg.model_dump(mode="json")
    raw.update(name=f"{cfg.name}.picked", tasks=list(chosen), storage=None, tracking_uri=None,
               task_overrides={**(raw.get("task_overrides") or {}), **overrides})
    from mtshare.config import validate_suite

    pcfg = validate_suite(raw, source="sweep pick")
    out.mkdir(parents=True, exist_ok=True)
    storage = LocalStorage(out / "store")
    state = new_state(pcfg.name, plan(pcfg))
    state["run_id"] = uuid.uuid4().hex
    book = StateBook(storage, state)
    sources = {"base": workdir / "base", **{f"{t}/step0": workdir / "base" for t in chosen if cfg.references}}
    for task, c in chosen.items():
        for kind in pcfg.steps:
            sources[f"{task}/{kind}"] = workdir / "trials" / c["trial"]
    specs = {s.name: s for s in plan(pcfg)}
    for name, src_dir in sources.items():
        src_state = read_state(src_dir)
        entry = next(s for s in src_state["stages"] if s["name"] == name)
        src = local_store(src_dir) / name
        for f in (MODEL_FILE, "result.json"):
            (out / "store" / name).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / f, out / "store" / name / f)
        if storage.sha256(f"{name}/{MODEL_FILE}") != entry["checksum"]:
            raise ConfigError(f"{src / MODEL_FILE}: checksum differs from its suite's state file; resume the sweep")
        book.update(name, save=False, **{k: entry.get(k) for k in ("status", "checksum", "started", "ended",
                                                                   "attempts", "node", "host", "inputs", "iteration")},
                    fingerprint=specs[name].fingerprint())
    book.update(save=False, state="done", started=time.time(), ended=time.time())
    write_suite_file(out, pcfg, storage, meta.get("config_path"), [], state["run_id"], None)
    book.save()
    picked = {"sweep": str(workdir.resolve()), "tolerance": tolerance,
              "chosen": {t: {k: c.get(k) for k in ("trial", "target", "row_density", "value", "value_exact",
                                                   "flops", "flops_ratio", "weight_sparsity", "rows_skipped")}
                         for t, c in chosen.items()},
              "reference": {t: s["reference"] for t, s in report["sweep"].items()}}
    (out / "picked.json").write_text(json.dumps(picked, indent=1))
    return out


def _closest(s: dict) -> str:
    done = [t for t in s["trials"] if t["state"] == "done"]
    if not done or not s["reference"]:
        return "no finished trial"
    ref = s["reference"]["value"]
    best = max(done, key=lambda t: t["value"] if t["higher_is_better"] else -t["value"])
    return f"best {best['trial']} {best['value']:.4f} vs {ref:.4f}, {abs(best['value'] - ref) / abs(ref):.1%} off"


__all__ = ["trial_figures", "pareto_front", "sweep_report", "format_sweep", "write_sweep_plots", "pick", "ROW_OFF"]
