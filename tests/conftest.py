"""Shared fixtures.

``tiny_data``    a synthetic PASCAL-Context-layout dataset (24 scenes, 32 px), written once per
                 session and only read by tests.
``tiny_suite``   a factory for small suite configs (dicts, as a YAML would hold them): vit_debug
                 with 8-px patches, a few iterations per stage, checkpoints every 2 iterations.

Cluster tests (``tests/test_cluster_*.py``) start their own Ray instances; the environment
variables they share are set here (``CLUSTER_ENV``) and applied only by the fixtures that need them.
"""
from __future__ import annotations

import copy
import io
import socket
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import pytest

TINY_N, TINY_SIZE = 24, 32


def launcher_in_process(*args) -> SimpleNamespace:
    """``python -m launcher ARGS`` in this process, for commands that start no Ray workers (a
    subprocess costs ~4 s of imports each): ``returncode``, ``stdout``, ``stderr``."""
    import torch

    from launcher.__main__ import main

    out, err = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()  # (--threads sets torch's global count)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            rc = main([str(a) for a in args])
    finally:
        torch.set_num_threads(threads)
    return SimpleNamespace(returncode=rc, stdout=out.getvalue(), stderr=err.getvalue())


# Ray Train's controller polls its workers every 2 s by default: 0.2 s makes a short stage end
# promptly. There is no preemption on a single test machine, and its watcher is one more process.
CLUSTER_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    from mtshare.data import synthesize

    root = tmp_path_factory.mktemp("tiny-data") / "pascal"
    synthesize("pascal_context", root, n=TINY_N, size=TINY_SIZE, seed=0)
    return root


_STAGE = {"batch_size": 4, "ckpt_every": 2, "log_every": 1}


@pytest.fixture(scope="session")
def tiny_suite(tiny_data):
    """``tiny_suite(name, tasks=["sal"], steps=["step1"], references=False, iters=4, **top_level)``
    → a raw suite config dict; keyword arguments replace top-level keys."""

    def make(name: str = "tiny", tasks=("sal",), steps=("step1",), references: bool = False, iters: int = 4,
             **top_level) -> dict:
        train = {kind: {**_STAGE, "iters": iters, "eval_every": iters}
                 for kind in ("base", "step0", "step1", "step2", "step3")}
        train["step1"]["target_weight_sparsity"] = 0.9
        raw = {
            "name": name,
            "dataset": {"name": "pascal_context", "root": str(tiny_data), "img_size": TINY_SIZE, "holdout": 4},
            "model": {"flavor": "vit_debug", "patch_size": 8},
            "base_task": "semseg", "tasks": list(tasks), "steps": list(steps), "references": references,
            "train": train,
            "resources": {"workers": 1, "cpus_per_worker": 1},
        }
        raw.update(copy.deepcopy(top_level))
        return raw

    return make


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray instance (2 CPUs, no dashboard) for one test module. Workers inherit this
    process's environment at start: the project on PYTHONPATH, ``CLUSTER_ENV``, and dummy S3
    credentials for the moto server of the S3 test (moto accepts any)."""
    import os

    import ray

    repo = str(Path(__file__).resolve().parent.parent)
    env = {**CLUSTER_ENV, "PYTHONPATH": os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p),
           "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def moto_endpoint(monkeypatch):
    """A moto S3 server on 127.0.0.1 (any credentials) for one test."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(k, "testing")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()
