"""FLOPs and parameter accounting, dense and under sharing.

Dense FLOPs come from ``torch.utils.flop_counter`` on a real forward (one multiply-add = 2
FLOPs; element-wise ops are not counted, as is usual).

A sub-task under sharing, given that the base already ran on the same image, costs per encoder
linear ``y_s = y_b + W_b · T_τ(x_s − x_b) + (M ⊙ δ) · x_s``:

    2 · nnz(T_τ(x_s − x_b)) · d_out      (each non-zero input delta meets one column of W_b)
  + 2 · tokens · nnz(M ⊙ δ)              (the sparse delta weight on every token)

while attention (QKᵀ, AV) and the head are counted as they are. The patch embedding sees the
same image in base and sub-task, so only its delta weight costs.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from mtshare.models import DenseTaskModel
from mtshare.models.delta import DeltaParam, base_mode, find_deltas


def dense_flops(model: nn.Module, img_size: int) -> float:
    """FLOPs of one forward of ``model`` on one ``img_size``² image."""
    was = model.training
    model.eval()
    p = next(model.parameters())
    x = torch.zeros(1, 3, img_size, img_size, device=p.device, dtype=p.dtype)
    # The flop counter does not see CPU fused attention kernels: count timm's explicit
    # QKᵀ / AV matmul path instead (same math).
    fused = [(m, m.fused_attn) for m in model.modules() if hasattr(m, "fused_attn")]
    for m, _ in fused:
        m.fused_attn = False
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        for m, f in fused:
            m.fused_attn = f
        model.train(was)
    return float(counter.get_total_flops())


def _tokens(model: DenseTaskModel, img_size: int) -> tuple[int, int]:
    p = model.encoder.cfg.patch_size
    n = (img_size // p) ** 2
    return n, n + 1  # patches, tokens (with the global token)


def encoder_linears(model: DenseTaskModel) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of every encoder linear (not the patch embedding), by module path."""
    return {n: (m.in_features, m.out_features) for n, m in model.encoder.named_modules() if isinstance(m, nn.Linear)}


def dense_linear_flops(model: DenseTaskModel, img_size: int) -> float:
    """FLOPs of the encoder's linear layers and patch embedding alone (the shareable part)."""
    patches, tokens = _tokens(model, img_size)
    conv = model.encoder.patch_embed.proj
    total = 2.0 * patches * conv.weight.numel()
    for d_in, d_out in encoder_linears(model).values():
        total += 2.0 * tokens * d_in * d_out
    return total


def shared_flops(model: DenseTaskModel, img_size: int, delta_nnz: dict[str, int],
                 act_density: dict[str, float] | None = None, dense_total: float | None = None) -> float:
    """FLOPs of a sub-task forward when the base has already run (see the module docstring).

    ``delta_nnz``: non-zeros of each encoder tensor's delta, by parameter name (biases and norms
    cost nothing: element-wise). ``act_density``: fraction of non-zero entries of the
    thresholded input delta of each linear (by module path); missing = 1.0 (dense, τ = 0
    worst case)."""
    act_density = act_density or {}
    patches, tokens = _tokens(model, img_size)
    total = dense_total if dense_total is not None else dense_flops(model, img_size)
    total -= dense_linear_flops(model, img_size)
    total += 2.0 * patches * delta_nnz.get("patch_embed.proj.weight", 0)
    for name, (d_in, d_out) in encoder_linears(model).items():
        density = act_density.get(name, 1.0)
        total += 2.0 * tokens * d_in * density * d_out
        total += 2.0 * tokens * delta_nnz.get(f"{name}.weight", 0)
    return total


def param_counts(model: DenseTaskModel, delta_nnz: dict[str, int] | None = None) -> tuple[int, int]:
    """(stored, dense) parameter counts. Dense = encoder + head. Stored = head + the delta's
    non-zeros when ``delta_nnz`` is given (a sub-task), else everything (a dense model)."""
    head = sum(p.numel() for p in model.head.parameters())
    enc = sum(p.numel() for p in model.encoder.state_dict().values() if p.is_floating_point())
    if delta_nnz is not None:
        enc_dense = sum(d.delta.numel() for d in find_deltas(model.encoder).values())
        return head + sum(delta_nnz.values()), head + enc_dense
    return head + enc, head + enc


@contextmanager
def _capture_linear_inputs(encoder: nn.Module, store: dict[str, torch.Tensor]):
    handles = []
    for name, m in encoder.named_modules():
        if isinstance(m, nn.Linear):
            handles.append(m.register_forward_pre_hook(lambda mod, args, n=name: store.__setitem__(n, args[0].detach())))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def activation_density(model: DenseTaskModel, images: torch.Tensor, tau: float | dict[str, float] = 0.0) -> dict[str, float]:
    """Fraction of entries of ``x_s − x_b`` at each encoder linear's input with ``|·| ≥ τ``.

    Runs the model once as the base (deltas off) and once as the sub-task on ``images``."""
    deltas: dict[str, DeltaParam] = find_deltas(model.encoder)
    was = model.training
    model.eval()
    base_in: dict[str, torch.Tensor] = {}
    sub_in: dict[str, torch.Tensor] = {}
    with base_mode(deltas), _capture_linear_inputs(model.encoder, base_in):
        model.encoder(images)
    with _capture_linear_inputs(model.encoder, sub_in):
        model.encoder(images)
    model.train(was)
    out = {}
    for name, xb in base_in.items():
        t = tau.get(name, 0.0) if isinstance(tau, dict) else tau
        diff = (sub_in[name] - xb).abs()
        out[name] = float((diff >= t).float().mean()) if t > 0 else float((diff != 0).float().mean())
    return out


def delta_nnz(deltas: dict[str, torch.Tensor]) -> dict[str, int]:
    return {k: int((v != 0).sum()) for k, v in deltas.items()}
