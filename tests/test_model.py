"""The ViT, delta sharing, strict loading, checkpoints and FLOPs on the tiny flavor."""
import copy

import pytest
import torch

from mtshare import checkpoint as ckpt
from mtshare import flops
from mtshare.models import build_model, load_pretrained
from mtshare.models.delta import (
    ActivationRecorder, add_deltas, base_mode, deterministic_gate, effective_deltas, l0_penalty, set_mode,
)
from mtshare.models.vit import ViTEncoder

IMG = 32


def _model(seed=0, task="semseg", out=21):
    torch.manual_seed(seed)
    return build_model("vit_debug", 8, task, out).eval()


def _randomise_deltas(deltas, alpha_range=(-3.0, 3.0), scale=0.05):
    with torch.no_grad():
        for d in deltas.values():
            d.delta.normal_(0, scale)
            d.log_alpha.uniform_(*alpha_range)


def test_zero_delta_reproduces_base_exactly():
    m = _model()
    x = torch.randn(2, 3, IMG, IMG)
    y_base = m(x)
    add_deltas(m.encoder)
    m.eval()
    assert torch.equal(m(x), y_base)


def test_gated_forward_equals_dense_model_with_folded_weights():
    m = _model()
    dense = copy.deepcopy(m)
    deltas = add_deltas(m.encoder)
    _randomise_deltas(deltas)
    m.eval()
    eff = effective_deltas(deltas)
    assert 0.1 < sum((v == 0).sum().item() for v in eff.values()) / sum(v.numel() for v in eff.values()) < 0.9
    sd = {k: v + eff[k] for k, v in dense.encoder.state_dict().items()}
    dense.encoder.load_state_dict(sd)
    dense.head.load_state_dict(m.head.state_dict())
    x = torch.randn(2, 3, IMG, IMG)
    assert (m(x) - dense(x)).abs().max().item() < 1e-5
    # step2 mask mode after folding the gate gives the same function
    for d in deltas.values():
        d.freeze_mask()
    assert (m(x) - dense(x)).abs().max().item() < 1e-5


def test_base_weights_get_no_grad_and_every_delta_and_alpha_does():
    m = _model()
    deltas = add_deltas(m.encoder)
    _randomise_deltas(deltas, alpha_range=(0.2, 1.2))
    m.train()
    (m(torch.randn(2, 3, IMG, IMG)).square().mean() + 1e-3 * l0_penalty(deltas)).backward()
    for name, p in m.named_parameters():
        if name.endswith(".original"):
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for d in deltas.values():
        assert d.delta.grad.abs().sum() > 0
        assert d.log_alpha.grad.abs().sum() > 0


def test_gradients_match_finite_differences():
    m = _model().double()
    deltas = add_deltas(m.encoder)
    _randomise_deltas(deltas, alpha_range=(0.3, 1.2))  # inside the gate's unclamped range
    with torch.no_grad():
        for d in deltas.values():
            d.log_alpha_tensor.fill_(0.8)
    m.eval()  # deterministic gate: a smooth function of δ and α
    x = torch.randn(1, 3, IMG, IMG, dtype=torch.float64)
    r = torch.randn_like(m(x))

    def f():
        return (m(x) * r).sum()

    f().backward()
    d = deltas["blocks.1.mlp.fc1.weight"]
    h = 1e-6
    for param, idx in ((d.delta, (3, 5)), (d.log_alpha, (7, 2)), (d.log_alpha_tensor, ())):
        with torch.no_grad():
            old = param[idx].item()
            param[idx] = old + h
            fp = f().item()
            param[idx] = old - h
            fm = f().item()
            param[idx] = old
        fd = (fp - fm) / (2 * h)
        assert param.grad[idx].item() == pytest.approx(fd, rel=1e-4, abs=1e-8)


def test_deterministic_gate_values():
    a = torch.tensor([-10.0, 0.0, 10.0])
    assert deterministic_gate(a).tolist() == [0.0, 0.0, 1.0]  # sigmoid(0)*3-1.5 = 0 -> exactly 0


def test_activation_recorder_captures_base_and_subtask_with_one_model():
    m = _model()
    deltas = add_deltas(m.encoder)
    _randomise_deltas(deltas, alpha_range=(2.0, 3.0))
    rec = ActivationRecorder(m.encoder, ViTEncoder.ACTIVATION_POINTS)
    x = torch.randn(1, 3, IMG, IMG)
    with torch.no_grad(), base_mode(deltas), rec.record() as base_acts:
        m.encoder(x)
    with rec.record() as sub_acts:
        m.encoder(x)
    assert len(base_acts) == len(sub_acts) == 6 * len(m.encoder.blocks)
    assert any((a - b).abs().max() > 0 for a, b in zip(sub_acts, base_acts))
    # the base pass is repeatable (no state left behind by the sub-task pass)
    with rec.record() as again, base_mode(deltas):
        m.encoder(x)
    assert torch.equal(again[-1], base_acts[-1])


def test_base_mode_reproduces_the_plain_base_model_exactly():
    plain = _model()
    m = copy.deepcopy(plain)
    deltas = add_deltas(m.encoder)
    _randomise_deltas(deltas)
    with torch.no_grad():
        for d in deltas.values():
            d.mask.bernoulli_(0.5)  # a step2/3-style fixed mask over non-zero δ
    set_mode(deltas, "mask")
    m.eval()
    assert sum(int((d.mask * d.delta != 0).sum()) for d in deltas.values()) > 0
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        y_plain = plain.encoder(x)
        with base_mode(deltas):
            y_base = m.encoder(x)
            assert all(d.mode == "off" for d in deltas.values())
        y_sub = m.encoder(x)
    assert torch.equal(y_base, y_plain)  # bit-exact: the deltas are really off
    assert (y_sub - y_plain).abs().max() > 1e-3  # outside base_mode the deltas act
    assert all(d.mode == "mask" for d in deltas.values())  # the modes come back
    with pytest.raises(RuntimeError, match="inside"):  # ... even when the body raises
        with base_mode(deltas):
            raise RuntimeError("inside")
    assert all(d.mode == "mask" for d in deltas.values())
    with torch.no_grad():
        assert torch.equal(m.encoder(x), y_sub)


