"""Faults a multi-day suite must survive (issue 6), each injected by the test itself on real
components: local Ray + Ray Train + DeepSpeed (gloo, CPU), MLflow, local and S3 (moto) storage.

1. SIGKILL of a Ray Train worker mid-stage: Ray Train restarts the group, the stage continues
   from its last mid-stage checkpoint, the state file counts the extra attempt.
2. SIGKILL of the driver mid-stage: ``resume`` finishes the suite, finished stages keep their
   checksums and MLflow runs, the interrupted stage continues from its last checkpoint.
3. a truncated finished checkpoint: consumers refuse it, resume re-runs it and its downstream.
4. NaN loss in one sub-task: its stage fails fast naming task, step and iteration; the other
   pipeline finishes; the suite ends failed; resume after the fix runs only what is left.
5. storage full / unavailable for a write (``tests/storage_faults.py`` through
   ``MTSHARE_STORAGE_FAULTS``): nothing partial is ever visible under a final name; a blip on
   a local/NFS directory is retried, a lasting failure fails the stage with a message naming
   the file.
6. two suites at once on one Ray cluster, one storage root and one MLflow server.
7. resume after completion changes nothing.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

import storage_faults
from cluster import storage as storage_mod
from cluster.run import resume_suite, run_suite
from cluster.workdir import read_state
from cluster.storage import StorageError, open_storage
from mtshare.checkpoint import TMP_MARK
from mtshare.config import validate_suite
from storage_faults import RULES_ENV as FAULTS_ENV

REPO = Path(__file__).resolve().parent.parent


def _stages(workdir: Path) -> dict[str, dict]:
    return {s["name"]: s for s in read_state(workdir)["stages"]}


def _tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` → sha256 (what "nothing changed" compares)."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _tmp_leftovers(root: Path) -> list[str]:
    return [p.name for p in root.rglob("*") if TMP_MARK in p.name]


@pytest.fixture
def fault_rules(tmp_path, monkeypatch):
    """Arms fault injection in this process: ``arm([...rules])``; hit records come back from ``hits()``."""
    rules = tmp_path / "faults.json"
    rules.write_text("[]")
    monkeypatch.setenv(FAULTS_ENV, str(rules))
    monkeypatch.setattr(storage_mod, "WRITE_BACKOFF_S", 0.01)
    storage_faults.install(storage_mod, monkeypatch.setattr)

    class Rules:
        path = rules

        @staticmethod
        def arm(items: list[dict]) -> None:
            rules.write_text(json.dumps(items))

        @staticmethod
        def hits() -> list[dict]:
            d = rules.with_name(rules.name + ".hits")
            return [json.loads(p.read_text()) for p in sorted(d.glob("*.json"))] if d.is_dir() else []

    return Rules


# --- 5. storage faults, at the storage layer (local and S3) ----------------------------------

@pytest.mark.parametrize("backend", ["local", "s3"])
def test_failed_writes_never_leave_a_partial_file_under_the_final_name(backend, fault_rules, tmp_path, request):
    if backend == "s3":
        import boto3

        endpoint = request.getfixturevalue("moto_endpoint")
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="faults")
        storage = open_storage("s3://faults/area", endpoint=endpoint)
    else:
        storage = open_storage(str(tmp_path / "area"))
    old = os.urandom(3 * storage_mod.CHUNK // 2)
    storage.write_bytes("stage/model.safetensors", old)
    new = os.urandom(3 * storage_mod.CHUNK)
    src = tmp_path / "new.bin"
    src.write_bytes(new)
    # One failure in the middle of the upload. A local/NFS write is retried by the storage: the
    # new bytes land whole. S3 requests are retried inside pyarrow (its AWS retry strategy),
    # below where this fault is injected: the write fails, and the old object stays whole.
    fault_rules.arm([{"key": "stage/*.safetensors", "error": "unavailable", "times": 1,
                      "after_bytes": storage_mod.CHUNK + 7}])
    if backend == "local":
        storage.put(src, "stage/model.safetensors")
        assert storage.read_bytes("stage/model.safetensors") == new
    else:
        with pytest.raises(StorageError, match=r"stage/model\.safetensors.*Input/output error"):
            storage.put(src, "stage/model.safetensors")
        assert storage.read_bytes("stage/model.safetensors") == old
        storage.put(src, "stage/model.safetensors")
    (hit,) = fault_rules.hits()
    assert hit["visible_after_failure"] is True and "Input/output error" in hit["error"]

    # Storage full for good: the write fails naming the key; the old file is intact, no debris.
    attempts = storage.write_attempts
    fault_rules.arm([{"key": "stage/*", "error": "full", "times": 10, "after_bytes": 100}])
    with pytest.raises(StorageError, match=r"stage/model\.safetensors.*No space left on device"):
        storage.put(src, "stage/model.safetensors")
    with pytest.raises(StorageError, match=r"stage/fresh\.bin.*No space left"):
        storage.write_bytes("stage/fresh.bin", b"x" * 1000)
    assert storage.read_bytes("stage/model.safetensors") == new
    assert not storage.exists("stage/fresh.bin")
    assert [h["visible_after_failure"] for h in fault_rules.hits()[1:]] == [True] * attempts + [False] * attempts
    if backend == "local":
        assert _tmp_leftovers(tmp_path / "area") == []
    else:
        from pyarrow import fs as pafs

        raw = storage.fs.get_file_info(pafs.FileSelector("faults/area", recursive=True))
        assert sorted(i.base_name for i in raw if i.type == pafs.FileType.File) == ["model.safetensors"]


def test_lasting_storage_failure_fails_only_its_stage_then_resume(fault_rules, tiny_suite, tmp_path):
    """In-process executor (no Ray): a sub-task whose output cannot be written fails clearly, the
    others finish, and once storage is back ``resume`` runs only that stage."""
    workdir = tmp_path / "run"
    raw = tiny_suite("full", tasks=["sal", "edge"], steps=["step1"], iters=2)
    fault_rules.arm([{"key": "edge/step1/model.safetensors", "error": "full", "times": 99, "after_bytes": 64}])
    assert run_suite(validate_suite(raw, workdir=str(workdir)), workdir, progress=False, executor="inprocess") == 1
    state = read_state(workdir)
    stages = {s["name"]: s for s in state["stages"]}
    assert stages["edge/step1"]["status"] == "failed"
    assert "edge/step1/model.safetensors" in stages["edge/step1"]["error"]
    assert "No space left on device" in stages["edge/step1"]["error"]
    assert stages["base"]["status"] == stages["sal/step1"]["status"] == "done"
    assert not (workdir / "store/edge/step1/model.safetensors").exists()
    assert _tmp_leftovers(workdir / "store") == []
    assert all(h["visible_after_failure"] is False for h in fault_rules.hits())

    fault_rules.arm([])  # the disk has room again
    before = {n: stages[n]["ended"] for n in ("base", "sal/step1")}
    assert resume_suite(workdir, executor="inprocess", progress=False) == 0
    after = _stages(workdir)
    assert all(s["status"] == "done" for s in after.values())
    assert {n: after[n]["ended"] for n in before} == before


# --- 1, 3, 4, 5, 7 on Ray ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_with_faults(tmp_path_factory):
    """Local Ray whose workers see ``MTSHARE_STORAGE_FAULTS`` (they inherit the environment at
    start); the rules file starts empty."""
    rules = tmp_path_factory.mktemp("faults") / "faults.json"
    rules.write_text("[]")
    saved = os.environ.get("PYTHONPATH")
    os.environ[FAULTS_ENV] = str(rules)
    # tests/harness/sitecustomize.py installs the injection in every process started from here
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(storage_faults.HARNESS), saved) if p)
    patch = pytest.MonkeyPatch()
    storage_faults.install(storage_mod, patch.setattr)  # and in this process (the driver)
    try:
        yield rules
    finally:
        patch.undo()
        os.environ.pop(FAULTS_ENV, None)
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


@pytest.fixture(scope="module")
def ray_cluster(ray_with_faults, ray_local):
    return ray_local


def _run_in_thread(fn, *args, **kwargs) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def target():
        try:
            box["rc"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - surfaced by the test
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def _wait(workdir: Path, alive, ready, timeout: float = 400.0) -> dict[str, dict]:
    """Poll the state file until ``ready(stages)``; ``alive()`` must hold meanwhile."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert alive(), "the driver finished before the fault could be injected"
        if (workdir / "store" / "state.json").exists():
            stages = _stages(workdir)
            if ready(stages):
                return stages
        time.sleep(0.1)
    raise AssertionError("timed out waiting for the stage to reach the fault point")


