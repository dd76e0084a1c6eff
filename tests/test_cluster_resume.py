"""Kill the driver after the base and one sub-task step (with another pipeline's step mid-way),
then ``resume``: finished stages are not re-run (checksums and MLflow runs unchanged), the
interrupted stage continues from its last mid-stage checkpoint, the rest completes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from cluster.cli import read_state, resume_suite

REPO = Path(__file__).resolve().parent.parent


def _wait_for(workdir: Path, proc: subprocess.Popen, ready, timeout: float = 300.0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"the driver exited early (rc {proc.returncode})"
        state_file = workdir / "store" / "state.json"
        if state_file.exists():
            state = json.loads(state_file.read_text())
            if ready({s["name"]: s for s in state["stages"]}):
                return state
        time.sleep(0.2)
    raise AssertionError("timed out waiting for the driver")


def test_kill_driver_then_resume(ray_local, tiny_suite, tmp_path):
    raw = tiny_suite("resume", tasks=["sal", "edge"], steps=["step1"], iters=4,
                     # long enough to be caught mid-way, with a resume checkpoint every 2 iterations
                     task_overrides={"edge": {"step1": {"iters": 60, "eval_every": 60}}})
    config = tmp_path / "resume.yaml"
    config.write_text(yaml.safe_dump(raw))
    workdir = tmp_path / "run"
    # The driver is a separate process on this module's Ray cluster: killing it (SIGKILL, no
    # cleanup) ends its Ray job, whose Train controllers and workers Ray then removes.
    address = ray_local.get_runtime_context().gcs_address
    log = open(tmp_path / "driver.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher", "run", str(config), "--workdir", str(workdir), "--address", address,
         "--no-progress"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    try:
        _wait_for(workdir, proc, lambda s: s["base"]["status"] == s["sal/step1"]["status"] == "done"
                  and (s["edge/step1"].get("checkpoint_iteration") or 0) >= 2)
    finally:
        proc.kill()
        proc.wait()
        log.close()
    before = {s["name"]: s for s in read_state(workdir)["stages"]}
    assert before["edge/step1"]["status"] == "running"  # as the killed driver left it

    assert resume_suite(workdir, progress=False) == 0
    state = read_state(workdir)
    after = {s["name"]: s for s in state["stages"]}
    assert state["state"] == "done" and all(s["status"] == "done" for s in after.values())
    for name in ("base", "sal/step1"):  # not re-run
        for key in ("checksum", "mlflow_run_id", "attempts", "started", "ended"):
            assert after[name][key] == before[name][key], (name, key)
    edge = after["edge/step1"]
    assert edge["mlflow_run_id"] == before["edge/step1"]["mlflow_run_id"]  # one MLflow run across attempts
    assert edge["attempts"] == before["edge/step1"]["attempts"] + 1
    result = json.loads((workdir / "store" / "edge/step1/result.json").read_text())
    assert (result["resumed_from"] or 0) >= 2 and result["iterations"] == 60, result  # continued, not restarted

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    runs = client.search_runs([state["mlflow_experiment_id"]])
    assert sorted(r.info.run_name for r in runs) == ["base", "edge/step1", "resume", "sal/step1"]
    assert all(r.info.status == "FINISHED" for r in runs)
    resumed = client.get_metric_history(edge["mlflow_run_id"], "resumed_from")
    assert resumed and resumed[0].value == result["resumed_from"]
