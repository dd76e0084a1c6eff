"""The shared inference engine: exactness against dense sub-task models, every sparse path,
thresholds, FLOPs, checkpoint checks, calibration and the bench contract (vit_debug, patch 8)."""
import json

import pytest
import torch

from mtshare import checkpoint as ckpt
from mtshare import flops
from mtshare.bench import CONTRACT_KEYS, run_bench, synthetic_deltas
from mtshare.engine import SharedEngine, SparsePolicy, calibrate
from mtshare.models import build_model
from mtshare.models.delta import add_deltas

PATCH = 8
SUBTASKS = {"human_parts": (7, 0.98), "sal": (2, 0.9), "normals": (3, 0.5)}  # channels, delta sparsity


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread. On a shared 2-core machine every OpenMP region of a 2-thread
    run waits for a time slice, which makes these micro-sized ops 100x slower."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def suite():
    """A random base (semseg) and three sub-tasks whose deltas sit at different sparsities."""
    torch.manual_seed(0)
    base = build_model("vit_debug", PATCH, "semseg", 21).eval()
    enc = base.encoder.state_dict()
    subs = {}
    for i, (task, (ch, sparsity)) in enumerate(SUBTASKS.items()):
        subs[task] = (synthetic_deltas(enc, sparsity, scale=0.2, seed=i + 1),
                      build_model("vit_debug", PATCH, task, ch).head.eval())
    return base, subs


def _engine(suite, **kw):
    base, subs = suite
    kw.setdefault("collect_stats", True)
    return SharedEngine(base.encoder.cfg, "semseg", base.encoder.state_dict(), base.head, subs, **kw)


def _reference(suite, task):
    """The sub-task as a plain dense model: base encoder + add_deltas with δ set, mask mode."""
    base, subs = suite
    ch = 21 if task == "semseg" else SUBTASKS[task][0]
    model = build_model("vit_debug", PATCH, task, ch)
    model.encoder.load_state_dict(base.encoder.state_dict())
    if task == "semseg":
        model.head.load_state_dict(base.head.state_dict())
        return model.eval()
    deltas, head = subs[task]
    params = add_deltas(model.encoder)
    with torch.no_grad():
        for name, dp in params.items():
            dp.delta.copy_(deltas[name])
            dp.mode = "mask"
    model.head.load_state_dict(head.state_dict())
    return model.eval()


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("size", [32, 48, 64])
def test_exact_float32_at_tau_zero(suite, size):
    engine = _engine(suite)
    x = torch.randn(2, 3, size, size)
    out = engine(x)
    with torch.no_grad():
        for task in engine.tasks:
            ref = _reference(suite, task)(x)
            assert out[task].shape == ref.shape
            assert _rel(out[task], ref) < 1e-5, task
    # at τ = 0 every row survives: gathered rows + a CSR weight would cost more than the layer,
    # so every layer runs merged (never above its dense cost)
    paths = {t: set(engine.last_stats[t].paths.values()) for t in SUBTASKS}
    assert paths == {t: {"merged"} for t in SUBTASKS}
    for t in SUBTASKS:
        assert engine.last_stats[t].rows_skipped == 0.0


def test_exact_bfloat16(suite):
    engine = _engine(suite, dtype=torch.bfloat16)
    x = torch.randn(2, 3, 48, 48)
    out = engine(x)
    with torch.no_grad():
        for task in engine.tasks:
            ref = _reference(suite, task).to(torch.bfloat16)(x.to(torch.bfloat16))
            assert out[task].dtype == torch.bfloat16
            assert _rel(out[task], ref) < 1e-2, task


def test_dense_model_matches_reference(suite):
    engine = _engine(suite)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        for task in SUBTASKS:
            assert _rel(engine.dense_model(task)(x), _reference(suite, task)(x)) < 1e-6


POLICIES = {  # force each path (cols_fill_min > 1: CSR even for normals' 50 %-dense delta)
    "gather": SparsePolicy(gather_max=1.0, csr_weight_max=1.0, cols_fill_min=2.0, never_above_dense=False),
    "dense": SparsePolicy(gather_max=0.0, csr_weight_max=1.0, cols_fill_min=2.0, never_above_dense=False),
    "merged": SparsePolicy(gather_max=1.0, csr_weight_max=0.0),
}


def test_every_path_is_exercised_and_exact(suite):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        refs = {t: _reference(suite, t)(x) for t in SUBTASKS}
    for expect, policy in POLICIES.items():
        engine = _engine(suite, policy=policy)
        out = engine(x)
        for task in SUBTASKS:
            used = set(engine.last_stats[task].paths.values())
            assert used == ({"merged"} if expect == "merged" else {f"{expect}+csr"}), (expect, used)
            assert _rel(out[task], refs[task]) < 1e-5, (expect, task)


