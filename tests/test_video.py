"""bench --video and infer --video on a tiny trained suite: labelled sequences (calibrated
temporal τ, metrics), an unlabelled folder (τ = 0: the stream is exact), a video file, the
animation, and bad input."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import launcher_in_process as _launcher  # the command line, in this process
from mtshare.data import synthesize_sequences

@pytest.fixture(scope="module")
def suite_dir(tiny_suite, tmp_path_factory):
    from cluster.run import run_suite
    from mtshare.config import validate_suite

    tmp = tmp_path_factory.mktemp("videosuite")
    cfg = validate_suite(tiny_suite("video", tasks=("sal",), steps=("step1",), iters=2), workdir=str(tmp))
    assert run_suite(cfg, tmp, progress=False, executor="inprocess") == 0
    return tmp


@pytest.fixture(scope="module")
def frames_root(tmp_path_factory):
    """Static-camera sequences in the PASCAL-Context layout at the suite's size (32 px)."""
    return synthesize_sequences("pascal_context", tmp_path_factory.mktemp("vid") / "seqs", sequences=4, frames=6,
                                size=32, seed=2, camera="static")


def _val_sequence(root: Path) -> Path:
    seq = (root / "ImageSets/Context/val.txt").read_text().split()[0].split("/")[0]
    return root / "JPEGImages" / seq


