"""The demo-shaped suite, smaller, on a local Ray (real Ray Train, DeepSpeed, MLflow) end to
end (S3 storage: test_cluster_multinode.py; 2 workers per stage: test_multiworker.py)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cluster.progress import show_status
from cluster.run import run_suite
from cluster.workdir import read_state
from cluster.state import SCHEMA_KEYS
from mtshare import checkpoint as ckpt
from mtshare.config import validate_suite


def _cfg(raw: dict, workdir: Path):
    return validate_suite(raw, workdir=str(workdir))


@pytest.fixture(scope="module")
def finished_suite(ray_local, tiny_suite, tmp_path_factory):
    """Base + one sub-task (step1 → step2) + its step0 reference, one worker per stage. Run the
    way `make demo` runs: work directory and dataset root *relative* to the current directory
    (Ray Train workers run in another directory: paths must be made absolute before they go)."""
    here = tmp_path_factory.mktemp("suite")
    raw = tiny_suite("e2e", tasks=["sal"], steps=["step1", "step2"], references=True)
    relative = {**raw, "dataset": {**raw["dataset"], "root": os.path.relpath(raw["dataset"]["root"], here)}}
    cwd = os.getcwd()
    os.chdir(here)
    try:
        rc = run_suite(_cfg(relative, Path("run")), Path("run"), config_path="tiny.yaml", overrides=[], progress=False)
    finally:
        os.chdir(cwd)
    return rc, raw, here / "run"


def test_suite_end_to_end_state_mlflow_and_checkpoints_agree(finished_suite, capsys):
    rc, _, workdir = finished_suite
    assert rc == 0
    state = read_state(workdir)
    stages = {s["name"]: s for s in state["stages"]}
    assert state["state"] == "done" and set(stages) == {"base", "sal/step0", "sal/step1", "sal/step2"}
    store = workdir / "store"
    for name, st in stages.items():
        assert st["status"] == "done" and st["attempts"] >= 1 and st["node"] and st["error"] is None
        assert st["started"] < st["ended"]
        model = store / name / "model.safetensors"
        result = json.loads((store / name / "result.json").read_text())
        assert st["checksum"] == ckpt.sha256_file(model) == result["checksum"]
        assert not (store / name / "resume.json").exists()  # finished: no resume pointer is left
    assert not (store / "_checkpoints").exists()  # the suite is done: no resume state is kept
    # One Ray Train run per pipeline: sal's sharing steps share one, each other stage has its own.
    assert stages["sal/step1"]["run"] == stages["sal/step2"]["run"]
    assert len({st["run"] for st in stages.values()}) == 3
    # Inputs were verified against the committed checksums of their producers.
    assert stages["sal/step1"]["inputs"]["base"]["sha256"] == stages["base"]["checksum"]
    assert stages["sal/step2"]["inputs"]["prev"]["sha256"] == stages["sal/step1"]["checksum"]
    assert stages["sal/step0"]["inputs"] == {}  # the reference needs nothing from the base
    base_sha = stages["base"]["checksum"]
    ckpt.load_subtask(store / "sal/step2/model.safetensors", base_sha256=base_sha)  # a consistent chain

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    parent = client.get_run(state["mlflow_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.params["name"] == "e2e"
    assert "suite.yaml" in [a.path for a in client.list_artifacts(parent.info.run_id)]
    for name, st in stages.items():
        run = client.get_run(st["mlflow_run_id"])
        assert run.info.run_name == name and run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["mtshare.checksum"] == st["checksum"]
        assert len(client.get_metric_history(run.info.run_id, "loss")) >= 2  # per step, from rank 0
        assert {"flops", "dense_flops", "params_stored"} <= set(run.data.metrics)
        # rank 0's machine while the step trained, under MLflow's own system-metric names
        assert {"system/cpu_utilization_percentage", "system/process_memory_usage_megabytes"} <= set(run.data.metrics)
    assert "delta_sparsity" in client.get_run(stages["sal/step1"]["mlflow_run_id"]).data.metrics

    capsys.readouterr()
    assert show_status(workdir, fmt="json") == 0
    status = json.loads(capsys.readouterr().out)
    assert set(status) == {"suite", "state", "stages"} and status["state"] == "done"
    assert all(tuple(s) == SCHEMA_KEYS for s in status["stages"])
    assert show_status(workdir, fmt="table") == 0