def test_column_deltas_run_as_column_blocks_exactly(suite):
    """Deltas with whole zero input columns (column gates) run as one GEMM on the gathered
    columns (``cols``), give the dense model's outputs, and count the block's work."""
    base, _ = suite
    enc = base.encoder.state_dict()
    subs = {"sal": (synthetic_deltas(enc, 0.9, scale=0.2, seed=5, gates="column"),
                    build_model("vit_debug", PATCH, "sal", 2).head.eval())}
    col_suite = (base, subs)
    engine = SharedEngine(base.encoder.cfg, "semseg", enc, base.head, subs, collect_stats=True,
                          policy=SparsePolicy(gather_max=1.0, csr_weight_max=1.0, never_above_dense=False))
    lin = engine.subtasks["sal"].linears["blocks.0.attn.qkv"]
    assert lin.mode == "cols" and lin.sparse.block.shape == (192, 64 - round(0.9 * 64))
    assert lin.weight_work == lin.sparse.block.numel() >= lin.weight_nnz  # FLOPs count the whole block
    assert engine.subtasks["sal"].patch.mode == "cols"
    x = torch.randn(2, 3, 32, 32)
    out = engine(x)
    assert set(engine.last_stats["sal"].paths.values()) == {"gather+cols"}
    with torch.no_grad():
        ref = _reference(col_suite, "sal")(x)
        assert _rel(out["sal"], ref) < 1e-5
        assert _rel(engine.dense_model("sal")(x), ref) < 1e-6
    # element deltas of the same density stay CSR
    el = SharedEngine(base.encoder.cfg, "semseg", enc, base.head,
                      {"sal": (synthetic_deltas(enc, 0.9, scale=0.2, seed=5), subs["sal"][1])})
    assert el.subtasks["sal"].linears["blocks.0.attn.qkv"].mode == "csr"


def test_skip_path_for_a_zero_delta(suite):
    base, subs = suite
    zero = {k: torch.zeros_like(v) for k, v in base.encoder.state_dict().items()}
    head = build_model("vit_debug", PATCH, "sal", 2).head.eval()
    engine = SharedEngine(base.encoder.cfg, "semseg", base.encoder.state_dict(), base.head, {"sal": (zero, head)},
                          collect_stats=True)
    x = torch.randn(2, 3, 32, 32)
    assert set(engine(x) and engine.last_stats["sal"].paths.values()) == {"merged"}  # τ = 0: plain GEMMs
    engine.set_thresholds("sal", {p: 1e-6 for p in engine.linear_paths()})  # any τ: identical rows skip
    out = engine(x)
    assert set(engine.last_stats["sal"].paths.values()) == {"skip+zero"}
    with torch.no_grad():
        ref = head(base.encoder(x), out_size=(32, 32))
    assert _rel(out["sal"], ref) < 1e-6
    # a sub-task without deltas costs attention + its head only
    assert engine.last_stats["sal"].executed_flops < 0.5 * engine.last_stats["semseg"].executed_flops


def test_thresholds_change_outputs_little_cut_flops_and_are_path_independent(suite):
    x = torch.randn(2, 3, 64, 64)
    exact = _engine(suite)(x)
    results = {}
    for mode, policies in (("token", ("gather", "dense")), ("element", ("csr", "dense"))):
        for name in policies:
            if name == "csr":
                policy = SparsePolicy(gather_max=0.0, csr_act_max=1.0, csr_weight_max=1.0, never_above_dense=False)
            else:
                policy = POLICIES[name]
            engine = _engine(suite, policy=policy, threshold_mode=mode)
            engine.fit_thresholds(x, 0.6)  # keep 60 % of the rows / entries of every delta
            thresholds = {t: dict(engine.thresholds[t]) for t in ("human_parts", "sal")}
            engine.thresholds["normals"] = {}  # merged layers ignore τ anyway
            for t, th in thresholds.items():
                assert th and all(v > 0 for v in th.values())
            out = engine(x)
            results[(mode, name)] = (out, thresholds, engine.last_stats)
            for t in ("human_parts", "sal"):
                assert {p.split("+")[0] for p in engine.last_stats[t].paths.values()} <= {name, "skip"}
                assert 0 < _rel(out[t], exact[t]) < 0.3, (mode, name, t)
        # same thresholds, different paths: the same function
        (o1, th1, s1), (o2, th2, _) = results[(mode, policies[0])], results[(mode, policies[1])]
        for t in ("human_parts", "sal"):
            eng2 = _engine(suite, policy=POLICIES["dense"], threshold_mode=mode)
            eng2.set_thresholds(t, th1[t])
            # (element mode: entries within rounding of τ may flip between paths)
            assert _rel(eng2(x)[t], o1[t]) < (1e-5 if mode == "token" else 5e-3), (mode, t)
            # fewer FLOPs than at τ = 0
            exact_engine = _engine(suite, threshold_mode=mode)
            exact_engine(x)
            assert s1[t].theoretical_flops < 0.8 * exact_engine.last_stats[t].theoretical_flops
    # rows kept whole (token) vs entries (element): row density 0.6 in token mode
    stats = results[("token", "gather")][2]["sal"]
    assert abs(sum(stats.row_density.values()) / len(stats.row_density) - 0.6) < 0.05