def test_worker_kill_nan_storage_blip_driver_kill_corruption_and_idempotent_resume(
        ray_cluster, ray_with_faults, tiny_suite, tmp_path, monkeypatch, capsys):
    """Faults 1, 2, 3, 4, 5 and 7 in one suite's life (each Ray Train run costs ~15 s of start-up
    here, so they share runs); downstream re-runs after corruption: test_cluster_units.py."""
    monkeypatch.setattr(storage_mod, "WRITE_BACKOFF_S", 0.01)
    rules, hits_dir = ray_with_faults, ray_with_faults.with_name(ray_with_faults.name + ".hits")
    # One failed write of the base's weights, in the middle of the upload (fault 5, retried).
    rules.write_text(json.dumps([{"key": "base/model.safetensors", "error": "full", "times": 1, "after_bytes": 512}]))
    workdir = tmp_path / "run"
    long = {"iters": 60, "eval_every": 60, "ckpt_every": 4}  # long enough to be caught mid-way
    raw = tiny_suite("faults", tasks=["sal", "edge"], steps=["step1", "step2"], iters=2,
                     task_overrides={"sal": {"step2": long},
                                     "edge": {"step1": {**long, "fail_at_iter": 2}}})  # fault 4: NaN at iteration 2
    cfg = validate_suite(raw, workdir=str(workdir))
    thread, box = _run_in_thread(run_suite, cfg, workdir, progress=False)

    # Fault 1: SIGKILL the rank-0 Ray Train worker of sal's pipeline once step2 (step1 committed
    # by the same Ray Train run) has a mid-stage checkpoint.
    seen = _wait(workdir, thread.is_alive, lambda s: (s["sal/step2"].get("checkpoint_iteration") or 0) >= 8
                 and s["sal/step2"].get("worker_pid"))
    st, step1 = seen["sal/step2"], seen["sal/step1"]
    assert step1["status"] == "done" and step1["run"] == st["run"]
    killed_at = st["checkpoint_iteration"]
    os.kill(st["worker_pid"], signal.SIGKILL)
    thread.join(600)
    assert not thread.is_alive() and "error" not in box, box
    assert box["rc"] == 1  # edge failed

    state = read_state(workdir)
    stages = {s["name"]: s for s in state["stages"]}
    sal = stages["sal/step2"]
    result = json.loads((workdir / "store/sal/step2/result.json").read_text())
    assert sal["status"] == "done" and sal["attempts"] == 2, sal  # the state file records the restart
    assert killed_at <= result["resumed_from"] < 60 and result["iterations"] == 60, result  # in step2, not from 0
    assert sal["worker_pid"] != st["worker_pid"]
    # The restart went on in step2: step1 kept its commit, its checkpoint and its MLflow run.
    assert {k: stages["sal/step1"][k] for k in ("checksum", "ended", "mlflow_run_id", "attempts")} == \
        {k: step1[k] for k in ("checksum", "ended", "mlflow_run_id", "attempts")}
    assert stages["sal/step1"]["attempts"] == 1
    # Fault 4: edge failed fast with task, step and iteration; sal's pipeline went on to the end.
    edge = stages["edge/step1"]
    assert edge["status"] == "failed" and edge["attempts"] == 1
    for word in ("edge", "step1", "iteration 2", "nan"):
        assert word in edge["error"], edge["error"]
    assert stages["edge/step2"]["status"] == "pending" and stages["edge/step2"]["error"].startswith("blocked")
    assert stages["base"]["status"] == "done"
    assert state["state"] == "failed" and "edge/step1" in state["error"]
    # Fault 5: the base's upload failed once, was retried inside the same attempt, never showed.
    (hit,) = [json.loads(p.read_text()) for p in hits_dir.glob("*.json")]
    assert hit["key"] == "base/model.safetensors" and hit["visible_after_failure"] is False
    assert stages["base"]["attempts"] == 1
    assert _tmp_leftovers(workdir / "store") == []
    capsys.readouterr()

    # Resume after the fix (`launcher resume --set`, a separate driver process on this Ray
    # cluster): only edge's stage runs. Fault 2: SIGKILL that driver mid-stage.
    done = {n: (s["checksum"], s["ended"], s["mlflow_run_id"]) for n, s in stages.items() if s["status"] == "done"}
    # No --address: resume goes to the cluster the suite ran on, recorded in suite.json. And from
    # another current directory than the run's: nothing depends on where the driver starts.
    address = ray_cluster.get_runtime_context().gcs_address
    assert json.loads((workdir / "suite.json").read_text())["address"] == address
    with open(tmp_path / "driver.log", "w") as log:
        driver = subprocess.Popen(
            [sys.executable, "-m", "launcher", "resume", "--workdir", str(workdir),
             "--set", "task_overrides.edge.step1.fail_at_iter=null", "--no-progress"],
            cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
        try:
            mid = _wait(workdir, lambda: driver.poll() is None,
                        lambda s: s["edge/step1"]["attempts"] == 2 and (s["edge/step1"].get("checkpoint_iteration") or 0) >= 8)
        finally:
            driver.kill()
            driver.wait()
    assert _stages(workdir)["edge/step1"]["status"] == "running"  # as the killed driver left it
    assert resume_suite(workdir, progress=False) == 0
    after = _stages(workdir)
    assert all(s["status"] == "done" for s in after.values())
    assert {n: (after[n]["checksum"], after[n]["ended"], after[n]["mlflow_run_id"]) for n in done} == done
    edge_result = json.loads((workdir / "store/edge/step1/result.json").read_text())
    assert edge_result["resumed_from"] >= mid["edge/step1"]["checkpoint_iteration"] and edge_result["iterations"] == 60
    assert after["edge/step1"]["attempts"] == 3
    assert after["edge/step1"]["mlflow_run_id"] == edge["mlflow_run_id"]  # one MLflow run across all attempts
    assert json.loads((workdir / "suite.json").read_text())["overrides"] == ["task_overrides.edge.step1.fail_at_iter=null"]

    # Fault 7: resume after completion changes nothing — files, state, MLflow runs.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")

    def runs() -> list[tuple]:
        found = client.search_runs([read_state(workdir)["mlflow_experiment_id"]])
        return sorted((r.info.run_id, r.info.status, r.info.end_time, tuple(sorted(r.data.metrics.items())))
                      for r in found)

    tree, mlflow_runs = _tree(workdir / "store"), runs()
    finished = client.search_runs([read_state(workdir)["mlflow_experiment_id"]])
    assert sorted(r.info.run_name for r in finished) == ["base", "edge/step1", "edge/step2", "faults", "sal/step1",
                                                         "sal/step2"]
    assert all(r.info.status == "FINISHED" for r in finished)
    for _ in range(2):
        assert resume_suite(workdir, progress=False) == 0
        assert _tree(workdir / "store") == tree and runs() == mlflow_runs
    assert "nothing to do" in capsys.readouterr().out

    # Fault 3: truncate a finished checkpoint (sal's last step). Consumers refuse it — an input
    # fetch and `launcher infer` — and resume re-runs that stage only.
    from cluster.stage_runner import fetch_verified
    from launcher.__main__ import main
    from mtshare.train import StageFailure

    victim = workdir / "store/sal/step2/model.safetensors"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    cache = tmp_path / "node-cache"
    with pytest.raises(StageFailure, match="sal/step2/model.safetensors: checksum mismatch"):
        fetch_verified(open_storage(str(workdir / "store")), "sal/step2/model.safetensors",
                       after["sal/step2"]["checksum"], cache)
    assert not any(p.is_file() for p in cache.rglob("*"))  # the bad bytes never took a name
    image = next((Path(raw["dataset"]["root"]) / "JPEGImages").glob("*.jpg"))
    assert main(["infer", "--workdir", str(workdir), "--images", str(image), "--out", str(tmp_path / "panels")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "sal/step2/model.safetensors" in err and "checksum" in err, err
    assert not (tmp_path / "panels").exists()
    assert resume_suite(workdir, progress=False) == 0
    final = _stages(workdir)
    from mtshare.checkpoint import sha256_file

    assert sha256_file(victim) == final["sal/step2"]["checksum"]  # whole again, and committed
    assert final["sal/step2"]["ended"] > after["sal/step2"]["ended"]
    assert final["sal/step2"]["attempts"] == after["sal/step2"]["attempts"] + 1
    for name in ("base", "sal/step1", "edge/step1", "edge/step2"):
        assert final[name]["ended"] == after[name]["ended"] and final[name]["checksum"] == after[name]["checksum"]


# --- 6. two suites at once ----------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """``mlflow server`` on 127.0.0.1: the shared tracking path."""
    import urllib.request

    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'shared.db'}",
         "--artifacts-destination", (tmp_path / "shared-artifacts").as_uri(), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            assert proc.poll() is None and time.time() < deadline, "mlflow server did not start"
            time.sleep(0.5)
    try:
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def test_two_suites_share_ray_storage_and_mlflow_without_touching_each_other(ray_cluster, mlflow_server, tiny_suite,
                                                                              tmp_path):
    shared = tmp_path / "shared-store"
    address = ray_cluster.get_runtime_context().gcs_address
    procs, workdirs = {}, {}
    for name, seed in (("alpha", 1), ("beta", 2)):
        raw = tiny_suite(name, tasks=["sal"], steps=["step1"], iters=2, seed=seed, storage=str(shared),
                         tracking_uri=mlflow_server)
        config = tmp_path / f"{name}.yaml"
        config.write_text(yaml.safe_dump(raw))
        workdirs[name] = tmp_path / name
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "launcher", "run", str(config), "--workdir", str(workdirs[name]),
             "--address", address, "--no-progress"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    outputs = {name: p.communicate(timeout=500)[0] for name, p in procs.items()}
    for name, p in procs.items():
        assert p.returncode == 0, outputs[name][-3000:]

    # Storage: one area per suite under the shared root, each holding only its own stages.
    assert sorted(p.name for p in shared.iterdir()) == ["alpha", "beta"]
    states = {name: json.loads((shared / name / "state.json").read_text()) for name in workdirs}
    for name, state in states.items():
        assert state["suite"] == name and state["workdir"] == str(workdirs[name].resolve())
        stages = {s["name"]: s for s in state["stages"]}
        for st in stages.values():
            assert st["status"] == "done" and st["attempts"] == 1
            path = shared / name / st["name"] / "model.safetensors"
            assert hashlib.sha256(path.read_bytes()).hexdigest() == st["checksum"]
        assert stages["sal/step1"]["inputs"]["base"]["sha256"] == stages["base"]["checksum"]
        assert not (workdirs[name] / "mlflow.db").exists()  # tracked on the shared server
    assert states["alpha"]["stages"][0]["checksum"] != states["beta"]["stages"][0]["checksum"]

    # MLflow: one experiment per suite; every stage run is nested under its own suite's run.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    for name, state in states.items():
        runs = client.search_runs([state["mlflow_experiment_id"]])
        parent = state["mlflow_run_id"]
        assert sorted(r.info.run_name for r in runs) == sorted([name, "base", "sal/step1"])
        for r in runs:
            assert r.info.status == "FINISHED"
            if r.info.run_id == parent:
                assert r.data.tags["mtshare.workdir"] == str(workdirs[name].resolve())
            else:
                assert r.data.tags["mlflow.parentRunId"] == parent
    assert states["alpha"]["mlflow_experiment_id"] != states["beta"]["mlflow_experiment_id"]
