"""A simulated 3-node cluster (``ray.cluster_utils.Cluster``) whose shared storage is an
S3-compatible server (moto, on 127.0.0.1), as on a real cluster without a shared filesystem.

* After the base, two sub-task pipelines pinned by custom resources run concurrently on
  different nodes, and their workers load the base from storage with the verified checksum.
* The suite stores its checkpoints in the bucket and reloads them from there (the sub-task
  workers, a direct load, and ``resume``'s verification)."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from cluster.run import resume_suite, run_suite
from cluster.workdir import read_state, suite_storage
from mtshare import checkpoint as ckpt
from mtshare.config import validate_suite

from conftest import CLUSTER_ENV

REPO = Path(__file__).resolve().parent.parent
BUCKET, ROOT = "mtshare", "suites"
AREA = f"{ROOT}/multinode"  # an explicit storage root holds one area per suite name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1 with one bucket (moto accepts any credentials)."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket=BUCKET)
    try:
        yield url
    finally:
        server.stop()


@pytest.fixture(scope="module")
def three_nodes():
    import ray
    from ray.cluster_utils import Cluster

    env = {**CLUSTER_ENV, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
           "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the nodes' raylets (and so their workers) inherit it
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    node_a = cluster.add_node(num_cpus=1, resources={"pin_a": 1})
    node_b = cluster.add_node(num_cpus=1, resources={"pin_b": 1})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield {"a": node_a.node_id, "b": node_b.node_id, "head": cluster.head_node.node_id}
    finally:
        ray.shutdown()
        cluster.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def suite_run(three_nodes, s3_endpoint, tiny_suite, tmp_path_factory):
    raw = tiny_suite("multinode", tasks=["sal", "edge"], steps=["step1"], iters=6,
                     storage=f"s3://{BUCKET}/{ROOT}", s3_endpoint=s3_endpoint)
    raw["resources"] = {"workers": 1, "cpus_per_worker": 1,
                        "task_resources": {"sal": {"pin_a": 0.01}, "edge": {"pin_b": 0.01}}}
    workdir = tmp_path_factory.mktemp("multinode") / "run"
    cfg = validate_suite(raw, workdir=str(workdir))
    rc = run_suite(cfg, workdir, progress=False)
    return rc, cfg, workdir


def test_pipelines_run_concurrently_on_pinned_nodes(suite_run, three_nodes):
    rc, _, workdir = suite_run
    assert rc == 0
    stages = {s["name"]: s for s in read_state(workdir)["stages"]}
    sal, edge, base = stages["sal/step1"], stages["edge/step1"], stages["base"]
    assert sal["node"] == three_nodes["a"] and edge["node"] == three_nodes["b"]
    assert sal["node"] != edge["node"]
    # Both pipelines' workers were up before either finished: the intervals overlap.
    assert max(sal["worker_started"], edge["worker_started"]) < min(sal["ended"], edge["ended"])
    assert min(sal["started"], edge["started"]) >= base["ended"]  # and only after the base was committed
    for st in (sal, edge):
        verified = st["inputs"]["base"]
        assert verified["key"] == "base/model.safetensors"
        assert verified["sha256"] == base["checksum"]
        assert verified["verified_on"] == st["node"]  # fetched and checked on the worker's own node


def test_s3_storage_stores_and_reloads_checkpoints(suite_run, s3_endpoint, tmp_path):
    import boto3

    rc, cfg, workdir = suite_run
    assert rc == 0
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", aws_access_key_id="testing",
                      aws_secret_access_key="testing")
    keys = {o["Key"][len(AREA) + 1:] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=AREA + "/")["Contents"]}
    for stage in ("base", "sal/step1", "edge/step1"):
        assert {f"{stage}/model.safetensors", f"{stage}/result.json"} <= keys
    assert "state.json" in keys and not [k for k in keys if "resume" in k]
    # Checkpoints live in the bucket; the work directory only mirrors result.json for `report`.
    assert sorted(p.name for p in (workdir / "store").rglob("*") if p.is_file()) == ["result.json"] * 3

    state = read_state(workdir)
    base, *subtasks = state["stages"]
    storage = suite_storage(cfg, workdir)
    assert storage.uri == f"s3://{BUCKET}/{AREA}"
    for st in subtasks:
        got = storage.get(f"{st['name']}/model.safetensors", tmp_path / f"{st['task']}.safetensors",
                          expected_sha256=st["checksum"])
        ckpt.load_subtask(got, base_sha256=base["checksum"])  # made from exactly this base

    # Resume re-reads every checkpoint from the bucket to verify it, and re-runs nothing.
    assert resume_suite(workdir, progress=False) == 0
    again = read_state(workdir)
    assert [(s["attempts"], s["checksum"], s["ended"]) for s in again["stages"]] == \
           [(s["attempts"], s["checksum"], s["ended"]) for s in state["stages"]]

    # `report` and `infer` read the suite through its storage: the bucket's checkpoints land in a
    # verified local cache (<workdir>/store), and the served outputs come from them.
    from launcher.__main__ import main

    image = next((Path(cfg.dataset.root) / "JPEGImages").glob("*.jpg"))
    assert main(["infer", "--workdir", str(workdir), "--images", str(image), "--out", str(tmp_path / "panels")]) == 0
    assert any((tmp_path / "panels").iterdir())
    for st in state["stages"]:
        assert ckpt.sha256_file(workdir / "store" / st["name"] / "model.safetensors") == st["checksum"]
    assert main(["report", "--workdir", str(workdir), "--format", "json"]) == 0
