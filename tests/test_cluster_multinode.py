"""A simulated 3-node cluster (``ray.cluster_utils.Cluster``): after the base, two sub-task
pipelines pinned by custom resources run concurrently on different nodes, and their workers
load the base from storage with the verified checksum."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from cluster.cli import read_state, run_suite
from mtshare.config import validate_suite

from conftest import CLUSTER_ENV

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def three_nodes():
    import ray
    from ray.cluster_utils import Cluster

    env = {**CLUSTER_ENV, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
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


def test_pipelines_run_concurrently_on_pinned_nodes(three_nodes, tiny_suite, tmp_path):
    raw = tiny_suite("multinode", tasks=["sal", "edge"], steps=["step1"], iters=6)
    raw["resources"] = {"workers": 1, "cpus_per_worker": 1,
                        "task_resources": {"sal": {"pin_a": 0.01}, "edge": {"pin_b": 0.01}}}
    workdir = tmp_path / "run"
    assert run_suite(validate_suite(raw, workdir=str(workdir)), workdir, progress=False) == 0

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
