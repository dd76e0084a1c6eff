"""Sparsity sweeps: the Pareto front and the choice by hand, then ``launcher sweep`` end to end
with real Ray Tune (two trials at once), Ray Train + DeepSpeed and MLflow: one trial fails on
purpose (``tests/harness``), the other finishes; ``resume`` (the same sweep again) continues
the failed one and keeps the finished one; ``report`` shows the front; ``sweep pick`` assembles a suite that
``report``, ``infer`` and ``bench --workdir`` accept."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cluster.sweep_report import pareto_front, within
from conftest import CLUSTER_ENV, launcher_in_process

REPO = Path(__file__).resolve().parent.parent
HARNESS = REPO / "tests" / "harness"


def _t(name, flops, value, higher=True):
    return {"trial": name, "flops": flops, "value": value, "higher_is_better": higher}


def test_pareto_front_by_hand():
    trials = [_t("a", 10, 0.80), _t("b", 6, 0.78), _t("c", 6, 0.70), _t("d", 3, 0.60), _t("e", 8, 0.75),
              _t("f", 3, 0.60)]
    # c is beaten by b (same cost, better), e by b (cheaper, better); d and f tie: both stay
    assert [t["trial"] for t in pareto_front(trials)] == ["d", "f", "b", "a"]
    lower = [_t("a", 10, 8.0, False), _t("b", 5, 8.5, False), _t("c", 7, 9.0, False)]
    assert [t["trial"] for t in pareto_front(lower)] == ["b", "a"]  # c: dearer and worse than b


def test_within_tolerance_by_hand():
    assert within(0.99, 1.0, True, 0.01) and not within(0.989, 1.0, True, 0.01)
    assert within(8.08, 8.0, False, 0.01) and not within(8.09, 8.0, False, 0.01)  # error: lower is better
    assert within(1.2, 1.0, True, 0.0)  # better than the reference is always within


def _launcher(*args, env=None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher", *args], cwd=cwd or REPO, env=env, capture_output=True,
                          text=True, timeout=900)


def _stage(state: dict, name: str) -> dict:
    return next(s for s in state["stages"] if s["name"] == name)


def _state(trial_dir: Path) -> dict:
    return json.loads((trial_dir / "store" / "state.json").read_text())


def test_sweep_end_to_end(tiny_suite, tmp_path):
    raw = tiny_suite("tsweep", steps=["step1", "step2"], iters=4)  # (step3 runs like step2: two Ray Train stages fewer)
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    wd = tmp_path / "sw"
    env = {**os.environ, **CLUSTER_ENV, "PYTHONPATH": os.pathsep.join([str(HARNESS), str(REPO)])}
    argv = ["sweep", str(cfg), "--workdir", str(wd), "--targets", "0.5,0.9", "--no-progress"]

    first = _launcher(*argv, env={**env, "MTSHARE_FAIL_STAGE": "tsweep.sal-w0.9:sal/step2"})
    out = first.stdout + first.stderr
    assert first.returncode == 1, out[-3000:]
    assert "2 trials, up to 2 at once" in out
    assert "1 trial(s) failed: sal-w0.9" in out and "injected failure" in out
    ok, bad = _state(wd / "trials/sal-w0.5"), _state(wd / "trials/sal-w0.9")
    assert ok["state"] == "done" and bad["state"] == "failed"
    assert [_stage(bad, n)["status"] for n in ("base", "sal/step1", "sal/step2")] == ["done", "done", "failed"]
    # both trials ran at once: each one's step1 started before the other's ended
    a, b = _stage(ok, "sal/step1"), _stage(bad, "sal/step1")
    assert a["started"] < b["ended"] and b["started"] < a["ended"]
    # the base was trained once and imported into each trial, verified by its checksum
    base = _stage(json.loads((wd / "base/store/state.json").read_text()), "base")["checksum"]
    assert _stage(ok, "base")["checksum"] == _stage(bad, "base")["checksum"] == base

    status = launcher_in_process("status", "--workdir", str(wd), "--format", "json")
    assert [(t["trial"], t["state"], t["steps_done"]) for t in json.loads(status.stdout)["trials"]] == \
        [("sal-w0.5", "done", 2), ("sal-w0.9", "failed", 1)]

    kept = {n: _stage(ok, n)["ended"] for n in ("sal/step1", "sal/step2")}
    bad_step1 = _stage(bad, "sal/step1")["ended"]
    second = _launcher("resume", "--workdir", str(wd), "--no-progress", env=env)  # = the same sweep command
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-3000:]
    ok, bad = _state(wd / "trials/sal-w0.5"), _state(wd / "trials/sal-w0.9")
    assert bad["state"] == "done"
    assert {n: _stage(ok, n)["ended"] for n in kept} == kept  # the finished trial was not re-run
    assert _stage(bad, "sal/step1")["ended"] == bad_step1  # the failed trial resumed after its step1

    # MLflow: the sweep's run, the base suite and both trials nested under it
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{wd / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tsweep")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    sweep_id = runs["tsweep"].info.run_id
    for name in ("tsweep.base", "tsweep.sal-w0.5", "tsweep.sal-w0.9"):
        assert runs[name].data.tags["mlflow.parentRunId"] == sweep_id
    trial = runs["tsweep.sal-w0.9"]
    assert trial.data.params["sweep.target_weight_sparsity"] == "0.9"
    for key in ("value", "value_exact", "weight_sparsity", "rows_skipped", "flops", "stored_bytes"):
        assert key in trial.data.metrics, key
    assert trial.data.metrics["weight_sparsity"] >= 0.9 - 1e-6
    assert {a.path for a in client.list_artifacts(sweep_id, "report")} == {"report/pareto_sal.png"}

    rep = launcher_in_process("report", "--workdir", str(wd), "--format", "json")
    assert rep.returncode == 0, rep.stderr[-2000:]
    sweep = json.loads(rep.stdout)["sweep"]["sal"]
    assert [t["state"] for t in sweep["trials"]] == ["done", "done"]
    assert sweep["reference"]["kind"] == "densest trial" and sweep["reference"]["trial"] == "sal-w0.5"
    chosen = sweep["chosen"]
    assert chosen["trial"] in sweep["pareto"]
    assert within(chosen["value"], sweep["reference"]["value"], True, 0.01)
    assert (wd / "report/pareto_sal.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    picked = tmp_path / "picked"
    pk = launcher_in_process("sweep", "pick", "--workdir", str(wd), "--out", str(picked))
    assert pk.returncode == 0, pk.stderr[-2000:]
    rep = launcher_in_process("report", "--workdir", str(picked), "--format", "json")
    assert rep.returncode == 0, rep.stderr[-2000:]
    row = json.loads(rep.stdout)["tasks"]["sal"]
    assert row["stage"] == "sal/step2" and row["flops"] == pytest.approx(chosen["flops"])
    image = next(Path(raw["dataset"]["root"]).glob("JPEGImages/*.jpg"))
    inf = launcher_in_process("infer", "--workdir", str(picked), "--images", str(image), "--out", str(tmp_path / "inf"))
    assert inf.returncode == 0, inf.stderr[-2000:]
    assert (tmp_path / "inf" / image.stem / "panel.png").is_file()
    bench = launcher_in_process("bench", "--workdir", str(picked), "--batch", "2", "--format", "json")
    assert bench.returncode == 0, bench.stderr[-2000:]
    assert "sal" in json.dumps(json.loads(bench.stdout))