def test_flops_agree_with_mtshare_flops(suite):
    engine = _engine(suite)
    x = torch.randn(1, 3, 64, 64)
    engine.fit_thresholds(x, 0.5)
    engine(x)
    base_model = _reference(suite, "semseg")
    assert engine.last_stats["semseg"].executed_flops == pytest.approx(flops.dense_flops(base_model, 64), rel=1e-9)
    for task in SUBTASKS:
        model = engine.dense_model(task)
        st = engine.last_stats[task]
        expect = flops.shared_flops(model, 64, engine.delta_nnz(task), st.act_density)
        assert st.theoretical_flops == pytest.approx(expect, rel=1e-9), task


def test_from_checkpoints_and_refusal_of_another_base(suite, tmp_path):
    base, subs = suite
    manifest = {"task": "semseg", "model": {"flavor": "vit_debug", "patch_size": PATCH}}
    base_sha = ckpt.save_dense(tmp_path / "base.safetensors", base.encoder.state_dict(), base.head.state_dict(), manifest)
    paths = {}
    for task, (deltas, head) in subs.items():
        paths[task] = tmp_path / f"{task}.safetensors"
        ckpt.save_subtask(paths[task], deltas, head.state_dict(), {"task": task}, base_sha256=base_sha)
    engine = SharedEngine.from_checkpoints(tmp_path / "base.safetensors", paths)
    assert engine.tasks == ["semseg", *subs]
    x = torch.randn(1, 3, 32, 32)
    out, ref = engine(x), _engine(suite)(x)
    for task in engine.tasks:
        assert _rel(out[task], ref[task]) < 1e-6

    other = build_model("vit_debug", PATCH, "semseg", 21)  # another base: another checksum
    ckpt.save_dense(tmp_path / "other.safetensors", other.encoder.state_dict(), other.head.state_dict(), manifest)
    with pytest.raises(ckpt.CheckpointError, match="base sha256"):
        SharedEngine.from_checkpoints(tmp_path / "other.safetensors", {"sal": paths["sal"]})


def _noisy_metric(engine, seed):
    """A batch, its exact outputs, and a metric (higher is better) against noisy copies of them."""
    torch.manual_seed(seed)
    x = torch.randn(2, 3, 32, 32)
    exact = engine(x)
    targets = {t: exact[t] + torch.randn_like(exact[t]) * exact[t].std() for t in SUBTASKS}
    return x, exact, lambda task, out: -float((out - targets[task]).abs().mean())


def test_calibrate_keeps_metric_within_tolerance(suite):
    engine = _engine(suite)
    x, exact, metric = _noisy_metric(engine, 1)
    summary = calibrate(engine, x, metric, tolerance=0.005, steps=8)
    out = engine(x)  # the engine now runs with the chosen thresholds
    assert any(s["density"] < 1.0 for s in summary.values())
    for task, s in summary.items():
        m0, m = s["metric_ref"], metric(task, out[task])
        assert m == pytest.approx(s["metric"], rel=1e-6)
        assert m >= m0 - 0.005 * abs(m0), task

    # the task's own meter (mIoU for human_parts) through the targets dict
    labels = exact["human_parts"].argmax(1)
    summary = calibrate(engine, x, {"human_parts": labels, "sal": exact["sal"].argmax(1),
                                    "normals": torch.nn.functional.normalize(exact["normals"], dim=1)}, tolerance=0.05,
                        steps=4)
    assert summary["human_parts"]["metric_ref"] == pytest.approx(1.0)
    assert summary["human_parts"]["metric"] >= 0.95


def test_per_layer_calibration_lowers_layers_and_stays_feasible(suite):
    engine = _engine(suite)
    x, _, metric = _noisy_metric(engine, 2)
    glob = calibrate(engine, x, metric, tolerance=0.01, steps=6)
    summary = calibrate(engine, x, metric, tolerance=0.01, steps=6, per_layer=True)
    out = engine(x)
    lowered = 0
    for task, s in summary.items():
        assert s["density"] == glob[task]["density"]  # the same bisection first
        assert all(v <= s["density"] for v in s["layer_density"].values())
        lowered += len(s["layer_density"]) - 1
        m0, m = s["metric_ref"], metric(task, out[task])
        assert m == pytest.approx(s["metric"], rel=1e-6) and m >= m0 - 0.01 * abs(m0), task
    assert lowered > 0  # some layer could go lower than the common density


