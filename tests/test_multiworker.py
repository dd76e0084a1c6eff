"""A sub-task pipeline on 2 Ray Train workers, end to end: step1 → step2 → step3 in one Ray
Train run (DeepSpeed ZeRO-2, gloo), a failure in the middle of step2 and ``resume`` from its
mid-step checkpoint, then a step3 whose calibration takes longer than the stage's collective
timeout, which finishes because every rank calibrates and evaluates its own share. The figures
of the 2-rank step3 are those one process computes on the same checkpoint.

Real Ray (started by the launcher), Ray Train, DeepSpeed, MLflow; faults from ``tests/harness``."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import CLUSTER_ENV, launcher_in_process

REPO = Path(__file__).resolve().parent.parent
HARNESS = REPO / "tests" / "harness"
TIMEOUT_S = 20  # resources.collective_timeout_s of the suite
SLOW_S = 25     # the injected calibration delay: longer than the timeout


def _launcher(*args, env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=1200)


def _stages(workdir: Path) -> dict[str, dict]:
    return {s["name"]: s for s in json.loads((workdir / "store" / "state.json").read_text())["stages"]}


@pytest.fixture(scope="module")
def two_worker_suite(tiny_suite, tmp_path_factory):
    """Base + edge step1 → step3, 2 workers per stage. The first launch: rank 1 dies at step2's
    iteration 5 (after its checkpoints at 2 and 4) and Ray Train restarts the group from one; step3 then fails (StageFailure). ``resume`` runs step3 alone, its calibration
    slowed past the collective timeout."""
    tmp = tmp_path_factory.mktemp("multiworker")
    raw = tiny_suite("mw", tasks=["edge"], steps=["step1", "step2", "step3"], iters=4,
                     resources={"workers": 2, "cpus_per_worker": 1, "collective_timeout_s": TIMEOUT_S},
                     calibration={"tolerance": 0.05, "plan": "flops"})
    raw["dataset"]["holdout"] = 5  # shares of 3 and 2; the halves split rank 0's share
    raw["train"]["step2"].update(iters=8, eval_every=8)  # checkpoints at 2, 4, 6: one is taken in before 5
    cfg = tmp / "mw.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    workdir = tmp / "run"
    env = {**os.environ, **CLUSTER_ENV, "PYTHONPATH": os.pathsep.join([str(HARNESS), str(REPO)])}
    first = _launcher("run", str(cfg), "--workdir", str(workdir), "--no-progress",
                      env={**env, "MTSHARE_CRASH_STAGE": f"mw:edge/step2@5:{tmp / 'crashed'}",
                           "MTSHARE_FAIL_STAGE": "mw:edge/step3"})
    before = _stages(workdir)
    second = _launcher("resume", "--workdir", str(workdir), "--no-progress",
                       env={**env, "MTSHARE_SLOW_CALIBRATION": str(SLOW_S)})
    return first, before, second, raw, workdir


def test_two_worker_chain_resumes_mid_step_and_outlasts_the_collective_timeout(two_worker_suite):
    first, before, second, raw, workdir = two_worker_suite
    out = first.stdout + first.stderr
    assert first.returncode == 1, out[-3000:]
    assert [before[n]["status"] for n in ("base", "edge/step1", "edge/step2", "edge/step3")] == \
        ["done", "done", "done", "failed"]
    assert "injected failure" in before["edge/step3"]["error"]
    # step1 → step2 → step3 in one Ray Train run; the worker lost mid-step2 cost one restart,
    # from a mid-step checkpoint (both ranks' ZeRO shards; Ray Train holds the one before the
    # latest surely: the one at 2 or at 4)
    assert before["edge/step1"]["run"] == before["edge/step2"]["run"] == before["edge/step3"]["run"]
    assert before["edge/step2"]["attempts"] == 2
    assert json.loads((workdir / "store/edge/step2/result.json").read_text())["resumed_from"] in (2, 4)

    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-3000:]
    after = _stages(workdir)
    assert all(st["status"] == "done" for st in after.values())
    for name in ("base", "edge/step1", "edge/step2"):  # not re-run
        assert after[name]["ended"] == before[name]["ended"]
    from mtshare import checkpoint as ckpt

    for name, st in after.items():  # every stage: 2 ZeRO-2 ranks that end with identical weights
        assert st["world_size"] == 2, name
        assert st["stepper"] == {"class": "DeepSpeedStepper", "optimizer": "DeepSpeedZeroOptimizer", "zero_stage": 2}
        assert len(st["param_digests"]) == 2 and st["param_digests"][0] == st["param_digests"][1], name
        assert ckpt.sha256_file(workdir / "store" / name / "model.safetensors") == st["checksum"], name
    deltas, _, manifest = ckpt.load_subtask(workdir / "store/edge/step3/model.safetensors",
                                            base_sha256=after["base"]["checksum"])  # a consistent chain
    assert deltas and manifest["iteration"] == raw["train"]["step3"]["iters"]
    store = workdir / "store"
    step3 = json.loads((store / "edge/step3/result.json").read_text())
    # The calibration took longer than one collective may wait: every rank calibrated.
    assert step3["phase_seconds"]["calibrate"] > TIMEOUT_S
    assert {"calibrate", "val_at_tau", "val_exact", "figures"} <= set(step3["phase_seconds"])
    # rank 0's phase events reached the driver's state file (what `status` shows while it runs)
    assert after["edge/step3"]["phase"] == {"phase": "val_exact", "done": 3, "total": 3, "ranks": 2}
    n_val = len((Path(raw["dataset"]["root"]) / "ImageSets/Context/val.txt").read_text().split())
    point = step3["operating_point"]
    assert point["eval"] == {"ranks": 2, "images_per_rank": [n_val - n_val // 2, n_val // 2]}
    assert point["calibration"]["eval"] == {"ranks": 2, "images_per_rank": [3, 2]}
    for name in ("edge/step1", "edge/step2"):  # the in-training evaluation, shared the same way
        assert json.loads((store / name / "result.json").read_text())["eval"]["ranks"] == 2

    report = launcher_in_process("report", "--workdir", str(workdir), "--format", "json")
    assert report.returncode == 0, report.stderr
    edge = json.loads(report.stdout)["tasks"]["edge"]
    assert edge["eval"]["ranks"] == 2 and sum(edge["eval"]["images_per_rank"]) == n_val
    assert edge["value"] == point["value"]

    from mlflow.tracking import MlflowClient

    run = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}").get_run(after["edge/step3"]["mlflow_run_id"])
    assert run.data.metrics["time_calibrate_s"] > TIMEOUT_S  # the phase durations, on the stage's run


def test_two_rank_figures_equal_one_process_on_the_same_checkpoint(two_worker_suite):
    """Re-calibrate and re-evaluate the 2-worker step3's checkpoint in this one process: the
    same τ (up to the BLAS's rounding) and the same figures (meter states are pooled exactly;
    τ are fitted on the gathered rows of the whole holdout, the plan on its pooled row count)."""
    from torch.utils.data import DataLoader

    from mtshare import checkpoint as ckpt
    from mtshare import operating_point as op
    from mtshare.data import build_dataset
    from mtshare.engine import SharedEngine, SparsePolicy
    from mtshare.stages import StageSpec
    from mtshare.train import holdout_set

    *_, workdir = two_worker_suite
    store = workdir / "store"
    manifest = ckpt.read_manifest(store / "edge/step3/model.safetensors")
    spec = StageSpec(**manifest["spec"])
    stored = manifest["operating_point"]
    engine = SharedEngine.from_checkpoints(store / "base/model.safetensors",
                                           {"edge": store / "edge/step3/model.safetensors"},
                                           policy=SparsePolicy.for_plan(spec.calibration.plan))
    bs, d = spec.optim.batch_size, spec.dataset
    calib = op.stack(DataLoader(holdout_set(spec), batch_size=bs), "edge")
    val = build_dataset(d.name, d.root, "val", ["edge"], train=False, img_size=d.img_size)
    cal = spec.calibration
    point = op.operating_point(engine, "edge", calib, DataLoader(val, batch_size=bs), d.name, cal.tolerance,
                               cal.margin, cal.steps, op.meter_options("edge", spec.optim.edge_thresholds),
                               cal.per_layer)
    assert stored["tau"], "the flops plan keeps some τ on this model: the test must compare thresholds"
    # τ: fitted on the same rows gathered from both ranks, but those rows come out of GEMMs of
    # other shapes (a rank's share, its kept rows), and the BLAS rounds a GEMM of a few rows
    # differently (M <= ~10 on this CPU): the same as changing the batch size in one process.
    assert point["tau"].keys() == stored["tau"].keys()
    for name, tau in stored["tau"].items():
        assert point["tau"][name] == pytest.approx(tau, rel=1e-5), name
    for key in ("value", "value_exact"):  # meter states are counts: pooled exactly
        assert point[key] == stored[key], key
    for key in ("flops", "flops_exact", "rows_skipped"):  # float sums, added in another order
        assert point[key] == pytest.approx(stored[key], rel=1e-12), key
    for key in ("metric", "metric_exact", "row_density"):
        assert point["calibration"][key] == stored["calibration"][key], key
    assert point["eval"] == {"ranks": 1, "images_per_rank": [len(val)]}
