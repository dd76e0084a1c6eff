"""Delta sharing: every encoder parameter of a sub-task is ``W_b + gate ⊙ δ``.

``W_b`` is the frozen base-task weight, ``δ`` the trainable delta. Each delta is a
``torch.nn.utils.parametrize`` parametrisation, so autograd carries gradients to ``δ`` and
the gate logits ``α``; nothing is copied by hand and the timm modules stay untouched.

Gate (hard concrete, Louizos et al. 2018), stretch ``(l, r) = (-1.5, 1.5)``, one ``α`` per
element and one per tensor (the two gates multiply):

    train:  z = clamp(sigmoid(log u - log(1-u) + α) (r - l) + l, 0, 1),  u ~ U(0, 1)
    eval:   z = clamp(sigmoid(α) (r - l) + l, 0, 1)          (deterministic)
    L0:     λ · sigmoid(α_g - log(-l/r)) · Σ_i sigmoid(α_i - log(-l/r))
            (the expected number of non-zeros of the product gate: P(z_g z_i ≠ 0) = P(z_g ≠ 0) P(z_i ≠ 0))

Gate structure (``structure``): ``element`` (above, the reference's) or ``column``: one ``α``
per input column of a weight matrix (per input channel × kernel position of the patch
embedding), shared by the column's ``d_out`` entries, so whole columns of δ open or close. The
engine then runs a delta weight as one small dense GEMM on the gathered input columns instead
of a CSR product (docs/method.md, "Column gates"). Vectors (biases, norms) keep element gates.
The L0 and the sparsity count *entries* either way (a column gate stands for its ``d_out``).

Modes of a :class:`DeltaParam`:
    ``gate``  step1: ``W_b + z ⊙ δ``
    ``mask``  step2/3: ``W_b + M ⊙ δ`` with the fixed 0/1 mask ``M``
    ``off``   the base weight itself (used to compute base activations with the same code)
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

STRETCH_L, STRETCH_R = -1.5, 1.5
ALPHA_INIT = 5.0
GATE_STRUCTURES = ("element", "column")


def deterministic_gate(log_alpha: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(log_alpha) * (STRETCH_R - STRETCH_L) + STRETCH_L, 0.0, 1.0)


def sample_gate(log_alpha: torch.Tensor) -> torch.Tensor:
    u = torch.rand_like(log_alpha).clamp_(1e-6, 1 - 1e-6)
    s = torch.sigmoid(torch.log(u) - torch.log1p(-u) + log_alpha)
    return torch.clamp(s * (STRETCH_R - STRETCH_L) + STRETCH_L, 0.0, 1.0)


def prob_nonzero(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(z ≠ 0) of a hard-concrete gate with logits ``log_alpha`` (element-wise)."""
    return torch.sigmoid(log_alpha - math.log(-STRETCH_L / STRETCH_R))


class DeltaParam(nn.Module):
    """Parametrisation ``W_b -> W_b + gate ⊙ δ`` (or ``+ M ⊙ δ`` in mask mode)."""

    def __init__(self, shape: torch.Size, alpha_init: float = ALPHA_INIT, structure: str = "element"):
        super().__init__()
        if structure not in GATE_STRUCTURES:
            raise ValueError(f"gate structure must be one of {GATE_STRUCTURES}, got {structure!r}")
        shape = torch.Size(shape)
        gate_shape = (1, *shape[1:]) if structure == "column" and len(shape) >= 2 else shape
        self.delta = nn.Parameter(torch.zeros(shape))
        self.log_alpha = nn.Parameter(torch.full(gate_shape, alpha_init))
        self.entries_per_gate = shape.numel() // max(1, self.log_alpha.numel())
        self.log_alpha_tensor = nn.Parameter(torch.full((), alpha_init))
        self.register_buffer("mask", torch.ones(shape))
        self.mode = "gate"

    def gate(self) -> torch.Tensor:
        if self.training:
            return sample_gate(self.log_alpha) * sample_gate(self.log_alpha_tensor)
        return deterministic_gate(self.log_alpha) * deterministic_gate(self.log_alpha_tensor)

    def effective_delta(self) -> torch.Tensor:
        if self.mode == "off":
            return torch.zeros_like(self.delta)
        if self.mode == "mask":
            return self.mask * self.delta
        return self.gate() * self.delta

    def forward(self, base: torch.Tensor) -> torch.Tensor:
        if self.mode == "off":
            return base
        return base + self.effective_delta().to(base.dtype)

    def l0(self) -> torch.Tensor:
        """Expected number of non-zero entries of ``z_g · z_i`` (the two gates are independent)."""
        return prob_nonzero(self.log_alpha_tensor) * prob_nonzero(self.log_alpha).sum() * self.entries_per_gate

    @torch.no_grad()
    def gate_zeros(self) -> int:
        """Entries whose deterministic (evaluation) gate is exactly zero."""
        if float(deterministic_gate(self.log_alpha_tensor)) == 0.0:
            return self.delta.numel()
        return int((deterministic_gate(self.log_alpha) == 0).sum()) * self.entries_per_gate

    @torch.no_grad()
    def freeze_mask(self) -> None:
        """step1 -> step2: fold the deterministic gate into δ and fix ``M = 1[z δ ≠ 0]``.

        Folding makes the step2 model start exactly where the step1 evaluation model ended.
        Masked-out entries of δ become exactly zero, so the stored delta is its own mask.
        """
        folded = deterministic_gate(self.log_alpha) * deterministic_gate(self.log_alpha_tensor) * self.delta
        self.mask.copy_((folded != 0).to(self.mask.dtype))
        self.delta.copy_(folded)
        self.mode = "mask"