def test_bench_json_contract(tmp_path):
    r = run_bench("vit_debug", img=32, batch=1, tasks=3, sparsity=0.9, patch=8, repeats=1, warmup=0)
    json.dumps(r)
    for key in CONTRACT_KEYS:
        assert key in r
    for key in CONTRACT_KEYS[1:]:
        assert isinstance(r[key], float) and r[key] > 0
    assert r["config"]["tasks"] == 3 and r["config"]["task_names"] == ["semseg", "human_parts", "sal"]
    assert 0 < r["flops_ratio"] < 1  # 2 of 3 tasks shared at 90 % sparsity


def test_bench_cli_and_workdir(tiny_suite, tmp_path, capsys):
    """bench --workdir serves a trained suite as infer does: stored τ, its own val images."""
    from launcher.__main__ import main
    from mtshare.config import validate_suite
    from mtshare.infer import load_suite_engine
    from cluster.run import run_suite

    cfg = validate_suite(tiny_suite("benchwd", tasks=("sal",), steps=("step1",), iters=2), workdir=str(tmp_path))
    assert run_suite(cfg, tmp_path, progress=False, executor="inprocess") == 0
    tau = ckpt.read_manifest(tmp_path / "store/sal/step1/model.safetensors")["operating_point"]["tau"]
    engine, _ = load_suite_engine(tmp_path / "store")
    assert tau and engine.thresholds["sal"] == tau
    threads = torch.get_num_threads()
    capsys.readouterr()  # the suite's own output
    try:
        assert main(["bench", "--workdir", str(tmp_path), "--img", "32", "--tasks", "5", "--threads", "1",
                     "--format", "json"]) == 0
    finally:
        torch.set_num_threads(threads)
    r = json.loads(capsys.readouterr().out)
    assert r["config"]["task_names"] == ["semseg", "sal"] and r["config"]["img"] == 32
    assert r["per_task"]["sal"]["executed_flops"] <= r["per_task"]["sal"]["dense_flops"]
    assert 0 < r["flops_ratio"] <= 1.0
    assert r["config"]["threads"] == 1
    assert main(["bench", "--model", "vit_debug", "--threads", "0"]) == 2
    assert main(["bench", "--model", "vit_debug", "--img", "30"]) == 2  # 30 is not a multiple of 16


def test_report_plan_names_column_blocks():
    from mtshare.report import _plan

    point = {"rows_skipped": 0.4, "paths": {"gather+cols": 0.75, "merged": 0.25}}
    assert _plan(point) == "sparse (column blocks), 25% of layers merged"
    point = {"rows_skipped": 0.4, "paths": {"gather+csr": 1.0}}
    assert _plan(point) == "sparse"
    assert _plan({"rows_skipped": 0.0, "paths": {"gather+cols": 1.0}}) == "dense"


def test_plan_merges_a_layer_where_the_gather_does_not_pay_for_its_shape(suite):
    """The plan keeps a layer sparse only while its kept rows are under the gather crossover
    for its shape: 0.8 on ViT-B layers, less on the 64-wide layers of vit_debug, where the
    path's fixed element-wise work weighs as much as the GEMM it replaces."""
    policy = SparsePolicy()
    assert policy.gather_limit(768, 3072) == policy.gather_limit(768, 2304) == 0.8
    assert policy.gather_limit(128, 128) == pytest.approx(0.5)
    assert policy.gather_limit(64, 64) == pytest.approx(0.0)  # proj: never pays at 64 wide
    assert policy.gather_limit(64, 192) == pytest.approx(1 / 3)  # qkv
    assert policy.gather_limit(64, 256) == pytest.approx(0.375)  # fc1, fc2
    x = torch.randn(2, 3, 64, 64)
    for density, sparse in ((0.45, ()), (0.3, ("attn.qkv", "mlp.fc1", "mlp.fc2"))):
        engine = _engine(suite)
        engine.fit_thresholds(x, {"human_parts": density})
        kinds = {p.split(".", 2)[2] for p in engine.thresholds["human_parts"]}
        assert kinds == set(sparse), (density, kinds)
        engine(x)  # the kept thresholds run sparse, the others merged
        paths = engine.last_stats["human_parts"].paths
        assert {p for p, how in paths.items() if how != "merged"} == set(engine.thresholds["human_parts"])
