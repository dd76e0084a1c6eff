"""``launcher submit`` against a ``ray start --head`` cluster on 127.0.0.1 with token
authentication, started and stopped by the test: the suite runs to completion as a Ray Job."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import CLUSTER_ENV

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, token: str | None) -> tuple[int, dict | None]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, None
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, None


@pytest.fixture
def head_node(tmp_path):
    """``ray start --head --block`` in its own process group; stopped by signalling that group
    only (never ``ray stop``, which would stop every Ray on the machine)."""
    token = secrets.token_hex(16)
    dash = _free_port()
    env = {**os.environ, **CLUSTER_ENV, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    temp_dir = Path("/tmp") / f"mtshare-ray-{secrets.token_hex(3)}"  # short: Ray's socket paths have a length limit
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", f"--port={_free_port()}",
           "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           "--include-dashboard=true", "--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    log = open(tmp_path / "ray-head.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while _get(f"{url}/api/version", token)[0] != 200:
            assert proc.poll() is None, (tmp_path / "ray-head.log").read_text()[-2000:]
            assert time.time() < deadline, "the Ray head did not come up"
            time.sleep(1)
        yield {"url": url, "token": token, "env": env}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # `ray start --block` stops its processes on SIGTERM
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
        try:  # whatever of that group is left (the group holds only what this `ray start` started)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_submit_runs_suite_as_ray_job_with_token_auth(head_node, tiny_suite, tmp_path):
    url, token, env = head_node["url"], head_node["token"], head_node["env"]
    assert _get(f"{url}/api/jobs/", None)[0] in (401, 403)  # token auth is on: no token, no access

    config = tmp_path / "submitted.yaml"
    config.write_text(yaml.safe_dump(tiny_suite("submitted")))
    workdir = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "launcher", "submit", str(config), "--address", url,
                          "--workdir", str(workdir)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.split()[0]

    deadline, status = time.time() + 420, None
    while time.time() < deadline:
        code, info = _get(f"{url}/api/jobs/{job_id}", token)
        status = info and info.get("status")
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(2)
    if status != "SUCCEEDED":
        _, logs = _get(f"{url}/api/jobs/{job_id}/logs", token)
        pytest.fail(f"job {job_id} ended {status}:\n{(logs or {}).get('logs', '')[-3000:]}")

    status_out = subprocess.run([sys.executable, "-m", "launcher", "status", "--workdir", str(workdir),
                                 "--format", "json"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert status_out.returncode == 0, status_out.stderr
    state = json.loads(status_out.stdout)
    assert state["suite"] == "submitted" and state["state"] == "done"
    assert [s["status"] for s in state["stages"]] == ["done", "done"]
