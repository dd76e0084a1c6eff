"""The one training loop: schedules, stage specs, steps 1-3 behaviour, resume, the in-process suite."""
import json

import pytest
import torch

from mtshare import checkpoint as ckpt
from mtshare.config import ConfigError, load_suite_config, validate_suite
from mtshare.data import synthesize
from mtshare.models.delta import base_mode
from mtshare.report import build_report, format_report, load_results
from mtshare.stages import downstream, plan
from mtshare.suite import run_stage
from mtshare.train import Trainer, activation_rows, lr_factor


def tiny_suite(root, **over) -> dict:
    raw = {
        "name": "tiny",
        "dataset": {"name": "pascal_context", "root": str(root), "img_size": 32, "holdout": 6},
        "model": {"flavor": "vit_debug", "patch_size": 8},
        "tasks": ["sal", "normals"],
        "train": {
            "base": {"iters": 30, "batch_size": 8, "lr": 2e-3, "eval_every": 30},
            "step0": {"iters": 6, "batch_size": 8, "eval_every": 6},
            "step1": {"iters": 60, "batch_size": 8, "lr_delta": 1e-3, "lr_alpha": 0.3, "l0_lambda": 1e-5, "eval_every": 60},
            "step2": {"iters": 10, "batch_size": 8, "lr_delta": 1e-3, "eval_every": 10},
            "step3": {"iters": 10, "batch_size": 8, "lr_delta": 1e-3, "act_row": 1.0, "eval_every": 10},
        },
        # The FLOPs plan: under the time plan these briefly trained 64-wide sub-tasks may keep too
        # many rows for any layer to beat its merged GEMM (tests/test_sharing.py tests that plan).
        "calibration": {"plan": "flops"},
    }
    for k, v in over.items():
        raw[k] = v
    return raw


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return synthesize("pascal_context", tmp_path_factory.mktemp("data") / "pc", n=40, size=32, seed=1)


@pytest.fixture(scope="module")
def suite_run(data_root, tmp_path_factory):
    """Train the tiny suite once (base + 2 sub-tasks through step3 + step0 refs) in this process."""
    torch.set_num_threads(1)
    workdir = tmp_path_factory.mktemp("run")
    cfg = validate_suite(tiny_suite(data_root), workdir=str(workdir))
    from cluster.run import run_suite
    from mtshare.report import load_results

    # The one in-process path: the driver with every stage in this process (no Ray).
    assert run_suite(cfg, workdir, progress=False, executor="inprocess") == 0
    return cfg, workdir, load_results(workdir / "store")


def test_lr_factor_is_bounded_and_ends_at_zero():
    for sched in ("poly", "cosine", "constant"):
        vals = [lr_factor(i, 100, sched, 0.9, warmup=10) for i in range(0, 130)]  # past the end too
        assert all(0.0 <= v <= 1.0 for v in vals)
    assert lr_factor(100, 100, "poly") == 0.0
    assert lr_factor(0, 100, "poly") == 1.0
    assert lr_factor(50, 100, "poly", 0.9) == pytest.approx(0.5 ** 0.9)
    assert lr_factor(4, 100, "cosine", warmup=10) == pytest.approx(0.5)


def test_config_errors_name_the_field(data_root, tmp_path):
    bad = [
        ({"tasks": ["bogus"]}, "unknown task 'bogus'"),
        ({"tasks": ["semseg"]}, "base task"),
        ({"tasks": []}, "empty"),
        ({"steps": ["step2", "step1"]}, "steps"),
        ({"model": {"flavor": "vit_debug", "patch_size": 7}}, "patch_size"),
        ({"name": "../evil"}, "name"),
        ({"train": {"base": {"lr": -1}}}, "train.base.lr"),
        ({"bogus_key": 1}, "bogus_key"),
    ]
    for over, needle in bad:
        with pytest.raises(ConfigError, match=None) as e:
            validate_suite(tiny_suite(data_root, **over))
        assert needle in str(e.value), (over, str(e.value))
    p = tmp_path / "c.yaml"
    p.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_suite_config(p)
    p.write_text(json.dumps(tiny_suite(data_root)))
    with pytest.raises(ConfigError, match="nope"):
        load_suite_config(p, ["train.base.nope=3"])
    assert load_suite_config(p, ["train.base.iters=7"]).train.base.iters == 7