def test_bench_video_on_a_labelled_sequence(suite_dir, frames_root):
    r = _launcher("bench", "--video", str(_val_sequence(frames_root)), "--workdir", str(suite_dir),
                  "--keyframe-every", "3", "--split-layer", "0", "--threads", "1", "--repeats", "3", "--format", "json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for key in ("independent_ms", "engine_ms", "stream_ms", "stream_flops_ratio", "stream_time_ratio"):
        assert out[key] > 0, key
    # timed over 3 passes: the ratio is the median of the passes' own ratios
    passes = out["stream_time_ratio_passes"]
    assert out["config"]["passes"] == len(passes) == 3 and out["stream_time_ratio"] == sorted(passes)[1]
    assert out["config"]["labelled"] and out["config"]["frames"] == 6
    assert "calibrated on train sequences" in out["config"]["temporal_thresholds"]
    assert out["stream_flops_ratio"] == pytest.approx(out["flops"]["stream"] / out["flops"]["engine"])
    assert set(out["metrics"]) == {"semseg", "sal"}
    for m in out["metrics"].values():
        assert 0 <= m["engine"] <= 1 and 0 <= m["stream"] <= 1


def test_bench_video_unlabelled_folder_and_video_file_run_exact(suite_dir, frames_root, tmp_path):
    """Outside a dataset layout there is nothing to calibrate on: τ = 0, and the stream's
    outputs are the engine's, frame by frame (split layer = depth: the sub-task takes its task
    deltas, at its stored operating point, in every block, as the engine does)."""
    folder = Path(shutil.copytree(_val_sequence(frames_root), tmp_path / "clip"))
    r = _launcher("bench", "--video", str(folder), "--workdir", str(suite_dir), "--keyframe-every", "4",
                  "--split-layer", "4", "--threads", "1", "--format", "json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["config"]["temporal_thresholds"].startswith("none") and out["metrics"] is None
    assert max(out["stream_output_rel_err"].values()) < 1e-5

    import cv2

    video = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 8, (32, 32))
    for p in sorted(folder.iterdir()):
        writer.write(np.asarray(Image.open(p))[..., ::-1])
    writer.release()
    r = _launcher("bench", "--video", str(video), "--model", "vit_debug", "--img", "32", "--keyframe-every", "2",
                  "--threads", "1", "--format", "json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["config"]["frames"] == 6 and out["config"]["source"].startswith("synthetic")
    assert max(out["stream_output_rel_err"].values()) < 1e-5
    # uncalibrated thresholds (synthetic benchmarks): rows are skipped, outputs move, FLOPs fall
    r = _launcher("bench", "--video", str(video), "--model", "vit_debug", "--img", "32", "--keyframe-every", "6",
                  "--temporal-scale", "2", "--threads", "1", "--format", "json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["config"]["temporal_thresholds"].startswith("uncalibrated")
    assert out["stream_flops_ratio"] < 1 and max(out["stream_output_rel_err"].values()) > 1e-5


def test_bench_video_cameras_stream_as_one_batch(suite_dir, frames_root, tmp_path):
    """Several videos are several cameras, one batch per frame: at τ = 0 the batched stream is
    exact (unlabelled copies, one cut to the shorter; split = depth, as in the test above), and
    with labels the metric is pooled over every camera's frames, each output scored against its
    own camera's labels."""
    from mtshare import operating_point as op
    from mtshare.video import _load

    seqs = [frames_root / "JPEGImages" / s for s in sorted(p.name for p in (frames_root / "JPEGImages").iterdir())[:2]]
    short = tmp_path / "short"
    short.mkdir()
    for p in sorted(seqs[1].iterdir())[:4]:
        shutil.copy(p, short / p.name)
    long_ = Path(shutil.copytree(seqs[0], tmp_path / "long"))
    r = _launcher("bench", "--video", long_, short, "--workdir", suite_dir, "--keyframe-every", "3",
                  "--split-layer", "4", "--threads", "1", "--repeats", "1", "--format", "json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["config"]["cameras"] == 2 and out["config"]["frames"] == 4
    assert out["config"]["video"] == [str(long_), str(short)]
    # (1e-4, not 1e-5: at batch 2 a float32 rounding of the base can move a row across sal's
    # stored task τ; frames out of order or paired with the wrong camera would be off by O(1))
    assert max(out["stream_output_rel_err"].values()) < 1e-4

    r = _launcher("bench", "--video", *seqs, "--workdir", suite_dir, "--keyframe-every", "3", "--temporal-scale", "1",
                  "--threads", "1", "--repeats", "1", "--format", "json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["config"]["cameras"] == 2 and out["config"]["labelled"] and out["stream_flops_ratio"] < 1
    first = _load(seqs[0], suite_dir, "", 0, "cpu")
    videos = [first, _load(seqs[1], suite_dir, "", 0, "cpu", suite=first)]
    engine = first.engine
    n = min(len(v.frames) for v in videos)
    with torch.inference_mode():
        outputs = [engine(v.frames[f:f + 1])["sal"] for v in videos for f in range(n)]
    labels = torch.cat([v.labels["sal"][:n] for v in videos])
    expected = op.pooled_value("sal", "pascal_context", outputs, labels)
    assert out["metrics"]["sal"]["engine"] == pytest.approx(expected, abs=1e-4)


def test_infer_video_writes_panels_and_the_animation(suite_dir, frames_root, tmp_path):
    r = _launcher("infer", "--workdir", str(suite_dir), "--video", str(_val_sequence(frames_root)),
                  "--out", str(tmp_path / "out"), "--keyframe-every", "3")
    assert r.returncode == 0, r.stderr
    gif = Path(r.stdout.strip().splitlines()[-1])
    assert gif == tmp_path / "out" / "animation.gif"
    with Image.open(gif) as im:
        assert im.n_frames == 6
    panels = sorted((tmp_path / "out" / "frames").glob("*.png"))
    assert len(panels) == 6
    first, last = (np.asarray(Image.open(p)) for p in (panels[0], panels[-1]))
    assert first.shape == last.shape and not np.array_equal(first, last)  # the objects moved


@pytest.mark.parametrize("args, names", [
    (["bench", "--video", "/nonexistent/clip", "--model", "vit_debug", "--img", "32"], "/nonexistent/clip"),
    (["bench", "--video", "EMPTY", "--model", "vit_debug", "--img", "32"], "no frames"),
    (["bench", "--video", "EMPTY", "--model", "vit_debug", "--keyframe-every", "0"], "--keyframe-every"),
    (["bench", "--video", "CLIP", "--model", "vit_debug", "--img", "32", "--temporal-scale", "0"], "--temporal-scale"),
    (["bench", "--video", "CLIP", "--model", "vit_debug", "--img", "32", "--repeats", "0"], "--repeats"),
])
def test_video_bad_input(args, names, tmp_path, frames_root):
    (tmp_path / "empty").mkdir()
    args = [str(tmp_path / "empty") if a == "EMPTY" else str(_val_sequence(frames_root)) if a == "CLIP" else a
            for a in args]
    r = _launcher(*args)
    assert r.returncode == 2, r.stderr
    assert names in r.stderr and r.stderr.strip().count("\n") == 0



def test_a_suite_trained_on_sequences_stores_and_reports_its_stream(tiny_suite, tmp_path, tiny_data):
    """A suite with a `stream` section on a dataset of frame sequences: the base, then the
    sub-task, calibrate their temporal τ on the holdout frames and measure the stream on the
    val sequences; the τ are in the checkpoints, the figures in the report, and bench --video
    serves them. On still images the same suite is refused before anything trains."""
    from cluster.run import run_suite
    from mtshare import checkpoint as ckpt
    from mtshare.config import ConfigError, validate_suite
    from mtshare.infer import load_suite_engine
    from mtshare.models.vit import FLAVORS

    root = synthesize_sequences("pascal_context", tmp_path / "data", sequences=6, frames=8, size=32, seed=4,
                                camera="static")
    raw = tiny_suite("videosuite", tasks=("sal",), steps=("step1", "step2", "step3"), iters=2,
                     stream={"keyframe_every": 4, "split_layer": 0})
    raw["train"]["step3"].update(act_penalty="row", act_row=1.0)  # act_temporal unset: = act_row on sequences
    raw["dataset"] = {**raw["dataset"], "root": str(root), "holdout": 8}
    cfg = validate_suite(raw, workdir=str(tmp_path / "run"))
    assert run_suite(cfg, tmp_path / "run", progress=False, executor="inprocess") == 0
    store = tmp_path / "run" / "store"
    for stage in ("base", "sal/step3"):
        stream = ckpt.read_manifest(store / stage / "model.safetensors")["stream"]
        assert stream["keyframe_every"] == 4
        assert stream["frames"] == 16 and stream["clips"] == 2  # the 2 val sequences, every frame
        assert 0 < stream["flops"] <= stream["flops_engine"] * 1.5
    # sal's plan: its own caches from block 0 (as configured) or task deltas in every block,
    # whichever streamed the holdout with fewer FLOPs
    depth = FLAVORS[cfg.model.flavor]["depth"]
    plans = stream["calibration"]["plans"]
    assert set(plans) == {"0", str(depth)} and all(v > 0 for v in plans.values())
    split = stream["split_layer"]
    assert plans[str(split)] == min(plans.values())
    from mlflow.tracking import MlflowClient

    state = json.loads((store / "state.json").read_text())
    step3 = next(st for st in state["stages"] if st["name"] == "sal/step3")
    client = MlflowClient(f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}")
    temporal = client.get_metric_history(step3["mlflow_run_id"], "act_temporal")
    assert len(temporal) == 2 and all(m.value > 0 for m in temporal)  # step3 trained on 2-frame clips
    engine, _ = load_suite_engine(store)
    assert set(engine.temporal_thresholds) == {"semseg", "sal"}
    assert engine.stream_settings == {"keyframe_every": 4, "split_layer": split}

    r = _launcher("report", "--workdir", str(tmp_path / "run"), "--format", "json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert set(rep["tasks"]["sal"]["stream"]) >= {"value", "value_engine", "flops", "flops_engine", "tau"}
    s = rep["suite"]["stream"]
    assert s["flops"] == pytest.approx(sum(t["stream"]["flops"] for t in rep["tasks"].values()))
    assert s["flops_ratio"] == pytest.approx(s["flops"] / s["flops_engine"])
    text = _launcher("report", "--workdir", str(tmp_path / "run")).stdout
    assert "video stream (val sequences, keyframe every 4" in text

    val_seq = _val_sequence(root)
    r = _launcher("bench", "--video", str(val_seq), "--workdir", str(tmp_path / "run"), "--threads", "1",
                  "--format", "json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["config"]["temporal_thresholds"] == "stored with the suite"
    assert out["config"]["keyframe_every"] == 4 and out["config"]["split_layer"] == split

    still = validate_suite(tiny_suite("stillstream", tasks=("sal",), steps=("step1",), iters=2,
                                      stream={"keyframe_every": 4}), workdir=str(tmp_path / "still"))
    with pytest.raises(ConfigError, match="no frame sequences"):  # found before anything trains
        run_suite(still, tmp_path / "still", progress=False, executor="inprocess")