def add_deltas(encoder: nn.Module, structure: str = "element") -> dict[str, DeltaParam]:
    """Freeze every encoder parameter and give it a :class:`DeltaParam` (gates: ``structure``).

    Returns the deltas by the *base parameter's* name (e.g. ``blocks.0.attn.qkv.weight``).
    """
    targets = [(n, p) for n, p in encoder.named_parameters()]
    deltas = {}
    for name, p in targets:
        p.requires_grad_(False)
        module_path, _, attr = name.rpartition(".")
        module = encoder.get_submodule(module_path) if module_path else encoder
        dp = DeltaParam(p.shape, structure=structure).to(device=p.device, dtype=p.dtype)
        parametrize.register_parametrization(module, attr, dp, unsafe=True)
        module.parametrizations[attr].original.requires_grad_(False)
        deltas[name] = dp
    return deltas


def find_deltas(model: nn.Module) -> dict[str, DeltaParam]:
    """All DeltaParams of ``model``, keyed by the base parameter's name relative to ``model``."""
    out = {}
    for mod_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for attr, plist in module.parametrizations.items():
            for p in plist:
                if isinstance(p, DeltaParam):
                    out[f"{mod_name}.{attr}" if mod_name else attr] = p
    return out


def set_mode(deltas: dict[str, DeltaParam], mode: str) -> None:
    assert mode in ("gate", "mask", "off")
    for d in deltas.values():
        d.mode = mode


@contextmanager
def base_mode(deltas: dict[str, DeltaParam]) -> Iterator[None]:
    """Temporarily run the model as the frozen base (deltas switched off)."""
    saved = {k: d.mode for k, d in deltas.items()}
    set_mode(deltas, "off")
    try:
        yield
    finally:
        for k, d in deltas.items():
            d.mode = saved[k]


def l0_penalty(deltas: dict[str, DeltaParam]) -> torch.Tensor:
    return sum(d.l0() for d in deltas.values())


def gate_sparsity(deltas: dict[str, DeltaParam]) -> float:
    """Fraction of delta entries whose deterministic gate is closed (what step1's controller steers)."""
    total = sum(d.delta.numel() for d in deltas.values())
    return sum(d.gate_zeros() for d in deltas.values()) / max(total, 1)


