"""The demo-shaped suite, smaller, on a local Ray (real Ray Train, DeepSpeed, MLflow): end to
end, every stage on 2 workers with DeepSpeed ZeRO-2 (S3 storage: test_cluster_multinode.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.cli import read_state, run_suite, show_status
from cluster.state import SCHEMA_KEYS
from mtshare import checkpoint as ckpt
from mtshare.config import validate_suite

REPO = Path(__file__).resolve().parent.parent


def _cfg(raw: dict, workdir: Path):
    return validate_suite(raw, workdir=str(workdir))


@pytest.fixture(scope="module")
def finished_suite(ray_local, tiny_suite, tmp_path_factory):
    """A demo-shaped suite, smaller: base + one sub-task (step1 → step2) + its step0 reference,
    every stage on 2 Ray Train workers with DeepSpeed ZeRO-2."""
    workdir = tmp_path_factory.mktemp("suite") / "run"
    # Half a CPU per worker: the base and the step0 reference (2 workers each) run side by side.
    raw = tiny_suite("e2e", tasks=["sal"], steps=["step1", "step2"], references=True,
                     resources={"workers": 2, "cpus_per_worker": 0.5})
    rc = run_suite(_cfg(raw, workdir), workdir, config_path="tiny.yaml", overrides=[], progress=False)
    return rc, workdir


def test_suite_end_to_end_state_mlflow_and_checkpoints_agree(finished_suite, capsys):
    rc, workdir = finished_suite
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
        assert not (store / name / "resume.pt").exists()  # finished: the resume state is gone
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
    assert "delta_sparsity" in client.get_run(stages["sal/step1"]["mlflow_run_id"]).data.metrics

    capsys.readouterr()
    assert show_status(workdir, fmt="json") == 0
    status = json.loads(capsys.readouterr().out)
    assert set(status) == {"suite", "state", "stages"} and status["state"] == "done"
    assert all(tuple(s) == SCHEMA_KEYS for s in status["stages"])
    assert show_status(workdir, fmt="table") == 0


def test_two_worker_stages_train_with_zero2_and_ranks_agree(finished_suite):
    """Every stage kind (dense base/step0; δ + gates incl. 0-dim per-tensor logits in step1;
    masked δ with frozen gates in step2) on 2 workers: ZeRO-2 engine, identical weights on both."""
    _, workdir = finished_suite
    for st in read_state(workdir)["stages"]:
        assert st["world_size"] == 2, st["name"]
        assert st["stepper"] == {"class": "DeepSpeedStepper", "optimizer": "DeepSpeedZeroOptimizer",
                                 "zero_stage": 2}, st["name"]
        digests = st["param_digests"]
        assert len(digests) == 2 and digests[0] == digests[1], st["name"]
