"""Sharing behaviour end to end on the tiny flavor: the L0 penalty is the gate's real expected
L0, step1's controller reaches its sparsity, step3's row penalty empties activation rows, and
the calibrated operating point holds on data the model never trained on.

One tiny suite (base → sal/step1 → step2 → step3, a few seconds) is trained once for the module.
"""
import math

import pytest
import torch
from torch.utils.data import DataLoader

from mtshare import checkpoint as ckpt
from mtshare import operating_point as op
from mtshare.config import validate_suite
from mtshare.data import build_dataset
from mtshare.engine import SharedEngine, SparsePolicy
from mtshare.models import build_model
from mtshare.models.delta import (
    ActivationRecorder, DeltaParam, add_deltas, base_mode, close_smallest, delta_sparsity, effective_deltas,
    gate_sparsity, prob_nonzero, skip_rows,
)
from mtshare.stages import plan
from mtshare.suite import run_stage
from mtshare.train import L0_WEIGHT_RANGE, LINEAR_INPUTS, build_stage_model, next_l0_weight

TARGET = 0.5  # step1's target_weight_sparsity in the shared suite
ACT_ROW = 5.0  # step3's row-penalty weight in the shared suite (the comparison run uses 0)


# --- the shared tiny suite ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tiny_suite, tmp_path_factory):
    """base (20 it) → sal/step1 (50 it, target sparsity 0.5, controller on) → step2 (6 it) →
    step3 (10 it, act_row 5, calibrated), plus ``sal/step3_norow``: the same step3 from the same
    step2 checkpoint with act_row 0 (same seed, same iterations; not calibrated)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    workdir = tmp_path_factory.mktemp("sharing")
    raw = tiny_suite("sharing", tasks=["sal"], steps=["step1", "step2", "step3"])
    quiet = {"ckpt_every": 1000, "log_every": 1000}
    raw["train"]["base"].update(iters=20, eval_every=20, lr=2e-3, **quiet)
    raw["train"]["step1"].update(iters=50, eval_every=50, lr_delta=1e-3, lr_alpha=0.3,
                                 target_weight_sparsity=TARGET, ckpt_every=1000, log_every=1)
    raw["train"]["step2"].update(iters=6, eval_every=6, lr_delta=1e-3, **quiet)
    raw["train"]["step3"].update(iters=10, eval_every=10, lr_delta=1e-3, act_penalty="row", act_row=ACT_ROW, **quiet)
    # The FLOPs plan: under the time plan this briefly trained 64-wide sal keeps too many rows for
    # any layer to beat its merged GEMM, and there would be no τ to test.
    raw["calibration"] = {**raw.get("calibration", {}), "plan": "flops"}
    cfg = validate_suite(raw, workdir=str(workdir))
    store = workdir / "store"
    specs = {s.name: s for s in plan(cfg)}
    results, logs = {}, {}
    try:
        for spec in specs.values():
            logs[spec.name] = []
            sha = results["base"]["checksum"] if spec.base_key else None
            results[spec.name] = run_stage(spec, store, base_sha256=sha,
                                           on_log=lambda d, i, out=logs[spec.name]: out.append((i, dict(d))))
        s3 = specs["sal/step3"]
        norow = s3.model_copy(update={"name": "sal/step3_norow", "calibration": None,
                                      "optim": s3.optim.model_copy(update={"act_row": 0.0})})
        specs[norow.name] = norow
        results[norow.name] = run_stage(norow, store, base_sha256=results["base"]["checksum"])
    finally:
        torch.set_num_threads(threads)
    return {"cfg": cfg, "store": store, "specs": specs, "results": results, "logs": logs}


def _base_sha(trained) -> str:
    return trained["results"]["base"]["checksum"]


# --- 1. the L0 penalty is the expected L0 of the gate the forward uses ---------------------------

def test_l0_penalty_is_the_expected_l0_of_the_product_gate():
    torch.manual_seed(0)
    d = DeltaParam(torch.Size((64, 32)))
    with torch.no_grad():
        d.log_alpha.uniform_(-3.0, 3.0)
        d.log_alpha_tensor.fill_(0.3)
    d.train()  # gate() samples z_i · z_g exactly as the training forward does
    draws = 4000
    with torch.no_grad():
        counts = torch.stack([(d.gate() != 0).sum() for _ in range(draws)]).double()
    mc, se = counts.mean().item(), counts.std().item() / math.sqrt(draws)
    l0 = d.l0().item()
    assert abs(mc - l0) < 4 * se, (mc, l0, se)
    # Power guard: the old sum form Σσ(α_i) + σ(α_g) is tens of standard errors away.
    old = (prob_nonzero(d.log_alpha).sum() + prob_nonzero(d.log_alpha_tensor)).item()
    assert abs(mc - old) > 20 * se, (mc, old, se)
    # The per-tensor gate alone: P(z_g ≠ 0) is what l0() factors out.
    zg = torch.stack([(d.gate() != 0).any() for _ in range(2000)]).double().mean().item()
    assert zg == pytest.approx(prob_nonzero(d.log_alpha_tensor).item(), abs=4 * 0.5 / math.sqrt(2000))
    # l0() is differentiable in both gate logits (it is what step1 minimises).
    d.l0().backward()
    assert d.log_alpha.grad.abs().min() > 0 and d.log_alpha_tensor.grad.abs() > 0


def test_column_gates_open_and_close_whole_columns_and_count_entries():
    torch.manual_seed(0)
    d = DeltaParam(torch.Size((48, 32)), structure="column")
    assert d.log_alpha.shape == (1, 32) and d.entries_per_gate == 48
    with torch.no_grad():
        d.delta.normal_()
        d.log_alpha.uniform_(-3.0, 3.0)
        d.log_alpha_tensor.fill_(0.3)
    d.train()
    draws = 4000
    with torch.no_grad():
        gates = [d.gate() for _ in range(draws)]
    # every sampled gate is constant down a column
    assert all(torch.equal(g.expand(48, 32)[0], g.expand(48, 32)[47]) for g in gates[:50])
    counts = torch.stack([(g.expand(48, 32) != 0).sum() for g in gates]).double()
    mc, se = counts.mean().item(), counts.std().item() / math.sqrt(draws)
    assert abs(mc - d.l0().item()) < 4 * se, (mc, d.l0().item(), se)  # the L0 counts entries
    d.eval()
    closed_cols = int((d.gate() == 0).sum())
    assert closed_cols > 0 and d.gate_zeros() == 48 * closed_cols
    d.freeze_mask()  # the mask keeps the column structure
    assert torch.equal(d.mask, d.mask[:1].expand_as(d.mask)) and int((d.mask[0] == 0).sum()) == closed_cols
    # vectors keep element gates; a conv weight gates (channel, kh, kw) columns
    assert DeltaParam(torch.Size((48,)), structure="column").log_alpha.shape == (48,)
    assert DeltaParam(torch.Size((16, 3, 4, 4)), structure="column").log_alpha.shape == (1, 3, 4, 4)
    with pytest.raises(ValueError, match="gate structure"):
        DeltaParam(torch.Size((4, 4)), structure="rows")


def test_close_smallest_closes_whole_columns():
    torch.manual_seed(1)
    m = build_model("vit_debug", 8, "sal", 2)
    deltas = add_deltas(m.encoder, structure="column")
    with torch.no_grad():
        for d in deltas.values():
            d.delta.normal_(0, 0.1)
    total = sum(d.delta.numel() for d in deltas.values())
    closed = close_smallest(deltas, 0.6)
    eff = effective_deltas(deltas)
    zeros = sum(int((t == 0).sum()) for t in eff.values())
    assert closed == zeros and zeros / total >= 0.6
    # not far past it: the last column closed is at most one column of the widest matrix
    assert zeros - math.ceil(0.6 * total) <= max(d.entries_per_gate for d in deltas.values())
    for k, t in eff.items():
        if t.dim() >= 2:  # a matrix's columns are all zero or all (but exact zeros of δ) open
            col_zero = (t.reshape(t.shape[0], -1) == 0).all(dim=0)
            col_open = (t.reshape(t.shape[0], -1) != 0).all(dim=0)
            assert bool((col_zero | col_open).all()), k


# --- 2. step1's controller ---------------------------------------------------------------------

def test_next_l0_weight_moves_towards_the_target_and_is_clamped():
    lo, hi = L0_WEIGHT_RANGE
    w = 1.0
    assert lo <= w <= hi
    assert next_l0_weight(w, sparsity=0.2, target=0.5) > w  # too dense: push harder
    assert 0.0 <= next_l0_weight(w, sparsity=0.8, target=0.5) < w  # too sparse: ease off (λ ≥ 0)
    assert 0.0 <= next_l0_weight(w, sparsity=0.5, target=0.5) <= w  # met: no more push
    # further below the target pushes at least as hard; further above eases off at least as much
    assert next_l0_weight(w, 0.0, 0.5) >= next_l0_weight(w, 0.4, 0.5) > w
    assert next_l0_weight(w, 1.0, 0.5) <= next_l0_weight(w, 0.6, 0.5) < w
    # a paused (λ = 0) or tiny λ restarts once the sparsity falls below the target again
    assert next_l0_weight(0.0, 0.2, 0.5) >= lo
    assert next_l0_weight(lo / 10, 0.2, 0.5) >= lo
    # bounded: never above the ceiling, from inside and from outside the range
    assert next_l0_weight(hi, 0.0, 0.9) == hi
    assert next_l0_weight(10 * hi, 0.0, 0.5) == hi
    assert 0.0 <= next_l0_weight(lo, 1.0, 0.1) <= lo
    # held below the target, λ keeps growing until it hits the ceiling, and stays there
    seq = [w]
    for _ in range(1000):
        seq.append(next_l0_weight(seq[-1], 0.0, 0.5))
    assert all(b >= a for a, b in zip(seq, seq[1:])) and seq[-1] == hi


def test_step1_controller_reaches_the_target_sparsity(trained):
    r = trained["results"]["sal/step1"]
    logs = [d for _, d in trained["logs"]["sal/step1"] if "gate_sparsity" in d]
    assert len(logs) == r["iterations"] == 50
    # The trainer runs the controller: λ (logged as used in each step) rose while the gates were
    # below the target, and never pushed harder after a step that met it.
    assert max(d["l0_weight"] for d in logs) > logs[0]["l0_weight"]
    for a, b in zip(logs, logs[1:]):
        if a["gate_sparsity"] >= TARGET:
            assert b["l0_weight"] <= a["l0_weight"], (a, b)
    # The gates themselves got there: what close_smallest had to close at the end is small.
    d1, _, _ = ckpt.load_subtask(trained["store"] / "sal/step1/model.safetensors", _base_sha(trained))
    total = sum(t.numel() for t in d1.values())
    assert logs[-1]["gate_sparsity"] >= TARGET - 0.1, logs[-1]
    assert r["closed_at_end"] < 0.1 * total, (r["closed_at_end"], total)
    # ... and the stage meets it, in its result and in the stored deltas.
    assert r["delta_weight_sparsity"] >= TARGET
    stored = sum(int((t == 0).sum()) for t in d1.values()) / total
    assert stored == pytest.approx(r["delta_weight_sparsity"], abs=1e-9) and stored >= TARGET


def test_step1_with_column_gates_stores_column_deltas_the_engine_runs_as_blocks(trained, tmp_path):
    s1 = trained["specs"]["sal/step1"]
    spec = s1.model_copy(update={"name": "sal/step1_cols", "optim": s1.optim.model_copy(
        update={"iters": 12, "eval_every": 12, "log_every": 1000, "delta_gates": "column"})})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        r = run_stage(spec, trained["store"], base_sha256=_base_sha(trained))
    finally:
        torch.set_num_threads(threads)
    assert r["delta_weight_sparsity"] >= TARGET
    path = trained["store"] / "sal/step1_cols/model.safetensors"
    deltas, _, _ = ckpt.load_subtask(path, _base_sha(trained))
    for k, t in deltas.items():
        if t.dim() >= 2:
            t2 = t.reshape(t.shape[0], -1)
            assert bool(((t2 == 0).all(dim=0) | (t2 != 0).all(dim=0)).all()), k
    engine = SharedEngine.from_checkpoints(trained["store"] / "base/model.safetensors", {"sal": path})
    modes = {lin.mode for lin in engine.subtasks["sal"].linears.values()}
    assert "cols" in modes and "csr" not in modes, modes


def test_step1_logs_gate_sparsity_every_log_every(trained):
    s1 = trained["specs"]["sal/step1"]
    spec = s1.model_copy(update={"name": "sal/step1_logs", "optim": s1.optim.model_copy(
        update={"iters": 6, "eval_every": 6, "log_every": 3})})
    emitted = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_stage(spec, trained["store"], base_sha256=_base_sha(trained),
                  on_log=lambda d, i: emitted.append((i, d)) if "loss" in d else None)
    finally:
        torch.set_num_threads(threads)
    # every emitted step1 log carries the controller's state (a log_every > 1 must not lose it)
    assert [i for i, _ in emitted] == [3, 6]
    assert all("gate_sparsity" in d and "l0_weight" in d for _, d in emitted), emitted


def _randomised_deltas(seed=0):
    torch.manual_seed(seed)
    m = build_model("vit_debug", 8, "sal", 2)
    deltas = add_deltas(m.encoder)
    with torch.no_grad():
        for i, d in enumerate(deltas.values()):
            d.delta.normal_(0, 0.05 if i % 2 else 0.5)  # two scales: the pool is global, not per tensor
            d.log_alpha.uniform_(-2.0, 6.0)  # some gates closed (α ≤ 0), most open, some partly
    return deltas


def test_close_smallest_closes_exactly_enough_and_only_the_smallest():
    deltas = _randomised_deltas()
    before = effective_deltas(deltas)
    total = sum(t.numel() for t in before.values())
    zeros_before = sum(int((t == 0).sum()) for t in before.values())
    target = 0.7
    assert zeros_before / total < target  # there is work to do
    closed = close_smallest(deltas, target)
    after = effective_deltas(deltas)
    zeros_after = sum(int((t == 0).sum()) for t in after.values())
    # exactly enough: the target is met, and one gate fewer would miss it (1 entry of float slack)
    assert zeros_after / total >= target
    assert zeros_after - 1 <= math.ceil(target * total)
    assert closed == zeros_after - zeros_before
    assert delta_sparsity(deltas) == pytest.approx(zeros_after / total)
    # δ has no exact zeros, so a zero effective delta is a closed gate
    assert gate_sparsity(deltas) == pytest.approx(zeros_after / total)
    # only the smallest magnitudes, pooled over all tensors; survivors are untouched
    shut = torch.cat([b[(a == 0) & (b != 0)].abs() for a, b in zip(after.values(), before.values())])
    kept = torch.cat([a[a != 0].abs() for a in after.values()])
    assert shut.numel() == closed and shut.max() <= kept.min()
    for k in before:
        assert torch.equal(after[k][after[k] != 0], before[k][after[k] != 0]), k
        assert torch.all(after[k][before[k] == 0] == 0), k
    # both scales took part: small-δ tensors lost more entries than large-δ ones, but not all
    frac = [float(((a == 0) & (b != 0)).sum()) / b.numel() for a, b in zip(after.values(), before.values())]
    small, large = frac[1::2], frac[0::2]
    assert sum(small) / len(small) > sum(large) / len(large)
    # already at the target: nothing more to close
    assert close_smallest(deltas, target) == 0
    assert close_smallest(deltas, 0.5) == 0


def test_gate_sparsity_counts_a_closed_tensor_gate_as_all_its_entries():
    deltas = _randomised_deltas(seed=1)
    with torch.no_grad():
        for d in deltas.values():
            d.log_alpha.fill_(5.0)
    assert gate_sparsity(deltas) == 0.0
    d = next(v for k, v in deltas.items() if k.endswith("mlp.fc1.weight"))
    with torch.no_grad():
        d.log_alpha_tensor.fill_(-1.0)
    total = sum(v.delta.numel() for v in deltas.values())
    assert gate_sparsity(deltas) == pytest.approx(d.delta.numel() / total)
    assert delta_sparsity(deltas) == pytest.approx(d.delta.numel() / total)


# --- 3. step3's row penalty --------------------------------------------------------------------

def _linear_inputs(trained, stage: str, images: torch.Tensor):
    """(sub-task, base) inputs of the four thresholded linears of every block, recorded with
    ``stage``'s stored deltas in mask mode."""
    spec = trained["specs"]["sal/step3"].model_copy(update={"prev_key": f"{stage}/model.safetensors"})
    store = trained["store"]
    model, deltas = build_stage_model(spec, store / "base/model.safetensors", _base_sha(trained),
                                      store / stage / "model.safetensors")
    model.eval()
    rec = ActivationRecorder(model.encoder, LINEAR_INPUTS, inputs=True)
    with torch.no_grad():
        with base_mode(deltas), rec.record() as base:
            model.encoder(images)
        with rec.record() as sub:
            model.encoder(images)
    rec.remove()
    return sub, base