def test_plan_is_a_dag_base_then_pipelines(data_root):
    cfg = validate_suite(tiny_suite(data_root))
    stages = plan(cfg)
    names = [s.name for s in stages]
    assert names[0] == "base"
    assert {"sal/step0", "normals/step0", "sal/step3", "normals/step3"} <= set(names)
    for s in stages:
        for d in s.depends_on:
            assert names.index(d) < names.index(s.name)
    assert [s.name for s in stages if s.kind == "step0" and s.depends_on] == []
    assert downstream(stages, "sal/step1") == ["sal/step2", "sal/step3"]
    assert set(downstream(stages, "base")) == {f"{t}/step{k}" for t in ("sal", "normals") for k in (1, 2, 3)}


def test_tiny_suite_trains_and_reports(suite_run):
    cfg, workdir, results = suite_run
    report = build_report(load_results(workdir / "store"))
    text = format_report(report)
    assert "sal" in text and "normals" in text and "Δm" in text
    for t in ("sal", "normals"):
        row = report["tasks"][t]
        assert row["stage"] == f"{t}/step3"
        assert row["reference"] is not None
        assert row["delta_weight_sparsity"] > 0.5  # the L0 gates really closed most deltas
        assert row["flops"] < row["dense_flops"]
        assert row["params_stored"] < row["params_dense"] / 2
        # the operating point: stored τ, measured through the engine (exact value = the trainer's)
        assert row["tau"] and row["value_exact"] == pytest.approx(results[f"{t}/step3"]["metric"], rel=1e-4, abs=1e-6)
        assert ckpt.read_manifest(workdir / "store" / t / "step3/model.safetensors")["operating_point"]["tau"] == row["tau"]
    assert report["suite"]["delta_m"] is not None
    # stage checkpoints are what the results say they are
    for name, r in results.items():
        assert ckpt.sha256_file(workdir / "store" / name / "model.safetensors") == r["checksum"]
    assert results["sal/step1"]["metric"] > 0.3  # saliency maxF clearly above nothing


def test_step2_never_changes_masked_out_entries(suite_run):
    cfg, workdir, results = suite_run
    base_sha = results["base"]["checksum"]
    store = workdir / "store"
    d1, _, _ = ckpt.load_subtask(store / "sal/step1/model.safetensors", base_sha)
    d2, _, _ = ckpt.load_subtask(store / "sal/step2/model.safetensors", base_sha)
    changed = 0
    for k in d1:
        off = d1[k] == 0
        assert torch.all(d2[k][off] == 0), k  # outside the mask: untouched
        changed += int((d2[k][~off] != d1[k][~off]).sum())
    assert changed > 0  # inside the mask step2 did train


def test_step3_lowers_activation_difference_vs_step2(suite_run, data_root):
    cfg, workdir, results = suite_run
    store = workdir / "store"
    batch = None
    norms = {}
    for kind in ("step2", "step3"):
        spec = next(s for s in plan(cfg) if s.name == f"sal/{kind}")
        # Load the stage's *output* as a step3 model (deltas in mask mode) and measure the row penalty.
        probe = spec.model_copy(update={"kind": "step3", "prev_key": spec.output_key})
        tr = Trainer(probe, out_dir=workdir / "probe", base_path=store / "base/model.safetensors",
                     base_sha256=results["base"]["checksum"], prev_path=store / spec.output_key)
        if batch is None:
            batch = next(iter(tr.val_loader))["image"]
        tr.model.eval()
        with torch.no_grad():
            with base_mode(tr.deltas), tr.recorder.record() as base_acts:
                tr.model.encoder(batch)
            with tr.recorder.record() as sub_acts:
                tr.model.encoder(batch)
            norms[kind] = activation_rows(sub_acts, base_acts).item()
    assert norms["step3"] < norms["step2"], norms


def test_step1_l0_drives_sparsity_up(suite_run):
    _, _, results = suite_run
    assert results["sal/step1"]["delta_weight_sparsity"] > 0.5
    assert results["normals/step1"]["delta_weight_sparsity"] > 0.5


