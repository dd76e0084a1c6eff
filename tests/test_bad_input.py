"""Bad input, one table: every case must exit 2 from the launcher with exactly one line on
stderr naming the offending field or file, and write nothing under the work directory (it does
not exist afterwards, or a pre-existing one is left exactly as it was).

Most cases call ``launcher.__main__.main`` in this process (fast); stderr is captured at the
file-descriptor level (``capfd``), so C-level logging (Ray's core worker) counts too. The cases
in ``SUBPROCESS`` run ``python -m launcher`` for real, proving the real exit path (interpreter
start, imports, exit status) and catching import-time warnings an in-process run cannot see.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from launcher.__main__ import main

REPO = Path(__file__).resolve().parent.parent
_HOME_TOKEN = Path.home() / ".ray" / "auth_token"

# Cases run as real `python -m launcher` subprocesses. The GPU and worker-count cases start a
# local Ray: in a process of its own, so that Ray's process-wide state (token-auth setup)
# cannot leak into the Ray instances later test modules start in this process.
SUBPROCESS = {"yaml-not-a-mapping", "unreachable-ray-address", "gpus-beyond-any-node", "workers-beyond-the-cluster"}


# --- helpers --------------------------------------------------------------------------------

def _closed_port() -> int:
    """A local TCP port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _set(raw: dict, dotted: str, value) -> None:
    node = raw
    *parents, last = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value