def test_step3_row_penalty_empties_activation_rows(trained):
    val = build_dataset("pascal_context", trained["cfg"].dataset.root, "val", ["sal"], train=False, img_size=32)
    images = torch.stack([val[i]["image"] for i in range(len(val))])
    rel = {}
    for stage in ("sal/step3", "sal/step3_norow"):
        sub, base = _linear_inputs(trained, stage, images)
        assert len(sub) == len(base) == 4 * 4  # four linears × four blocks
        # inputs, not outputs: qkv reads the 64-wide norm1 output, fc2 the 256-wide GELU output
        assert sub[0].shape[-1] == 64 and sub[3].shape[-1] == 256
        # per recorded linear: each token row's ‖x_s − x_b‖ over the mean base row norm
        rel[stage] = torch.cat([(s.flatten(0, -2) - b.flatten(0, -2)).norm(dim=1) / b.flatten(0, -2).norm(dim=1).mean()
                                for s, b in zip(sub, base)])
    pen, free = rel["sal/step3"], rel["sal/step3_norow"]
    assert pen.mean() < 0.5 * free.mean(), (pen.mean(), free.mean())
    # Rows near zero (what a threshold τ lets the engine skip): one relative threshold for both
    # runs, the unpenalised run's lower quartile (how small "small" is depends on how sparse step1
    # left the weights, so it is read off the reference run rather than hard-coded).
    thr = free.quantile(0.25)
    small = {k: (v < thr).float().mean().item() for k, v in rel.items()}
    assert small["sal/step3"] > small["sal/step3_norow"] + 0.4, (thr.item(), small)