def test_stage_resumes_from_mid_stage_checkpoint(data_root, tmp_path):
    torch.set_num_threads(1)
    raw = tiny_suite(data_root)
    raw["train"]["base"].update(iters=12, ckpt_every=5, eval_every=12, fail_at_iter=7)
    cfg = validate_suite(raw)
    spec = plan(cfg)[0]
    from mtshare.train import StageFailure

    with pytest.raises(StageFailure, match="iteration 7"):
        run_stage(spec, tmp_path)
    state = ckpt.load_train_state(tmp_path / "base" / "resume" / "trainer.pt")
    assert state["iteration"] == 5 and "optimizer" not in state  # the moments are the stepper's
    moments = ckpt.load_train_state(tmp_path / "base" / "resume" / "optimizer.pt")["state"]
    assert moments and all(int(m["step"]) == 5 for m in moments.values())
    fixed = spec.model_copy(update={"optim": spec.optim.model_copy(update={"fail_at_iter": None})})
    resumed_at = []
    r = run_stage(fixed, tmp_path, on_log=lambda d, i: resumed_at.append(d["resumed_from"]) if "resumed_from" in d else None)
    assert r["resumed_from"] == 5 and resumed_at == [5.0]
    assert r["iterations"] == 12
    assert not (tmp_path / "base" / "resume").exists()


def test_subtask_refuses_a_base_with_another_checksum(suite_run, tmp_path):
    cfg, workdir, results = suite_run
    spec = next(s for s in plan(cfg) if s.name == "sal/step2")
    with pytest.raises(ckpt.CheckpointError, match="checksum"):
        Trainer(spec, out_dir=tmp_path, base_path=workdir / "store/base/model.safetensors",
                base_sha256="0" * 64, prev_path=workdir / "store/sal/step1/model.safetensors")


def test_infer_writes_panels_and_raw_arrays_for_every_task(suite_run, tmp_path):
    import numpy as np
    from PIL import Image

    from mtshare.infer import infer_images

    cfg, workdir, results = suite_run
    img = tmp_path / "odd.png"  # any size: larger than img_size and not a multiple of the patch
    Image.fromarray((np.random.default_rng(0).random((45, 70, 3)) * 255).astype(np.uint8)).save(img)
    panels = infer_images(workdir, [img], tmp_path / "out")
    assert panels == [tmp_path / "out" / "odd" / "panel.png"] and panels[0].stat().st_size > 1000
    for task in ("semseg", "sal", "normals"):
        arr = np.load(tmp_path / "out" / "odd" / f"{task}.npy")
        assert arr.shape[:2] == (45, 70), task
    normals = np.load(tmp_path / "out" / "odd" / "normals.npy")
    assert np.allclose(np.linalg.norm(normals, axis=-1), 1, atol=1e-4)
    sal = np.load(tmp_path / "out" / "odd" / "sal.npy")
    assert sal.min() >= 0 and sal.max() <= 1

    # served by the shared engine at the stored τ, not by a dense model: same image through
    # load_suite_engine reproduces the file; the dense sub-task model (τ = 0) does not
    import torch.nn.functional as F

    from mtshare.infer import load_suite_engine, prepare_image
    from mtshare.visualize import to_prediction

    engine, manifest = load_suite_engine(workdir / "store")
    assert engine.thresholds["sal"]  # a calibrated operating point
    x, rgb, (ch, cw) = prepare_image(img, cfg.dataset.img_size, cfg.model.patch_size)

    def served(out):
        out = F.interpolate(out[None, :, :ch, :cw], size=rgb.shape[:2], mode="bilinear", align_corners=False)[0]
        return to_prediction("sal", out)

    assert np.allclose(served(engine(x)["sal"][0]), sal, atol=1e-6)
    with torch.no_grad():
        dense = served(engine.dense_model("sal")(x)[0])
    assert not np.allclose(dense, sal, atol=1e-6)


def test_report_plots_are_written(suite_run, tmp_path):
    from mtshare.plots import accuracy_vs_flops, layer_sparsity

    cfg, workdir, results = suite_run
    a = accuracy_vs_flops(results, tmp_path / "acc.png")
    b = layer_sparsity(workdir / "store", results, tmp_path / "sp.png")
    assert a.stat().st_size > 5000 and b.stat().st_size > 5000