@torch.no_grad()
def close_smallest(deltas: dict[str, DeltaParam], target_sparsity: float) -> int:
    """Close the gates of the smallest-magnitude effective deltas (all tensors pooled) until at
    least ``target_sparsity`` of all entries are zero. A column gate's magnitude is its column's
    mean |δ|, and closing it zeroes its ``d_out`` entries. Returns how many entries it closed."""
    eff = effective_deltas(deltas)
    total = sum(t.numel() for t in eff.values())
    allowed = int(total * (1.0 - target_sparsity))
    mags, counts = {}, {}
    for k, d in deltas.items():  # per gate: the mean |δ| of its open entries' span, and its entry count
        a = eff[k].abs()
        mags[k] = a.mean(dim=0, keepdim=True) if d.entries_per_gate > 1 else a
        counts[k] = d.entries_per_gate
    open_mags = torch.cat([m[m != 0].flatten() for m in mags.values()])
    open_counts = torch.cat([torch.full((int((m != 0).sum()),), counts[k], dtype=torch.int64)
                             for k, m in mags.items()])
    excess = int(open_counts.sum()) - allowed
    if excess <= 0:
        return 0
    order = open_mags.float().argsort()
    cut_at = int(torch.searchsorted(open_counts[order].cumsum(0), excess))  # fewest smallest gates
    cut = open_mags.float()[order[min(cut_at, len(order) - 1)]]  # close everything up to this magnitude
    closed = 0
    for k, d in deltas.items():
        shut = (mags[k] <= cut) & (mags[k] != 0)
        d.log_alpha[shut] = -10.0  # deterministic gate 0; P(z ≠ 0) ≈ 5e-5
        closed += int(shut.sum()) * counts[k]
    return closed


@torch.no_grad()
def effective_deltas(deltas: dict[str, DeltaParam]) -> dict[str, torch.Tensor]:
    """The deltas the evaluation model applies (deterministic gate or mask), by parameter name."""
    out = {}
    for k, d in deltas.items():
        was = d.training
        d.eval()
        out[k] = d.effective_delta().detach()
        d.train(was)
    return out


def delta_sparsity(deltas: dict[str, DeltaParam]) -> float:
    """Fraction of exactly-zero entries over all effective deltas."""
    eff = effective_deltas(deltas)
    total = sum(t.numel() for t in eff.values())
    zeros = sum((t == 0).sum().item() for t in eff.values())
    return zeros / max(total, 1)


def skip_rows(x: torch.Tensor, base: torch.Tensor, density: float) -> torch.Tensor:
    """``x`` with all but its ``density`` fraction of token rows replaced by the base's rows: the
    rows with the largest max-abs delta (over the whole batch, as the engine fits one τ per
    layer) keep their own values. This is what the engine computes at that density, so a step3
    trained through it learns the function it will serve. Gradients flow through the kept rows."""
    delta = x - base
    mag = delta.detach().abs().amax(dim=-1).flatten()
    keep = max(1, int(round(density * mag.numel())))
    if keep >= mag.numel():
        return x
    tau = mag.topk(keep).values[-1]
    return base + delta * (mag >= tau).view(delta.shape[:-1] + (1,)).to(delta.dtype)


class ActivationRecorder:
    """Hooks on the step3 activation points of every block; records, in order, their outputs
    (``inputs=False``, the reference's six points) or their inputs (``inputs=True``, the four
    linears the engine thresholds).

    The same hooks serve the base pass (deltas off, no grad) and the sub-task pass, so both
    activations come from one copy of the model code.
    """

    def __init__(self, encoder: nn.Module, points: tuple[str, ...], inputs: bool = False):
        self.outputs: list[torch.Tensor] = []
        self.handles = []
        for blk in encoder.blocks:
            for p in points:
                m = blk.get_submodule(p)
                if inputs:
                    self.handles.append(m.register_forward_pre_hook(self._pre_hook))
                else:
                    self.handles.append(m.register_forward_hook(self._hook))
        self.enabled = False
        self.skip: tuple[list[torch.Tensor], float] | None = None

    def _hook(self, module, inputs, output):
        if self.enabled:
            self.outputs.append(output)

    def _pre_hook(self, module, inputs):
        if not self.enabled:
            return None
        x = inputs[0]
        self.outputs.append(x)
        if self.skip is None:
            return None
        base, density = self.skip
        return (skip_rows(x, base[len(self.outputs) - 1], density),) + tuple(inputs[1:])

    @contextmanager
    def record(self, skip: tuple[list[torch.Tensor], float] | None = None) -> Iterator[list[torch.Tensor]]:
        """Record the points' tensors. ``skip=(base_inputs, density)`` (input hooks only) also
        feeds each linear what the engine feeds it at that row density: see :func:`skip_rows`."""
        self.outputs = []
        self.enabled = True
        self.skip = skip if skip is not None and skip[1] < 1.0 else None
        try:
            yield self.outputs
        finally:
            self.enabled = False
            self.skip = None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