def _snapshot(path: Path) -> dict | None:
    """Every entry under ``path`` with its size and mtime (None: ``path`` does not exist)."""
    if not path.exists():
        return None
    return {str(p.relative_to(path)): (p.is_dir(), p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*"))}


class Ctx:
    """What a case builder gets: a private tmp dir, the tiny suite factory and the tiny data."""

    def __init__(self, tmp_path: Path, tiny_suite, tiny_data: Path, request):
        self.tmp, self.tiny_suite, self.tiny_data, self.request = tmp_path, tiny_suite, tiny_data, request
        self.workdir = tmp_path / "wd"  # what must stay absent (or unchanged, see `existing`)
        self.existing = False

    def pre_existing_workdir(self) -> None:
        """Run into a work directory that already exists (with a file of the user's in it)."""
        self.workdir.mkdir()
        (self.workdir / "notes.txt").write_text("mine\n")
        self.existing = True

    def config(self, edits: dict | None = None, raw: dict | None = None) -> str:
        raw = copy.deepcopy(raw) if raw is not None else self.tiny_suite("bad", iters=2)
        for key, value in (edits or {}).items():
            _set(raw, key, value)
        path = self.tmp / "suite.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return str(path)

    def run(self, config: str, *extra: str, executor: str = "inprocess") -> list[str]:
        return ["run", config, "--workdir", str(self.workdir), "--no-progress", "--executor", executor, *extra]

    def data_copy(self) -> Path:
        root = self.tmp / "data"
        shutil.copytree(self.tiny_data, root)
        return root


# --- the cases: each returns (argv, text the error line must contain) -------------------------

def unknown_task(ctx):
    return ctx.run(ctx.config({"tasks": ["sal", "bogus"]})), "tasks: unknown task 'bogus'"


def subtask_is_base(ctx):
    return ctx.run(ctx.config({"tasks": ["semseg"]})), "tasks: 'semseg' is the base task"


def empty_tasks(ctx):
    return ctx.run(ctx.config({"tasks": []})), "tasks: the list of sub-tasks is empty"


def steps_out_of_order(ctx):
    return ctx.run(ctx.config({"steps": ["step2", "step1"]})), "steps: must be a prefix"


def lr_negative(ctx):
    return ctx.run(ctx.config({"train.base.lr": -1.0e-3})), "train.base.lr"


def lr_zero(ctx):
    return ctx.run(ctx.config({"train.step1.lr": 0.0})), "train.step1.lr"


def batch_size_zero(ctx):
    return ctx.run(ctx.config({"train.base.batch_size": 0})), "train.base.batch_size"


def workers_zero(ctx):
    return ctx.run(ctx.config({"resources.workers": 0})), "resources.workers"


def set_value_not_yaml(ctx):
    # `{workdir}/data` starts a YAML flow mapping: one line naming the key, not a traceback
    return ctx.run(ctx.config(), "--set", "dataset.root={workdir}/data"), "--set dataset.root"


def holdout_below_workers(ctx):
    # every rank calibrates on its own share of the holdout: refused before anything runs
    return ctx.run(ctx.config({"dataset.holdout": 2, "resources.workers": 3})), "dataset.holdout"


def gpus_beyond_any_node(ctx):
    ctx.pre_existing_workdir()
    if not (os.environ.get("RAY_AUTH_MODE") or os.environ.get("RAY_AUTH_TOKEN") or _HOME_TOKEN.exists()):
        # No token anywhere: a user who has chosen (RAY_AUTH_MODE set) gets no security notice
        # from Ray's local start; with a token the launcher picks token mode itself.
        os.environ["RAY_AUTH_MODE"] = "disabled"
    argv = ctx.run(ctx.config(), "--set", "resources.gpus_per_worker=4", executor="ray")
    return argv, "resources.gpus_per_worker"


def workers_beyond_the_cluster(ctx):
    ctx.pre_existing_workdir()
    if not (os.environ.get("RAY_AUTH_MODE") or os.environ.get("RAY_AUTH_TOKEN") or _HOME_TOKEN.exists()):
        os.environ["RAY_AUTH_MODE"] = "disabled"
    # Each worker fits on the node, but not 3 of them at once (2 CPUs here, 1 per worker).
    argv = ctx.run(ctx.config({"resources.workers": 3}), executor="ray")
    return argv, "resources.workers: stage base needs 3 workers"


def cuda_with_a_fraction_of_a_gpu(ctx):
    return ctx.run(ctx.config({"device": "cuda", "resources.gpus_per_worker": 0.5})), "resources.gpus_per_worker"


def submit_with_a_relative_dataset_root(ctx):
    return (["submit", ctx.config({"dataset.root": "data/pascal"}), "--address", "http://127.0.0.1:9",
             "--workdir", str(ctx.workdir)], "dataset.root: 'data/pascal' is a relative path")


def submit_without_an_absolute_workdir(ctx):
    return ["submit", ctx.config(), "--address", "http://127.0.0.1:9", "--workdir", "runs/x"], "--workdir: `submit` needs"


def deepspeed_stage_7(ctx):
    ds = ctx.tmp / "zero7.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 7}}))
    ctx.pre_existing_workdir()
    return ctx.run(ctx.config({"deepspeed": str(ds)})), f"deepspeed: {ds}: zero_optimization.stage 7"


def img_size_not_divisible(ctx):
    return ctx.run(ctx.config({"dataset.img_size": 30})), "dataset.img_size 30 is not divisible by model.patch_size 8"


def missing_dataset_root(ctx):
    root = ctx.tmp / "no-such-data"
    return ctx.run(ctx.config({"dataset.root": str(root)})), f"dataset.root: {root}"


def stream_on_still_images(ctx):
    return ctx.run(ctx.config({"stream": {"keyframe_every": 4}})), "stream: dataset.root"


def stream_split_layer_beyond_depth(ctx):
    return ctx.run(ctx.config({"stream": {"split_layer": 5}})), "stream.split_layer: 5 is beyond the 4 blocks"


def holdout_leaves_no_batch(ctx):
    return ctx.run(ctx.config({"dataset.holdout": 100})), "dataset.holdout: 100 of the"


def split_lists_missing_files(ctx):
    from mtshare.data import pascal_context as pc

    root = ctx.data_copy()
    split = pc.split_path(root, "train")
    split.write_text(split.read_text() + "2099_999999\n")
    missing = pc.paths(root, "2099_999999")["image"]
    return ctx.run(ctx.config({"dataset.root": str(root)})), f"{missing}: file not found"


def label_out_of_range(ctx):
    from mtshare.data import pascal_context as pc

    root = ctx.data_copy()
    first = pc.split_path(root, "train").read_text().split()[0]
    label = pc.paths(root, first)["semseg"]
    arr = np.asarray(Image.open(label)).copy()
    arr[:4, :4] = pc.INFO.num_semseg_classes + 29  # class 50 in a 21-class dataset
    Image.fromarray(arr.astype(np.uint8), mode="L").save(label)
    return ctx.run(ctx.config({"dataset.root": str(root)})), f"{label}: semseg values must be 0..20 or 255, found [50]"


def yaml_not_a_mapping(ctx):
    path = ctx.tmp / "list.yaml"
    path.write_text("- name: x\n- tasks: [sal]\n")
    return ctx.run(str(path)), f"{path}: the top level must be a mapping"


def unknown_set_key(ctx):
    return ctx.run(ctx.config(), "--set", "train.base.bogus=3"), "train.base.bogus: Extra inputs are not permitted"


def pretrained_missing_keys(ctx):
    from safetensors.torch import save_file

    from mtshare.models.vit import ViTEncoder, vit_config

    sd = ViTEncoder(vit_config("vit_debug", 8)).state_dict()
    del sd["blocks.2.mlp.fc1.weight"], sd["cls_token"]
    weights = ctx.tmp / "partial.safetensors"
    save_file(sd, weights)
    argv = ctx.run(ctx.config({"model.pretrained": str(weights)}))
    return argv, f"model.pretrained: {weights}: missing keys ['blocks.2.mlp.fc1.weight', 'cls_token']"


def subtask_of_another_base(ctx):
    """`infer` on a suite whose sal/step1 checkpoint (+ result.json) was trained on another base."""
    suite_a, suite_b = ctx.request.getfixturevalue("two_suites")
    mixed = ctx.tmp / "mixed"
    shutil.copytree(suite_a / "store", mixed / "store")
    for name in ("model.safetensors", "result.json"):
        shutil.copy2(suite_b / "store" / "sal" / "step1" / name, mixed / "store" / "sal" / "step1" / name)
    ctx.workdir = ctx.tmp / "panels"  # "nothing written": the --out directory stays absent
    image = sorted((ctx.tiny_data / "JPEGImages").iterdir())[0]
    argv = ["infer", "--workdir", str(mixed), "--images", str(image), "--out", str(ctx.workdir)]
    return argv, f"{mixed / 'store' / 'sal' / 'step1' / 'model.safetensors'}: made for base sha256"


def unreachable_ray_address(ctx):
    return ctx.run(ctx.config(), "--address", f"127.0.0.1:{_closed_port()}", executor="ray"), "--address 127.0.0.1:"


def unreachable_mlflow(ctx):
    ctx.pre_existing_workdir()
    uri = f"http://127.0.0.1:{_closed_port()}"
    return ctx.run(ctx.config(), "--set", f"tracking_uri={uri}"), f"tracking_uri: cannot reach the MLflow server at {uri}"


def workdir_not_writable(ctx):
    blocker = ctx.tmp / "a-file"
    blocker.write_text("not a directory\n")
    ctx.workdir = blocker / "wd"
    return ctx.run(ctx.config()), f"--workdir {ctx.workdir}: not writable ({blocker} is not a directory)"


def sweep_target_out_of_range(ctx):
    cfg = ctx.config()
    return ["sweep", cfg, "--workdir", str(ctx.workdir), "--targets", "0.5,1.2"], "--targets: 1.2 is outside (0, 1)"


def sweep_unknown_task(ctx):
    cfg = ctx.config()
    return ["sweep", cfg, "--workdir", str(ctx.workdir), "--tasks", "sal,depth"], "--tasks: depth not among"


def sweep_without_step1(ctx):
    return ["sweep", ctx.config({"steps": []}), "--workdir", str(ctx.workdir)], "steps: a sweep varies step1"


def sweep_pick_not_a_sweep(ctx):
    ctx.pre_existing_workdir()
    return (["sweep", "pick", "--workdir", str(ctx.workdir), "--out", str(ctx.workdir / "picked")],
            "not a sweep directory (no sweep.json)")


CASES = {
    "sweep-target-out-of-range": sweep_target_out_of_range,
    "sweep-unknown-task": sweep_unknown_task,
    "sweep-without-step1": sweep_without_step1,
    "sweep-pick-not-a-sweep": sweep_pick_not_a_sweep,
    "unknown-task": unknown_task,
    "subtask-is-base": subtask_is_base,
    "empty-task-list": empty_tasks,
    "steps-out-of-order": steps_out_of_order,
    "lr-negative": lr_negative,
    "lr-zero": lr_zero,
    "batch-size-zero": batch_size_zero,
    "workers-zero": workers_zero,
    "holdout-below-workers": holdout_below_workers,
    "set-value-not-yaml": set_value_not_yaml,
    "gpus-beyond-any-node": gpus_beyond_any_node,
    "cuda-with-a-fraction-of-a-gpu": cuda_with_a_fraction_of_a_gpu,
    "workers-beyond-the-cluster": workers_beyond_the_cluster,
    "submit-relative-dataset-root": submit_with_a_relative_dataset_root,
    "submit-relative-workdir": submit_without_an_absolute_workdir,
    "deepspeed-stage-7": deepspeed_stage_7,
    "img-size-not-divisible": img_size_not_divisible,
    "missing-dataset-root": missing_dataset_root,
    "holdout-leaves-no-batch": holdout_leaves_no_batch,
    "stream-on-still-images": stream_on_still_images,
    "stream-split-layer-beyond-depth": stream_split_layer_beyond_depth,
    "split-lists-missing-files": split_lists_missing_files,
    "label-out-of-range": label_out_of_range,
    "yaml-not-a-mapping": yaml_not_a_mapping,
    "unknown-set-key": unknown_set_key,
    "pretrained-missing-keys": pretrained_missing_keys,
    "subtask-of-another-base": subtask_of_another_base,
    "unreachable-ray-address": unreachable_ray_address,
    "unreachable-mlflow": unreachable_mlflow,
    "workdir-not-writable": workdir_not_writable,
}
assert SUBPROCESS <= set(CASES)


@pytest.fixture(scope="module")
def two_suites(tiny_suite, tmp_path_factory):
    """Two finished tiny suites (same tasks, different seeds: different bases), trained through
    the launcher with the in-process executor."""
    root = tmp_path_factory.mktemp("two-suites")
    out = []
    for seed in (0, 1):
        raw = tiny_suite(f"suite{seed}", iters=2, seed=seed)
        cfg = root / f"suite{seed}.yaml"
        cfg.write_text(yaml.safe_dump(raw))
        workdir = root / f"suite{seed}"
        assert main(["run", str(cfg), "--workdir", str(workdir), "--executor", "inprocess", "--no-progress"]) == 0
        out.append(workdir)
    return out


# Warnings a plain `python` run prints by default (what pytest would otherwise swallow).
_SILENT = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


@pytest.fixture
def saved_environ():
    """The launcher sets a few environment variables for Ray and MLflow: undo them after a case."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, tiny_suite, tiny_data, tmp_path, request, capfd,
                                                            saved_environ):
    ctx = Ctx(tmp_path, tiny_suite, tiny_data, request)
    argv, needle = CASES[case](ctx)
    before = _snapshot(ctx.workdir)
    assert (before is not None) == ctx.existing
    capfd.readouterr()  # whatever setting the case up printed
    start = time.monotonic()
    if case in SUBPROCESS:
        proc = subprocess.run([sys.executable, "-m", "launcher", *argv], cwd=REPO, capture_output=True, text=True,
                              timeout=120)
        code, err = proc.returncode, proc.stderr
    else:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for category in _SILENT:
                warnings.simplefilter("ignore", category)
            code = main(argv)
        err = capfd.readouterr().err
        assert not caught, f"warnings a real run would print: {[str(w.message) for w in caught]}"
    elapsed = time.monotonic() - start
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and err.endswith("\n"), f"not one line:\n{err}"
    assert needle in err, err
    assert _snapshot(ctx.workdir) == before, f"{ctx.workdir} changed"
    assert elapsed < 30, f"{case}: took {elapsed:.0f} s to refuse"
