"""What the launcher's ``ui`` verb calls: the MLflow UI of a suite's embedded store."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from mtshare.config import ConfigError

from cluster.checks import check_sqlite_place
from cluster.run import sigterm_as_interrupt
from cluster.workdir import SUITE_FILE


def serve_ui(workdir: Path, host: str = "127.0.0.1", port: int = 5000) -> int:
    """``launcher ui``: the MLflow UI of a suite's embedded store, on 127.0.0.1 by default."""
    workdir = Path(workdir)
    uri = None
    if (workdir / SUITE_FILE).exists():
        uri = json.loads((workdir / SUITE_FILE).read_text()).get("tracking_uri")
    elif (workdir / "sweep.json").exists():  # a sweep: its suites log to the sweep's store
        uri = json.loads((workdir / "sweep.json").read_text())["config"].get("tracking_uri")
    if uri and not uri.startswith("sqlite:"):  # (null: the embedded store below)
        print(f"this suite logs to an MLflow server: open {uri}")
        return 0
    db = workdir / "mlflow.db"
    if not db.exists():
        raise ConfigError(f"{db}: no MLflow store in this workdir (has the suite run?)")
    check_sqlite_place(db, "--workdir")  # a second server on one sqlite file over NFS corrupts it
    from cluster.tracking import default_tracking_uri

    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving MLflow on {host}: it has no authentication; see the README before exposing it",
              file=sys.stderr)
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", default_tracking_uri(workdir),
           "--artifacts-destination", (workdir / "mlartifacts").resolve().as_uri(),
           "--host", host, "--port", str(port), "--workers", "1"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    print(f"MLflow UI for {workdir}: http://{host}:{port}   (Ctrl-C to stop)", flush=True)
    server = subprocess.Popen(cmd, env=env)
    try:
        with sigterm_as_interrupt():
            return server.wait()
    except KeyboardInterrupt:
        return 0
    finally:  # never leave the server behind when the launcher is stopped (Ctrl-C or SIGTERM)
        if server.poll() is None:
            server.terminate()
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()