def test_skip_rows_keeps_the_largest_delta_rows_over_the_batch():
    base = torch.zeros(2, 3, 2, dtype=torch.float64)
    x = torch.tensor([[[0.1, 0.0], [0.0, -5.0], [0.2, 0.2]],
                      [[3.0, 0.0], [0.0, 0.05], [-0.3, 1.0]]], dtype=torch.float64)
    base = base + 7.0  # a non-zero base: skipped rows become the base's rows, not zeros
    x = x + 7.0
    # row max-abs deltas: 0.1 5 0.2 | 3 0.05 1 -> keep the top half (3 of 6): 5, 3, 1
    out = skip_rows(x, base, 0.5)
    kept = torch.tensor([[False, True, False], [True, False, True]])
    assert torch.equal(out[kept], x[kept])
    assert torch.equal(out[~kept], base[~kept])
    assert torch.equal(skip_rows(x, base, 1.0), x)
    # gradients reach the kept rows only
    xg = x.clone().requires_grad_(True)
    skip_rows(xg, base, 0.5).sum().backward()
    assert torch.equal(xg.grad[..., 0] != 0, kept)


def test_recorder_feeds_each_linear_the_skipped_input_and_records_the_true_one(trained):
    spec = trained["specs"]["sal/step3"].model_copy(update={"prev_key": "sal/step3/model.safetensors"})
    store = trained["store"]
    model, deltas = build_stage_model(spec, store / "base/model.safetensors", _base_sha(trained),
                                      store / "sal/step3/model.safetensors")
    model.eval()
    images = torch.randn(3, 3, 32, 32)
    rec = ActivationRecorder(model.encoder, LINEAR_INPUTS, inputs=True)
    seen = []
    hooks = [blk.get_submodule(p).register_forward_pre_hook(lambda m, i: seen.append(i[0]))
             for blk in model.encoder.blocks for p in LINEAR_INPUTS]  # registered after: sees the fed input
    with torch.no_grad():
        with base_mode(deltas), rec.record() as base:
            model.encoder(images)
        seen.clear()
        with rec.record(skip=(base, 0.25)) as sub:
            skipped_out = model.encoder(images)
        fed = list(seen)
        with rec.record() as exact:
            exact_out = model.encoder(images)
    for h in hooks:
        h.remove()
    rec.remove()
    assert len(sub) == len(fed) == len(base) == 16
    for s, f, b in zip(sub, fed, base):
        assert torch.equal(f, skip_rows(s, b, 0.25))  # fed what the engine feeds at density 0.25
        rows_base = (f == b).all(-1)  # b + δ·0 is b exactly; a kept row is b + δ (≈ s, rounded)
        assert rows_base.float().mean().item() == pytest.approx(0.75, abs=0.02)
        torch.testing.assert_close(f[~rows_base], s[~rows_base])
    assert torch.equal(sub[0], exact[0])  # the first linear's input precedes any skipping
    assert not torch.allclose(skipped_out, exact_out)


