"""cluster/ without Ray: storage (local and S3 via moto), the state file, DeepSpeed config,
resources, error lines, and the driver's failure / verification logic with the in-process
executor (real training, a few iterations)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.run import resume_suite, run_suite
from cluster.workdir import read_state
from cluster.deepspeed_stepper import load_ds_config, stage_ds_config
from cluster.executors import short_error, worker_resources
from cluster.state import SCHEMA_KEYS, StateBook, new_state, status_view
from cluster.storage import LocalStorage, StorageError, open_storage
from mtshare import checkpoint as ckpt
from mtshare.config import ConfigError, validate_suite
from mtshare.stages import plan

REPO = Path(__file__).resolve().parent.parent


# --- storage ------------------------------------------------------------------------------

def _exercise(storage) -> None:
    storage.write_bytes("a/b/x.bin", b"hello")
    storage.write_json("a/state.json", {"k": 1})
    assert storage.exists("a/b/x.bin") and not storage.exists("a/b/missing")
    assert storage.list("a") == ["a/b/x.bin", "a/state.json"]
    assert storage.read_bytes("a/b/x.bin") == b"hello" and storage.read_json("a/state.json") == {"k": 1}
    import hashlib

    sha = hashlib.sha256(b"hello").hexdigest()
    assert storage.sha256("a/b/x.bin") == sha


def test_local_storage_roundtrip_and_atomicity(tmp_path):
    storage = LocalStorage(tmp_path / "store")
    _exercise(storage)
    out = tmp_path / "local" / "x.bin"
    with pytest.raises(StorageError, match="checksum mismatch"):
        storage.get("a/b/x.bin", out, expected_sha256="0" * 64)
    assert not out.exists() and not list(out.parent.iterdir())  # no partial or temp file left
    storage.put(storage.get("a/b/x.bin", out), "c/y.bin")
    assert storage.read_bytes("c/y.bin") == b"hello"
    assert not [p for p in (tmp_path / "store").rglob("*") if ".tmp-" in p.name]
    with pytest.raises(StorageError, match="escapes"):
        storage.write_bytes("../evil", b"")
    assert open_storage(storage.describe()).root == storage.root


def test_s3_storage_roundtrip(moto_endpoint, tmp_path):
    import boto3

    boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1").create_bucket(Bucket="unit-bucket")
    storage = open_storage("s3://unit-bucket/some/prefix", endpoint=moto_endpoint)
    _exercise(storage)
    got = storage.get("a/b/x.bin", tmp_path / "x.bin", expected_sha256=storage.sha256("a/b/x.bin"))
    assert got.read_bytes() == b"hello"
    assert open_storage(storage.describe()).list("a") == storage.list("a")
    storage.delete("a/b/x.bin")
    assert storage.list("a") == ["a/state.json"]


# --- state, config helpers ---------------------------------------------------------------------

def test_state_file_schema_and_atomic_updates(tiny_suite, tmp_path):
    cfg = validate_suite(tiny_suite(tasks=["sal", "edge"], steps=["step1", "step2"]), workdir=str(tmp_path))
    storage = LocalStorage(tmp_path / "store")
    book = StateBook(storage, new_state(cfg.name, plan(cfg)))
    book.update("sal/step1", status="running", attempts=1, node="n1", started=1.0)
    loaded = StateBook.load(storage)
    assert loaded.stage("sal/step1")["status"] == "running" and loaded.stage("sal/step1")["node"] == "n1"
    view = status_view(loaded.state)
    assert set(view) == {"suite", "state", "stages"}
    assert [s["name"] for s in view["stages"]] == ["base", "sal/step1", "sal/step2", "edge/step1", "edge/step2"]
    assert all(tuple(s) == SCHEMA_KEYS for s in view["stages"])
    assert view["stages"][0]["step"] == "base" and view["stages"][0]["task"] == "semseg"
    with pytest.raises(ValueError):
        book.update("base", status="exploded")


def test_deepspeed_config_files(tmp_path):
    for stage in (0, 1, 2):
        cfg = load_ds_config(REPO / f"configs/deepspeed/zero{stage}.json")
        assert cfg["zero_optimization"]["stage"] == stage
    run = stage_ds_config(load_ds_config(REPO / "configs/deepspeed/zero2.json"), batch_size=8, grad_clip=1.0)
    assert run["train_micro_batch_size_per_gpu"] == 8 and run["gradient_clipping"] == 1.0
    assert run["bf16"] == {"enabled": False} and "train_batch_size" not in run
    bad = tmp_path / "zero3.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(ConfigError, match="zero3.json"):
        load_ds_config(bad)


def test_worker_resources_pin_tasks(tiny_suite, tmp_path):
    raw = tiny_suite(tasks=["sal", "edge"], resources={"workers": 2, "cpus_per_worker": 1, "gpus_per_worker": 0.5,
                                                       "custom": {"fast_disk": 1},
                                                       "task_resources": {"sal": {"node_a": 0.01}}})
    cfg = validate_suite(raw, workdir=str(tmp_path))
    assert worker_resources(cfg, "sal") == {"CPU": 1.0, "GPU": 0.5, "fast_disk": 1.0, "node_a": 0.01}
    assert worker_resources(cfg, "edge") == {"CPU": 1.0, "GPU": 0.5, "fast_disk": 1.0}


def test_short_error_takes_the_innermost_error_line():
    text = ("Training failed due to worker errors:\n[Rank 0 Error Snippet]:\nTraceback (most recent call last):\n"
            '  File "x.py", line 1, in f\nmtshare.train.StageFailure: task sal, step1: loss is nan at iteration 2\n')
    assert short_error(RuntimeError(text)) == "StageFailure: task sal, step1: loss is nan at iteration 2"
    assert short_error(ValueError("plain")) == "ValueError: plain"


# --- the driver, in-process executor --------------------------------------------------------

def test_failing_pipeline_does_not_stop_others_then_resume_and_verify(tiny_suite, tmp_path, capsys):
    """A NaN in one sub-task fails its stage (blocking only its own pipeline); resume after the
    fix runs what is left; a corrupted finished checkpoint is re-run with its downstream."""
    workdir = tmp_path / "run"
    raw = tiny_suite("fails", tasks=["sal", "edge"], steps=["step1", "step2"], iters=2,
                     task_overrides={"edge": {"step1": {"fail_at_iter": 1}}})
    cfg = validate_suite(raw, workdir=str(workdir))
    assert run_suite(cfg, workdir, progress=False, executor="inprocess") == 1
    state = read_state(workdir)
    stages = {s["name"]: s for s in state["stages"]}
    assert state["state"] == "failed" and "edge/step1" in state["error"]
    assert stages["edge/step1"]["status"] == "failed"
    assert "edge" in stages["edge/step1"]["error"] and "iteration 1" in stages["edge/step1"]["error"]
    assert stages["edge/step2"]["status"] == "pending" and stages["edge/step2"]["error"].startswith("blocked")
    assert all(stages[n]["status"] == "done" for n in ("base", "sal/step1", "sal/step2"))
    assert "fix the cause" in capsys.readouterr().err

    # The fix, given to resume: drop the fault knob from the saved config.
    done_before = {n: (s["checksum"], s["mlflow_run_id"], s["ended"]) for n, s in stages.items() if s["status"] == "done"}
    with pytest.raises(ConfigError, match="cannot change the suite's name or stages"):
        resume_suite(workdir, executor="inprocess", progress=False, overrides=["references=true"])
    assert resume_suite(workdir, executor="inprocess", progress=False,
                        overrides=["task_overrides.edge.step1.fail_at_iter=null"]) == 0
    meta = json.loads((workdir / "suite.json").read_text())
    assert meta["config"]["task_overrides"]["edge"]["step1"]["fail_at_iter"] is None
    assert meta["overrides"][-1] == "task_overrides.edge.step1.fail_at_iter=null"
    after = {s["name"]: s for s in read_state(workdir)["stages"]}
    assert all(s["status"] == "done" for s in after.values())
    assert {n: (after[n]["checksum"], after[n]["mlflow_run_id"], after[n]["ended"]) for n in done_before} == done_before
    assert after["edge/step1"]["mlflow_run_id"] == stages["edge/step1"]["mlflow_run_id"]  # same run, resumed

    # Bit-flip a finished checkpoint: resume re-runs that stage and its downstream only.
    victim = workdir / "store" / "sal/step1/model.safetensors"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert resume_suite(workdir, executor="inprocess", progress=False) == 0
    final = {s["name"]: s for s in read_state(workdir)["stages"]}
    assert ckpt.sha256_file(victim) == final["sal/step1"]["checksum"]
    for name in ("sal/step1", "sal/step2"):
        assert final[name]["ended"] > after[name]["ended"]
    for name in ("base", "edge/step1", "edge/step2"):
        assert final[name]["ended"] == after[name]["ended"]

    # A changed training setting makes the finished stages it touches stale (fingerprint);
    # bookkeeping (log interval) does not.
    assert resume_suite(workdir, executor="inprocess", progress=False,
                        overrides=["task_overrides.sal.step2.lr=5.0e-4", "train.step1.log_every=7"]) == 0
    changed = {s["name"]: s for s in read_state(workdir)["stages"]}
    assert changed["sal/step2"]["ended"] > final["sal/step2"]["ended"]
    for name in ("base", "sal/step1", "edge/step1", "edge/step2"):
        assert changed[name]["ended"] == final[name]["ended"]

    # A copied work directory (the original moved out of reach) owns its storage: it resumes,
    # verifies and reports; moving the data (a new dataset.root) re-runs nothing.
    import shutil

    from launcher.__main__ import main

    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(workdir, copy)
    workdir.rename(tmp_path / "gone")
    data = tmp_path / "moved-data"
    shutil.copytree(raw["dataset"]["root"], data)
    capsys.readouterr()
    assert resume_suite(copy, executor="inprocess", progress=False, overrides=[f"dataset.root={data}"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    moved = {s["name"]: s for s in read_state(copy)["stages"]}
    assert {n: s["ended"] for n, s in moved.items()} == {n: s["ended"] for n, s in changed.items()}
    assert read_state(copy)["workdir"] == str(workdir.resolve())  # idle: the state file untouched
    assert main(["report", "--workdir", str(copy), "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tasks"]["sal"]["stage"] == "sal/step2" and report["tasks"]["edge"]["stage"] == "edge/step2"
    assert resume_suite(copy, executor="inprocess", progress=False, overrides=["task_overrides.sal.step2.lr=4.0e-4"]) == 0
    assert read_state(copy)["workdir"] == str(copy.resolve())  # driven from here now
    assert not (tmp_path / "gone" / "store" / "sal" / "step2" / "resume.json").exists()


def test_a_stale_driver_lock_of_another_host_is_taken_over(tiny_suite, tmp_path):
    """A driver on another host died hard (no cleanup): its lock is taken over once the state
    file shows no heartbeat from it; while the heartbeat is fresh, the lock holds (exit 2)."""
    import os
    import time

    from cluster.scheduler import STALE_AFTER_S

    workdir = tmp_path / "run"
    cfg = validate_suite(tiny_suite("locked", iters=1, references=False), workdir=str(workdir))
    assert run_suite(cfg, workdir, progress=False, executor="inprocess") == 0
    store = LocalStorage(workdir / "store")
    state = store.read_json("state.json")
    state.update(state="running", driver={"host": "node-7.cluster", "pid": 4242, "heartbeat": time.time()})
    store.write_json("state.json", state)
    lock = workdir / "driver.lock"
    lock.write_text("node-7.cluster 4242")
    old = time.time() - 2 * STALE_AFTER_S
    os.utime(lock, (old, old))
    with pytest.raises(ConfigError, match="another driver .*node-7.cluster 4242"):
        resume_suite(workdir, executor="inprocess", progress=False)
    state["driver"]["heartbeat"] = old  # the driver's last sign of life, long ago
    store.write_json("state.json", state)
    assert resume_suite(workdir, executor="inprocess", progress=False) == 0
    assert not lock.exists() and read_state(workdir)["state"] == "done"

    # resume goes to the cluster recorded in suite.json by default: one that is gone is named.
    meta = json.loads((workdir / "suite.json").read_text())
    assert meta["address"] is None  # ran in-process: no cluster to go back to
    (workdir / "suite.json").write_text(json.dumps({**meta, "address": "127.0.0.1:9"}))
    with pytest.raises(ConfigError, match=r"suite.json: the suite ran on the Ray cluster at 127.0.0.1:9, which does not"):
        resume_suite(workdir, progress=False)


@pytest.mark.parametrize("case", ["dataset root", "deepspeed file", "s3 bucket", "storage owner"])
def test_bad_input_is_refused_before_anything_is_written(case, tiny_suite, tmp_path, moto_endpoint):
    """ConfigError (exit 2) naming the field, and the work directory stays absent."""
    workdir = tmp_path / "never"
    raw = tiny_suite("bad")
    if case == "dataset root":
        raw["dataset"]["root"] = str(tmp_path / "missing")
        match = "dataset.root"
    elif case == "deepspeed file":
        raw["deepspeed"] = str(tmp_path / "nope.json")
        match = "deepspeed"
    elif case == "s3 bucket":
        raw.update(storage="s3://no-such-bucket/x", s3_endpoint=moto_endpoint)
        match = "no-such-bucket"
    else:  # the storage area already belongs to another run of the same suite
        raw["storage"] = str(tmp_path / "shared")
        cfg = validate_suite(raw, workdir=str(tmp_path / "other"))
        state = new_state(cfg.name, plan(cfg))
        state.update(workdir=str(tmp_path / "other"), run_id="0" * 32)
        LocalStorage(tmp_path / "shared" / "bad").write_json("state.json", state)
        match = "belongs to another run of suite 'bad'"
    with pytest.raises(ConfigError, match=match):
        run_suite(validate_suite(raw, workdir=str(workdir)), workdir, progress=False, executor="inprocess")
    assert not workdir.exists()


def test_embedded_mlflow_is_refused_on_a_network_filesystem(tmp_path):
    """sqlite over NFS (several hosts, one file) corrupts: the network mount holding a path is
    found from /proc/mounts (longest mount point), and `run` refuses the embedded store there."""
    from cluster.checks import check_sqlite_place
    from cluster.tracking import network_fs

    mounts = "\n".join([
        "/dev/sda1 / ext4 rw 0 0",
        "nas:/export/runs /shared nfs4 rw,relatime 0 0",
        "/dev/sdb1 /shared/local-scratch xfs rw 0 0",
        "tmpfs /tmp tmpfs rw 0 0",
    ])
    assert network_fs(Path("/shared/runs/demo/mlflow.db"), mounts) == "nfs4"
    assert network_fs(Path("/shared/local-scratch/x"), mounts) is None  # a local disk mounted below it
    assert network_fs(Path("/sharedother/x"), mounts) is None  # a prefix of the name is not a parent
    assert network_fs(Path("/home/me/run"), mounts) is None
    assert network_fs(tmp_path) is None  # this machine's real mounts: the test dir is local
    check_sqlite_place(tmp_path / "mlflow.db", "tracking_uri")  # local: accepted