def test_strict_pretrained_loading_refuses_missing_key(tmp_path):
    from safetensors.torch import save_file

    m = _model()
    sd = {k: v.clone() for k, v in m.encoder.state_dict().items()}
    # MAE-style extras are dropped explicitly; the weights then load exactly
    full = {**sd, "norm.weight": torch.ones(64), "decoder_embed.weight": torch.zeros(2, 2), "pos_embed": torch.zeros(1, 17, 64)}
    save_file(full, tmp_path / "ok.safetensors")
    m2 = _model(seed=1)
    load_pretrained(m2.encoder, str(tmp_path / "ok.safetensors"))
    assert all(torch.equal(m2.encoder.state_dict()[k], v) for k, v in sd.items())
    del sd["blocks.0.attn.qkv.weight"]
    save_file(sd, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="blocks.0.attn.qkv.weight"):
        load_pretrained(m2.encoder, str(tmp_path / "bad.safetensors"))


def test_checkpoint_roundtrip_is_bit_exact_and_checks_the_base(tmp_path):
    base = _model()
    base_sha = ckpt.save_dense(tmp_path / "base.safetensors", base.encoder.state_dict(), base.head.state_dict(), {"task": "semseg"})
    assert base_sha == ckpt.sha256_file(tmp_path / "base.safetensors")
    enc, head, man = ckpt.load_dense(tmp_path / "base.safetensors", expected_sha256=base_sha)
    assert all(torch.equal(enc[k], v) for k, v in base.encoder.state_dict().items())
    assert man["kind"] == "base" and man["task"] == "semseg"

    sub = _model(task="sal", out=2)
    deltas = add_deltas(sub.encoder)
    _randomise_deltas(deltas)
    eff = effective_deltas(deltas)
    ckpt.save_subtask(tmp_path / "sub.safetensors", eff, sub.head.state_dict(), {"task": "sal"}, base_sha256=base_sha)
    got, head_sd, man = ckpt.load_subtask(tmp_path / "sub.safetensors", base_sha256=base_sha)
    assert set(got) == set(eff)
    assert all(torch.equal(got[k], eff[k]) for k in eff)
    assert all(torch.equal(head_sd[k], v) for k, v in sub.head.state_dict().items())
    with pytest.raises(ckpt.CheckpointError, match="base"):
        ckpt.load_subtask(tmp_path / "sub.safetensors", base_sha256="0" * 64)
    with pytest.raises(ckpt.CheckpointError, match="checksum"):
        ckpt.load_dense(tmp_path / "base.safetensors", expected_sha256="f" * 64)


def test_subtask_file_at_90_percent_sparsity_is_under_a_quarter_of_dense(tmp_path):
    torch.manual_seed(0)
    m = build_model("vit_small", 16, "sal", 2)
    dense_size_sha = ckpt.save_dense(tmp_path / "dense.safetensors", m.encoder.state_dict(), m.head.state_dict(), {})
    assert dense_size_sha
    deltas = {k: torch.randn_like(v) * (torch.rand_like(v) > 0.9) for k, v in m.encoder.state_dict().items()}
    ckpt.save_subtask(tmp_path / "sub.safetensors", deltas, m.head.state_dict(), {}, base_sha256="0" * 64)
    ratio = (tmp_path / "sub.safetensors").stat().st_size / (tmp_path / "dense.safetensors").stat().st_size
    assert ratio < 0.25, ratio


def test_dense_flops_match_a_hand_count():
    m = _model()
    enc = m.encoder
    d, depth, p = 64, len(enc.blocks), 8
    n = (IMG // p) ** 2
    t = n + 1
    per_block = 2 * t * d * 3 * d + 2 * t * d * d + 2 * t * d * 4 * d * 2 + 2 * 2 * t * t * d  # qkv, proj, mlp, QK^T + AV
    encoder = 2 * n * 3 * p * p * d + depth * per_block
    width = 4 * d  # semseg head
    c = width // 16
    hh = 4 * (IMG // p)
    head = 2 * n * d * width + 2 * (hh * hh) * (c * 49 + 2 * 4 * c * c) * 2 + 2 * hh * hh * c * 21
    assert flops.dense_flops(m, IMG) == pytest.approx(encoder + head, rel=1e-9)


def test_shared_flops_fall_linearly_with_delta_sparsity():
    m = _model()
    sizes = {k: v.numel() for k, v in m.encoder.state_dict().items()}
    dense = flops.dense_flops(m, IMG)
    values = []
    for density in (1.0, 0.5, 0.1, 0.0):
        nnz = {k: int(round(v * density)) for k, v in sizes.items()}
        values.append(flops.shared_flops(m, IMG, nnz, act_density={k: 0.0 for k in flops.encoder_linears(m)}, dense_total=dense))
    # f(density) = a + b * density: equal steps in density, equal steps in FLOPs
    slope = (values[0] - values[3]) / 1.0
    assert slope > 0
    assert values[1] == pytest.approx(values[3] + 0.5 * slope, rel=1e-3)
    assert values[2] == pytest.approx(values[3] + 0.1 * slope, rel=1e-3)
    # no delta and no activation change: only attention and the head remain
    assert values[3] < dense - flops.dense_linear_flops(m, IMG) + 1