def test_step3_train_row_density_trains_through_the_skipping(trained, tmp_path):
    """Same start, seed and iterations as sal/step3: only the skipping differs, so the deltas must."""
    import shutil
    store = trained["store"]
    for d in ("base", "sal/step2"):
        shutil.copytree(store / d, tmp_path / d)
    s3 = trained["specs"]["sal/step3"]
    skip = s3.model_copy(update={"calibration": None, "optim": s3.optim.model_copy(update={"train_row_density": 0.3})})
    run_stage(skip, tmp_path, base_sha256=_base_sha(trained))
    a = ckpt.load_subtask(store / "sal/step3/model.safetensors", _base_sha(trained))[0]
    b = ckpt.load_subtask(tmp_path / "sal/step3/model.safetensors", _base_sha(trained))[0]
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], b[k]) for k in a)
    raw = {"act_penalty": "element", "train_row_density": 0.5}
    with pytest.raises(ValueError, match="train_row_density needs act_penalty: row"):
        s3.optim.model_validate({**s3.optim.model_dump(), **raw})


def test_time_plan_keeps_tau_only_where_the_gather_pays(trained, tmp_path):
    """The same step3 calibrated with the default time plan: a 64-wide layer keeps its τ only
    while its kept rows are under SparsePolicy.gather_limit, so never on proj, where the
    fixture's flops plan keeps τ on proj layers too."""
    import shutil
    store = trained["store"]
    for d in ("base", "sal/step2"):
        shutil.copytree(store / d, tmp_path / d)
    flops_point = trained["results"]["sal/step3"]["operating_point"]
    assert any(k.endswith("attn.proj") for k in flops_point["tau"])  # what the time plan must drop
    s3 = trained["specs"]["sal/step3"]
    timed = s3.model_copy(update={"calibration": s3.calibration.model_copy(update={"plan": "time"})})
    point = run_stage(timed, tmp_path, base_sha256=_base_sha(trained))["operating_point"]
    assert (point["calibration"]["plan"], flops_point["calibration"]["plan"]) == ("time", "flops")
    assert not any(k.endswith("attn.proj") for k in point["tau"])
    limit = SparsePolicy().gather_limit(64, 256)  # the largest at 64 wide: fc1, fc2
    assert not point["tau"] or point["calibration"]["row_density"] <= limit + 0.02


