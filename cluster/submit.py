"""What the launcher's ``submit`` verb calls: the suite as a Ray Job on a running cluster."""
from __future__ import annotations

import os
import shlex
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from mtshare.config import ConfigError, SuiteConfig

from cluster.checks import ds_config_path, suite_ds_config
from cluster.run import ray_auth_env

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("launcher", "mtshare", "cluster")  # the code a submitted job runs (Ray's py_modules)
SUITE_YAML, DS_JSON = "suite.yaml", "deepspeed.json"  # in the job's working_dir


def _stage_job_dir(config_path: Path, ds_config: Path) -> Path:
    """The job's ``working_dir``: its data only — the suite YAML and the DeepSpeed JSON it names.
    The code travels as ``py_modules`` (Ray uploads each package once, by content hash)."""
    stage = Path(tempfile.mkdtemp(prefix="mtshare-job-"))
    shutil.copy2(config_path, stage / SUITE_YAML)
    shutil.copy2(ds_config, stage / DS_JSON)
    return stage


def submit_suite(cfg: SuiteConfig, args: Any) -> int:
    """``launcher submit``: the suite as a Ray Job on a running cluster; prints the job id."""
    with ray_auth_env():
        return _submit(cfg, args)


def _check_cluster_paths(config_path: Path, overrides: list[str], workdir: str | None) -> None:
    """Paths that a submitted suite uses are resolved on the cluster, not on this machine: the
    workdir and every path in the config must be absolute (or under ``{workdir}``), else they
    would land in the job's upload folder or point at nothing. Refused (exit 2) before submitting."""
    from mtshare.config import apply_overrides, names_weight_file, read_mapping

    if not workdir or not Path(workdir).is_absolute():
        raise ConfigError(f"--workdir: `submit` needs an absolute path on the cluster's shared filesystem "
                          f"(the suite runs on the cluster, not here), got {workdir!r}")
    raw = apply_overrides(read_mapping(config_path), list(overrides))
    model, dataset = raw.get("model") or {}, raw.get("dataset") or {}
    tracking = raw.get("tracking_uri") or ""
    paths = {
        "dataset.root": dataset.get("root"),
        "storage": raw.get("storage"),
        "model.pretrained": model.get("pretrained") if names_weight_file(str(model.get("pretrained") or "")) else None,
        "tracking_uri": tracking.removeprefix("sqlite:///") if tracking.startswith("sqlite:///") else None,
    }
    for field, value in paths.items():
        if not isinstance(value, str) or value.startswith("{workdir}") or "://" in value:
            continue
        if not Path(value).is_absolute():
            raise ConfigError(f"{field}: '{value}' is a relative path, but `submit` runs the suite on the cluster "
                              f"(it would resolve inside the job's upload folder): give an absolute path, or one "
                              f"under {{workdir}}")


def _submit(cfg: SuiteConfig, args: Any) -> int:
    config_path = Path(args.config)
    _check_cluster_paths(config_path, getattr(args, "overrides", None) or [], args.workdir)
    workdir = Path(args.workdir)  # absolute: the cluster writes here (a shared path)
    from ray.job_submission import JobSubmissionClient

    try:
        client = JobSubmissionClient(args.address)
    except Exception as e:  # noqa: BLE001 - ConnectionError, auth errors...
        raise ConfigError(f"--address {args.address}: cannot reach the Ray dashboard ({str(e).splitlines()[0][:200]})") from None
    suite_ds_config(cfg)  # readable and a supported ZeRO stage (exit 2 otherwise), before it ships
    stage = _stage_job_dir(config_path, ds_config_path(cfg))
    cmd = [os.environ.get("MTSHARE_JOB_PYTHON", "python"), "-m", "launcher", "run", SUITE_YAML, "--workdir",
           str(workdir), "--address", "auto", "--no-progress"]
    for item in [*(getattr(args, "overrides", None) or []), f"deepspeed={DS_JSON}"]:
        cmd += ["--set", item]
    submission_id = f"mtshare-{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    try:
        job_id = _submit_with_retry(
            client, entrypoint=" ".join(shlex.quote(c) for c in cmd), submission_id=submission_id,
            runtime_env={"working_dir": str(stage), "py_modules": [str(REPO_ROOT / p) for p in PACKAGES],
                         "excludes": ["__pycache__", "*.pyc"], "env_vars": {"MTSHARE_IN_RAY_JOB": "1"}},
            metadata={"suite": cfg.name, "workdir": str(workdir)},
        )
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    print(job_id)
    print(f"submitted suite {cfg.name} as Ray job {job_id} (workdir {workdir} on the cluster)", file=sys.stderr)
    print(f"follow: ray job logs --address {args.address} --follow {job_id}\n"
          f"status: python -m launcher status --workdir {workdir}", file=sys.stderr)
    return 0


def _submit_with_retry(client, timeout_s: float = 90.0, **kwargs) -> str:
    """A cluster that has just started answers HTTP before its job agent is up ("No available
    agent to submit job"): wait for it rather than fail."""
    deadline = time.time() + timeout_s
    while True:
        try:
            return client.submit_job(**kwargs)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.time() > deadline:
                raise
            time.sleep(2)

