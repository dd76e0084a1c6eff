"""Pre-flight where the stages run: a simulated cluster (``ray.cluster_utils.Cluster``) whose
two worker nodes see different filesystems, one without the dataset. `run` names that node,
exits 2 and writes nothing.

The nodes of a simulated cluster are processes of this machine; what differs between real
nodes' filesystems is simulated through each node's working directory, which its processes
inherit: ``dataset.root: /proc/self/cwd/data`` is the data under each process's own cwd."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from cluster.run import run_suite
from mtshare.config import ConfigError, validate_suite

from conftest import CLUSTER_ENV

REPO = Path(__file__).resolve().parent.parent


def test_preflight_names_the_node_that_cannot_see_the_dataset(tiny_suite, tmp_path, monkeypatch):
    import ray
    from ray.cluster_utils import Cluster

    raw = tiny_suite("preflight", iters=1)
    with_data, without_data = tmp_path / "node-with-data", tmp_path / "node-without-data"
    shutil.copytree(raw["dataset"]["root"], with_data / "data")
    without_data.mkdir()
    raw["dataset"]["root"] = "/proc/self/cwd/data"
    for key, value in {**CLUSTER_ENV, "PYTHONPATH": os.pathsep.join(
            p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}.items():
        monkeypatch.setenv(key, value)  # the nodes' raylets (and so their workers) inherit it
    monkeypatch.chdir(with_data)  # the driver (and the head) see the data
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        seeing = cluster.add_node(num_cpus=1)
        os.chdir(without_data)
        blind = cluster.add_node(num_cpus=1)
        os.chdir(with_data)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        workdir = tmp_path / "run"
        cfg = validate_suite(raw, workdir=str(workdir))
        with pytest.raises(ConfigError) as err:
            run_suite(cfg, workdir, progress=False)
        message = str(err.value)
        assert message.startswith("dataset.root: /proc/self/cwd/data: dataset root not found"), message
        assert f"id {blind.node_id[:12]}" in message and seeing.node_id[:12] not in message
        assert not workdir.exists()  # nothing written
    finally:
        ray.shutdown()
        cluster.shutdown()