# --- 4. the operating point --------------------------------------------------------------------

def test_operating_point_holds_on_held_out_data(trained):
    cfg, store = trained["cfg"], trained["store"]
    r = trained["results"]["sal/step3"]
    point = r["operating_point"]
    cal = point["calibration"]
    tol = cfg.calibration.tolerance
    paths = {f"blocks.{i}.{lin}" for i in range(4) for lin in LINEAR_INPUTS}
    # τ: per linear path, finite and non-negative, and some layer really thresholds
    tau = point["tau"]
    assert tau and set(tau) <= paths, tau
    assert all(math.isfinite(v) and v >= 0 for v in tau.values()) and max(tau.values()) > 0
    # Calibrated on the dataset.holdout images (end of the train split, never trained on) to
    # margin × tolerance: a guarantee of the bisection, it keeps only feasible thresholds.
    assert cal["images"] == cfg.dataset.holdout
    assert cal["tolerance"] == pytest.approx(cfg.calibration.margin * tol)
    assert cal["metric"] >= cal["metric_exact"] - cal["tolerance"] * abs(cal["metric_exact"]), cal
    # On val (6 other images, unseen by training and by calibration) the same τ hold within 5 %.
    # The configured 1 % is a statistical promise for a calibration set of realistic size (32+
    # images, margin 0.5 leaves room); τ picked on 4 images need not transfer that closely to 6
    # others, so 1 % on val would test luck. 5 % still catches τ that do not transfer at all, a
    # wrongly applied threshold, or a value measured off the engine. (Seen while writing this: 0.05–1 %
    # on val, depending on how step1 left the weights, while calibration always held its 0.5 %.)
    assert point["value"] == pytest.approx(point["value_exact"], rel=0.05), point
    # value_exact is the trainer's exact metric: the same model through the engine at τ = 0.
    assert point["value_exact"] == pytest.approx(r["metric"], rel=1e-4, abs=1e-6)
    # FLOPs and skipped rows are the engine's, at τ, never above dense.
    assert r["flops"] == point["flops"] <= r["dense_flops"]
    assert r["delta_activation_sparsity"] == point["rows_skipped"] > 0
    assert sum(point["paths"].values()) == pytest.approx(1.0)
    # The τ are stored with the checkpoint, and an engine rebuilt from the stored files with them
    # reproduces the operating point on val exactly.
    step3 = store / "sal/step3/model.safetensors"
    assert ckpt.read_manifest(step3)["operating_point"]["tau"] == tau
    engine = SharedEngine.from_checkpoints(store / "base/model.safetensors", {"sal": step3})
    engine.set_thresholds("sal", ckpt.read_manifest(step3)["operating_point"]["tau"])
    val = build_dataset("pascal_context", cfg.dataset.root, "val", ["sal"], train=False, img_size=32)
    again = op.evaluate_task(engine, "sal", DataLoader(val, batch_size=4), "pascal_context")
    assert again["value"] == pytest.approx(point["value"], rel=1e-6)
    assert again["flops"] == pytest.approx(point["flops"], rel=1e-9)
    assert again["rows_skipped"] == pytest.approx(point["rows_skipped"], rel=1e-9)
    # Earlier sharing steps are not served: no operating point, dense FLOPs.
    for kind in ("step1", "step2"):
        early = trained["results"][f"sal/{kind}"]
        assert "operating_point" not in early and early["flops"] == early["dense_flops"]


def test_operating_point_tau_is_not_trivial_exactness(trained):
    """The calibrated τ change the engine's output (so the tolerance checks above test something)."""
    cfg, store = trained["cfg"], trained["store"]
    step3 = store / "sal/step3/model.safetensors"
    engine = SharedEngine.from_checkpoints(store / "base/model.safetensors", {"sal": step3})
    val = build_dataset("pascal_context", cfg.dataset.root, "val", ["sal"], train=False, img_size=32)
    images = torch.stack([val[i]["image"] for i in range(len(val))])
    exact = engine(images, tasks=["sal"])["sal"]
    engine.set_thresholds("sal", trained["results"]["sal/step3"]["operating_point"]["tau"])
    at_tau = engine(images, tasks=["sal"])["sal"]
    assert (at_tau - exact).abs().max() > 1e-4
