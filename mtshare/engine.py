"""Shared multi-task inference: the base runs once, every sub-task pays only for its deltas.

For each encoder linear of a sub-task ``s`` (DESIGN.md, "The math" → shared inference)::

    y_s = y_b + W_b · T_τ(x_s − x_b) + (M ⊙ δ) · x_s + δ_bias

``x_b`` / ``y_b`` are the base's input / output of the same linear. The engine runs the
encoder block by block and, inside a block, linear by linear for all tasks in lockstep: the
base's linear first, then every sub-task's, so only the current linear's base activations are
alive (memory O(layer), not O(depth)) and the gathered rows of all sub-tasks share ONE GEMM
with ``W_b`` (small GEMMs on CPU mostly pay for packing the weight). Layer norms,
GELU, softmax attention, residuals and the heads are computed per sub-task as they are; the
delta of a norm, bias, the global token or the patch embedding is applied densely (it costs
O(D) or one cheap product per token).

Real sparse execution, chosen per layer (weights: once, at load; merged or not: by the layer's
τ — a layer without one runs merged, see ``_runs_merged`` —; activation paths: every call, from
the measured sparsity of that call):

weight part ``(M ⊙ δ) · x_s``
    ``zero``   δ is all zero: nothing to do;
    ``csr``    δ stored as CSR; the product runs on ``torch.embedding_bag`` (sum mode with
               per-sample weights: one weighted row-sum of ``x_sᵀ`` per output channel — FBGEMM
               on CPU). On the 2-core CPU this was 2–4× faster than ``torch.sparse.mm`` on the
               same CSR tensor and as fast as a simple hand-written AVX2 kernel we tried
               (see docs/benchmarks.md);
    ``cols``   δ's non-zeros fill a few input columns (column gates, ``delta_gates: column``):
               the non-zero columns as one small dense block, the product one GEMM on the
               gathered input columns ``x_s[:, cols]`` (no per-entry indexing);
    ``dense``  δ too dense to pay: the layer keeps one merged weight ``W_b + M ⊙ δ`` and runs as
               a single dense GEMM, exactly (its τ is not applied).
activation part ``W_b · T_τ(x_s − x_b)``
    ``skip``   no row survives ``T_τ``;
    ``gather`` rows (tokens) whose thresholded input delta is all zero are skipped: gather the
               others → dense GEMM with ``W_b`` → scatter-add (``index_add_``) onto ``y_b``;
    ``csr``    (element threshold mode only) the thresholded delta as CSR times ``W_bᵀ``;
    ``dense``  sparsity too low to pay: one dense GEMM on the (thresholded) delta.

Whatever the path, the result is the formula above: paths change speed, not outputs.

Threshold modes. ``element`` is DESIGN.md's ``T_τ`` (entries with ``|·| < τ`` become 0).
``token`` (default) is its structured variant: a token's delta row is dropped when ALL its
entries are below τ (exactly the rows the element mode would zero completely) and kept whole
otherwise. The skipped rows — the only thing the ``gather`` path can exploit — are the same,
so token mode is as fast and, layer by layer, at least as close to the exact result. τ = 0
is exact in both.

FLOPs (per image, one multiply-add = 2): ``executed`` counts what the chosen paths really ran
(gathered rows × full width, CSR non-zeros, dense fallbacks); ``theoretical`` uses
``mtshare.flops``'s formula (element non-zeros of ``T_τ(x_s − x_b)`` × ``d_out`` + tokens ×
``nnz(M ⊙ δ)``). Attention and heads count as they are in both.
"""
from __future__ import annotations

import copy
import math
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from mtshare import checkpoint as ckpt
from mtshare.evaluation import Progress, Ranks
from mtshare.models import DenseTaskModel
from mtshare.models.heads import DenseHead
from mtshare.models.vit import FLAVORS, ViTConfig, ViTEncoder, _sincos_pos_embed, vit_config

__all__ = ["SharedEngine", "SparsePolicy", "CSRMatrix", "TaskStats", "calibrate", "LINEARS"]

LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")  # per block, in execution order
NORMS = ("norm1", "norm2")
LN_EPS = 1e-6  # ViTEncoder's LayerNorm eps (reference: 1e-6)
PATCH = "patch_embed.proj"


@dataclass(frozen=True)
class SparsePolicy:
    """When a sparse product pays, as fractions of non-zeros. Measured on the 2-core CPU with
    ``python -m mtshare.bench --crossover`` on ViT-B/16 at 512² (docs/benchmarks.md; cost of
    the sparse path / cost of the dense GEMM it replaces); re-measure on other hardware.

    ``gather_max``      activation rows: gather → GEMM → scatter-add while at most this fraction
                        of the tokens survive T_τ (measured 0.14 / 0.62 / 0.80 / 0.93 of the dense
                        GEMM at 10 / 50 / 75 / 90 % rows);
    ``gather_overhead`` the plan keeps a layer sparse only while its kept rows are at most
                        :meth:`gather_limit`: ``gather_max`` on wide layers, less on narrow ones,
                        where the delta, its row maxima, the copy of ``y_b`` and the scatter-add
                        (~``d_in + d_out`` per row, against the GEMM's ``d_in · d_out``) weigh as
                        much as the GEMM. Fitted on the demo's 64-wide layers: the whole path
                        costs 0.6–1.4 of the merged GEMM at 10 % of the rows kept, 1.1–1.8 at
                        50 %, proj 1.1–3.4 at any density;
    ``csr_act_max``     element mode: CSR activation product while the entry density is at most
                        this (0.36 / 0.61 / 0.92 at 1 / 5 / 10 %);
    ``csr_weight_max``  a delta weight stays CSR up to this density, denser ones are merged into
                        one dense weight (0.16 / 0.27 / 0.44 / 0.49 / 0.63 at 1 / 5 / 10 / 15 /
                        20 %: a CSR weight at 15 % still pays while under half the rows survive).
    ``cols_fill_min``   a sparse delta weight whose non-zeros fill at least this fraction of its
                        non-zero input columns runs as a dense column block (``cols``), not CSR:
                        per entry, zero or not, a GEMM runs about 4x faster than the CSR product
                        runs per non-zero.
    """

    gather_max: float = 0.8
    csr_act_max: float = 0.05
    csr_weight_max: float = 0.15
    cols_fill_min: float = 0.5
    gather_overhead: float = 32.0
    # A CSR-weight layer without a τ (exact), or whose fitted τ keeps too many rows to pay, runs
    # merged (never above its dense cost). False keeps CSR layers sparse (path tests, benches).
    never_above_dense: bool = True

    @classmethod
    def for_plan(cls, plan: str) -> "SparsePolicy":
        """The policy a calibration with ``calibration.plan`` fits under: ``time`` the measured
        per-shape crossover, ``flops`` only ``gather_max`` (sparse wherever it saves FLOPs)."""
        return cls(gather_overhead=0.0) if plan == "flops" else cls()

    def gather_limit(self, d_in: int, d_out: int) -> float:
        """The largest fraction of kept rows at which the gather path of a ``d_in → d_out``
        linear still beats its merged GEMM: ``gather_max`` on wide layers (ViT-S/B: 0.8), less
        on narrow ones (128 wide: 0.5 for proj, ~0.7 for the others; 64 wide: 0 for proj,
        ~0.35 for the others)."""
        return min(self.gather_max, 1.0 - self.gather_overhead * (d_in + d_out) / (d_in * d_out))


class CSRMatrix:
    """A 2-D sparse matrix in CSR form whose products run on ``torch.embedding_bag``.

    ``A @ B`` (``A`` [R, K] sparse, ``B`` [K, M] dense) is, for every row ``i`` of ``A``, the sum
    of the rows ``B[col]`` weighted by ``A[i, col]``: an embedding bag (sum mode) with
    per-sample weights, which FBGEMM runs well on CPU.
    """

    # Tokens per embedding_bag call in :meth:`linear`. Measured on the 2-core CPU (ViT-B
    # shapes, 10 % density): 32–64 keeps the summed rows and the transposed result in cache;
    # one call over all tokens was ~2x slower (the [R, n] -> [n, R] transpose dominates).
    TOKEN_CHUNK = 64

    def __init__(self, dense: torch.Tensor):
        assert dense.dim() == 2
        with warnings.catch_warnings():  # "sparse CSR support is in beta": only its layout is used here
            warnings.simplefilter("ignore", UserWarning)
            csr = dense.to_sparse_csr()
        self.shape = tuple(dense.shape)
        self.crow = csr.crow_indices().contiguous()
        self.col = csr.col_indices().contiguous()
        self.val = csr.values().contiguous()
        self.nnz = int(self.val.numel())

    def to_dense(self) -> torch.Tensor:
        rows = torch.repeat_interleave(torch.arange(self.shape[0], device=self.val.device), self.crow.diff())
        out = torch.zeros(self.shape, dtype=self.val.dtype, device=self.val.device)
        out[rows, self.col] = self.val
        return out

    @property
    def density(self) -> float:
        return self.nnz / max(1, self.shape[0] * self.shape[1])

    @property
    def work(self) -> int:
        """Entries :meth:`linear` multiplies per row of ``x``: the non-zeros."""
        return self.nnz

    def matmul(self, b: torch.Tensor) -> torch.Tensor:
        """``self @ b`` for a dense ``b`` [K, M]; returns [R, M]."""
        return self._bag(b.contiguous())

    def linear(self, x: torch.Tensor, add: torch.Tensor | None = None,
               bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ selfᵀ (+ add) (+ bias)`` — a linear layer with this sparse weight (``x`` [n, K],
        ``add`` [n, R]) — token chunk by token chunk."""
        n, c = x.shape[0], self.TOKEN_CHUNK
        if add is None:
            out = torch.zeros(n, self.shape[0], dtype=x.dtype, device=x.device)
        else:  # (measured: one copy then in-place adds beats writing each chunk with out=)
            out = add + bias if bias is not None else add.clone()
            bias = None
        for i in range(0, n, c):
            out[i:i + c].add_(self._bag(x[i:i + c].t().contiguous()).t())
        return out if bias is None else out.add_(bias)

    def _bag(self, table: torch.Tensor) -> torch.Tensor:
        return F.embedding_bag(self.col, table, self.crow, mode="sum", per_sample_weights=self.val.to(table.dtype),
                               include_last_offset=True)


class ColumnMatrix:
    """A 2-D matrix whose non-zeros lie in a few columns, kept as those columns (a dense block
    ``[R, k]``) and their indices: ``x @ selfᵀ`` is one GEMM on ``x[:, cols]``. What column
    gates (``delta_gates: column``) leave; the same interface as :class:`CSRMatrix`."""

    def __init__(self, dense: torch.Tensor, cols: torch.Tensor):
        assert dense.dim() == 2
        self.shape = tuple(dense.shape)
        self.cols = cols.contiguous()
        self.block = dense.index_select(1, self.cols).contiguous()
        self.work = self.block.numel()  # entries :meth:`linear` multiplies per row of ``x``: the whole block

    def to_dense(self) -> torch.Tensor:
        out = torch.zeros(self.shape, dtype=self.block.dtype, device=self.block.device)
        out[:, self.cols] = self.block
        return out

    def linear(self, x: torch.Tensor, add: torch.Tensor | None = None,
               bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ selfᵀ (+ add) (+ bias)``, as :meth:`CSRMatrix.linear`."""
        xc = x.index_select(1, self.cols)
        if add is None:
            out = xc @ self.block.t()
        else:
            out = torch.addmm(add, xc, self.block.t())
        return out if bias is None else out.add_(bias)


@dataclass
class _DeltaLinear:
    """How one sub-task executes one encoder linear (or the patch embedding)."""

    weight_nnz: int
    weight_numel: int
    mode: str  # "zero" | "csr" | "cols" | "dense"
    sparse: CSRMatrix | ColumnMatrix | None = None  # the sparse delta weight ("csr", "cols")
    merged_w: torch.Tensor | None = None  # W_b + M ⊙ δ ("dense" mode)
    merged_b: torch.Tensor | None = None
    bias_delta: torch.Tensor | None = None  # None when all zero

    @property
    def weight_work(self) -> int:
        """Entries the sparse delta-weight product multiplies per token (0 without one)."""
        return 0 if self.sparse is None else self.sparse.work


@dataclass
class _SubTask:
    name: str
    head: DenseHead
    linears: dict[str, _DeltaLinear]
    norms: dict[str, tuple[torch.Tensor, torch.Tensor]]  # merged LayerNorm (weight, bias) by path
    cls_token: torch.Tensor
    patch: _DeltaLinear
    weight_nnz: int
    weight_numel: int


@dataclass
class TaskStats:
    """What one task cost in the last call (FLOPs per image)."""

    executed_flops: float = 0.0
    theoretical_flops: float = 0.0
    act_density: dict[str, float] = field(default_factory=dict)  # entries of T_τ(x_s − x_b) ≠ 0, per linear
    row_density: dict[str, float] = field(default_factory=dict)  # tokens with a non-zero delta row
    rows_run: dict[str, float] = field(default_factory=dict)  # fraction of the layer's rows the paths ran
    layer_flops: dict[str, float] = field(default_factory=dict)  # dense FLOPs of the layer (per image)
    paths: dict[str, str] = field(default_factory=dict)  # "<activation path>+<weight path>" per linear

    def path_counts(self) -> dict[str, int]:
        return dict(Counter(self.paths.values()))

    @property
    def rows_skipped(self) -> float | None:
        """Fraction of the encoder linears' token rows not computed, weighted by their FLOPs."""
        total = sum(self.layer_flops.values())
        if not total:
            return None
        return sum((1.0 - self.rows_run[k]) * f for k, f in self.layer_flops.items()) / total

    def to_dict(self) -> dict:
        n = len(self.act_density)
        return {
            "executed_flops": self.executed_flops, "theoretical_flops": self.theoretical_flops,
            "act_density": sum(self.act_density.values()) / n if n else None,
            "row_density": sum(self.row_density.values()) / n if n else None,
            "rows_skipped": self.rows_skipped,
            "paths": self.path_counts(),
        }


def _infer_config(encoder_sd: Mapping[str, torch.Tensor], manifest: Mapping | None = None) -> ViTConfig:
    """The encoder's config: from the manifest when it names it, else from the weights' shapes."""
    model = (manifest or {}).get("model") or {}
    if model.get("flavor") in FLAVORS:
        return vit_config(model["flavor"], int(model.get("patch_size", 16)))
    dim = encoder_sd["cls_token"].shape[-1]
    depth = len({k.split(".")[1] for k in encoder_sd if k.startswith("blocks.")})
    patch = encoder_sd[f"{PATCH}.weight"].shape[-1]
    for name, f in FLAVORS.items():
        if f["embed_dim"] == dim and f["depth"] == depth:
            return vit_config(name, patch)
    raise ckpt.CheckpointError(f"no known ViT flavor with embed_dim {dim} and depth {depth}")


def _head_from_state(head: DenseHead | Mapping[str, torch.Tensor], embed_dim: int) -> DenseHead:
    if isinstance(head, nn.Module):
        return copy.deepcopy(head)  # the engine moves / casts its heads: never the caller's
    width, out_ch = head["proj.weight"].shape[0], head["out.weight"].shape[0]
    module = DenseHead(embed_dim, out_ch, width)
    module.load_state_dict(head, strict=True)
    return module


class SharedEngine(nn.Module):
    """Base task + any number of sub-tasks sharing one frozen encoder (see the module docstring).

    Build it from checkpoints (:meth:`from_checkpoints`) or from in-memory weights (the
    constructor): ``base_encoder`` is the base encoder's state dict, ``subtasks`` maps a task to
    ``(deltas, head)`` with ``deltas`` the dense effective deltas ``M ⊙ δ`` by encoder
    parameter name (what ``effective_deltas`` / ``load_subtask`` give; missing names = zero).
    ``engine(images)`` returns ``{task: raw output at the input size}``.
    """

    def __init__(self, cfg: ViTConfig, base_task: str, base_encoder: Mapping[str, torch.Tensor],
                 base_head: DenseHead | Mapping[str, torch.Tensor],
                 subtasks: Mapping[str, tuple[Mapping[str, torch.Tensor], DenseHead | Mapping[str, torch.Tensor]]],
                 *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 policy: SparsePolicy | None = None, threshold_mode: str = "token", collect_stats: bool = False):
        super().__init__()
        if threshold_mode not in ("token", "element"):
            raise ValueError(f"threshold_mode must be 'token' or 'element', got '{threshold_mode}'")
        if base_task in subtasks:
            raise ValueError(f"task '{base_task}' is both the base and a sub-task")
        self.cfg = cfg
        self.base_task = base_task
        self.policy = policy or SparsePolicy()
        self.threshold_mode = threshold_mode
        self.device = torch.device(device)
        self.dtype = dtype
        self.collect_stats = collect_stats  # count FLOPs / densities (extra reductions and host syncs): reports
        self.last_stats: dict[str, TaskStats] = {}
        self.thresholds: dict[str, dict[str, float]] = {t: {} for t in subtasks}
        # video streams: temporal τ by task (base included), then by layer (mtshare.stream)
        self.temporal_thresholds: dict[str, dict[str, float]] = {}
        self.stream_settings: dict | None = None  # {"keyframe_every", "split_layer"} the stored τ were calibrated for
        self._fit_density: dict[str, float | dict[str, float]] | None = None
        self._fit_ranks: Ranks = Ranks.single()  # fitting τ on a split sharded over these ranks
        self._head_flops: dict[tuple, float] = {}
        self._wt_cache: dict[str, torch.Tensor] = {}

        expected = set(ViTEncoder(cfg).state_dict())
        ckpt.check_keys("base encoder", set(base_encoder), expected, "encoder")
        self.base = {k: v.detach().to(self.device, dtype) for k, v in base_encoder.items()}
        self.heads = nn.ModuleDict({base_task: _head_from_state(base_head, cfg.embed_dim)})
        self.subtasks: dict[str, _SubTask] = {}
        for task, (deltas, head) in subtasks.items():
            unknown = sorted(set(deltas) - expected)
            if unknown:
                raise ckpt.CheckpointError(f"sub-task '{task}': deltas for unknown encoder parameters {unknown[:6]}")
            self.heads[task] = _head_from_state(head, cfg.embed_dim)
            self.subtasks[task] = self._build_subtask(task, deltas)
        self.heads.to(self.device, dtype).eval()

    # --- construction -------------------------------------------------------------------------

    @staticmethod
    def _read_base(base_path: str | Path, base_sha256: str | None) -> tuple[ViTConfig, str, dict, dict]:
        enc_sd, head_sd, manifest = ckpt.load_dense(base_path, expected_sha256=base_sha256)
        if manifest.get("kind") != "base":
            raise ckpt.CheckpointError(f"{base_path}: not a base checkpoint (kind '{manifest.get('kind')}')")
        return _infer_config(enc_sd, manifest), manifest.get("task", "semseg"), enc_sd, head_sd

    @classmethod
    def from_base_checkpoint(cls, base_path: str | Path, subtasks: Mapping[str, tuple], base_sha256: str | None = None,
                             **kwargs) -> "SharedEngine":
        """The engine over a base checkpoint (its sha256 checked when given) and in-memory
        sub-tasks ``{task: (deltas, head)}`` (a training stage's own model)."""
        cfg, base_task, enc_sd, head_sd = cls._read_base(base_path, base_sha256)
        return cls(cfg, base_task, enc_sd, head_sd, subtasks, **kwargs)

    @classmethod
    def from_checkpoints(cls, base_path: str | Path, subtask_paths: Mapping[str, str | Path], device="cpu",
                         dtype: torch.dtype = torch.float32, *, base_sha256: str | None = None,
                         subtask_sha256: Mapping[str, str] | None = None, **kwargs) -> "SharedEngine":
        """Load a base checkpoint and sub-task checkpoints; every sub-task must have been made
        against this very base file (sha256), else :class:`CheckpointError`. ``base_sha256`` /
        ``subtask_sha256`` (by task): the checksums the files must have (a suite's results).
        Thresholds start at τ = 0 (exact); a suite as served is ``mtshare.infer.load_suite_engine``."""
        base_sha = base_sha256 or ckpt.sha256_file(base_path)
        cfg, base_task, enc_sd, head_sd = cls._read_base(base_path, base_sha)
        subs = {}
        for task, path in subtask_paths.items():
            deltas, sub_head, _ = ckpt.load_subtask(path, base_sha256=base_sha,
                                                    expected_sha256=(subtask_sha256 or {}).get(task))
            ckpt.check_keys(path, set(deltas), set(enc_sd), "deltas")
            subs[task] = (deltas, sub_head)
        return cls(cfg, base_task, enc_sd, head_sd, subs, device=device, dtype=dtype, **kwargs)

    def _delta_linear(self, name: str, deltas: Mapping[str, torch.Tensor]) -> _DeltaLinear:
        w_b, b_b = self.base[f"{name}.weight"], self.base[f"{name}.bias"]
        dw = deltas.get(f"{name}.weight")
        db = deltas.get(f"{name}.bias")
        dw = torch.zeros_like(w_b) if dw is None else dw.to(self.device, self.dtype)
        db = None if db is None or not bool((db != 0).any()) else db.to(self.device, self.dtype)
        nnz, numel = int((dw != 0).sum()), dw.numel()
        lin = _DeltaLinear(weight_nnz=nnz, weight_numel=numel, mode="zero", bias_delta=db)
        if nnz == 0:
            return lin
        if nnz / numel <= self.policy.csr_weight_max:
            dw2 = dw.reshape(dw.shape[0], -1)
            cols = dw2.ne(0).any(dim=0).nonzero().view(-1)
            if nnz >= self.policy.cols_fill_min * cols.numel() * dw2.shape[0]:
                lin.mode, lin.sparse = "cols", ColumnMatrix(dw2, cols)
            else:
                lin.mode, lin.sparse = "csr", CSRMatrix(dw2)
        else:
            lin.mode = "dense"
            lin.merged_w = w_b + dw
            lin.merged_b = b_b + db if db is not None else b_b
        return lin

    def _build_subtask(self, task: str, deltas: Mapping[str, torch.Tensor]) -> _SubTask:
        def merged(key):
            d = deltas.get(key)
            return self.base[key] if d is None else self.base[key] + d.to(self.device, self.dtype)

        linears = {}
        norms = {}
        for i in range(self.cfg.depth):
            for lin in LINEARS:
                path = f"blocks.{i}.{lin}"
                linears[path] = self._delta_linear(path, deltas)
            for nm in NORMS:
                path = f"blocks.{i}.{nm}"
                norms[path] = (merged(f"{path}.weight"), merged(f"{path}.bias"))
        patch = self._delta_linear(PATCH, deltas)
        nnz = sum(l.weight_nnz for l in linears.values()) + patch.weight_nnz
        numel = sum(l.weight_numel for l in linears.values()) + patch.weight_numel
        return _SubTask(task, self.heads[task], linears, norms, merged("cls_token"), patch, nnz, numel)

    @property
    def tasks(self) -> list[str]:
        return [self.base_task, *self.subtasks]

    def linear_paths(self) -> list[str]:
        return [f"blocks.{i}.{lin}" for i in range(self.cfg.depth) for lin in LINEARS]

    def weight_density(self, task: str) -> float:
        """Fraction of non-zero delta entries over the encoder's linears and patch embedding."""
        s = self.subtasks[task]
        return s.weight_nnz / max(1, s.weight_numel)

    def delta_nnz(self, task: str) -> dict[str, int]:
        """Non-zeros of the delta weights by parameter name (``mtshare.flops.shared_flops``'s input)."""
        s = self.subtasks[task]
        out = {f"{path}.weight": lin.weight_nnz for path, lin in s.linears.items()}
        out[f"{PATCH}.weight"] = s.patch.weight_nnz
        return out

    def set_thresholds(self, task: str, thresholds: Mapping[str, float]) -> None:
        """Per-layer τ for a sub-task, by linear path (``blocks.3.mlp.fc1``); missing = 0 = exact."""
        unknown = sorted(set(thresholds) - set(self.linear_paths()))
        if unknown:
            raise ValueError(f"unknown linear paths {unknown[:4]}")
        self.thresholds[task] = {k: float(v) for k, v in thresholds.items()}

    def stream(self, keyframe_every: int = 8, split_layer: int | None = None, **kwargs):
        """A stateful video stream over this engine: ``push(frame) -> {task: output}``, sharing
        computation across frames as well as tasks (``mtshare.stream.VideoStream``)."""
        from mtshare.stream import VideoStream

        return VideoStream(self, keyframe_every=keyframe_every, split_layer=split_layer, **kwargs)

    @torch.no_grad()
    def dense_model(self, task: str) -> DenseTaskModel:
        """The task as a plain dense model (encoder weights ``W_b + M ⊙ δ``): the reference the
        engine must match at τ = 0, and what "independent models" means in the benchmark."""
        enc = ViTEncoder(self.cfg)
        sd = dict(self.base)
        if task != self.base_task:
            s = self.subtasks[task]
            for path, lin in s.linears.items():
                sd.update(self._merged_linear(path, lin))
            sd.update(self._merged_linear(PATCH, s.patch))
            for path, (w, b) in s.norms.items():
                sd[f"{path}.weight"], sd[f"{path}.bias"] = w, b
            sd["cls_token"] = s.cls_token
        enc.load_state_dict({k: v.clone() for k, v in sd.items()}, strict=True)
        head = _head_from_state(dict(self.heads[task].state_dict()), self.cfg.embed_dim)
        return DenseTaskModel(enc, head, task).to(self.device, self.dtype).eval()

    def _merged_linear(self, name: str, lin: _DeltaLinear) -> dict[str, torch.Tensor]:
        w, b = self.base[f"{name}.weight"], self.base[f"{name}.bias"]
        if lin.mode == "dense":
            return {f"{name}.weight": lin.merged_w, f"{name}.bias": lin.merged_b}
        if lin.sparse is not None:
            w = w + lin.sparse.to_dense().reshape(w.shape)
        if lin.bias_delta is not None:
            b = b + lin.bias_delta
        return {f"{name}.weight": w, f"{name}.bias": b}

    # --- forward --------------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, images: torch.Tensor, tasks: list[str] | None = None) -> dict[str, torch.Tensor]:
        tasks, subs, x = self._inputs(images, tasks)
        stats = {t: TaskStats() for t in tasks} if self.collect_stats else {}
        self._stats, self._batch = stats, x.shape[0]
        hb, hs = self._embed(x, subs)
        for i in range(self.cfg.depth):
            hb, hs = self._block(i, hb, hs, subs)
        if self.base_task in stats:
            n_tok = hb.shape[1]
            stats[self.base_task].executed_flops += self._dense_linear_flops(n_tok)  # the base runs densely
            stats[self.base_task].theoretical_flops += self._dense_linear_flops(n_tok)
        return self._outputs(tasks, {self.base_task: hb, **hs}, x.shape[-2:])

    def _inputs(self, images: torch.Tensor, tasks: list[str] | None) -> tuple[list[str], list[_SubTask], torch.Tensor]:
        tasks = list(tasks) if tasks is not None else self.tasks
        unknown = [t for t in tasks if t not in self.heads]
        if unknown:
            raise ValueError(f"unknown tasks {unknown} (engine has {self.tasks})")
        x = images.to(self.device, self.dtype)
        p = self.cfg.patch_size
        if x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError(f"input size {tuple(x.shape[-2:])} is not divisible by the patch size {p}")
        return tasks, [self.subtasks[t] for t in tasks if t != self.base_task], x

    def _embed(self, x: torch.Tensor, subs: list[_SubTask], hb: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Patch embedding + global token + position embedding for the base and every sub-task:
        the same image for every task, so only the delta weights cost (``x_s = x_b``). ``hb``:
        the base's patch embedding [B, L, D] when the caller has it (a video stream)."""
        b, _, H, W = x.shape
        p = self.cfg.patch_size
        h, w = H // p, W // p
        stats = self._stats
        if hb is None:
            hb = F.conv2d(x, self.base[f"{PATCH}.weight"], self.base[f"{PATCH}.bias"], stride=p)
            hb = hb.flatten(2).transpose(1, 2)  # [B, L, D]
            if self.base_task in stats:
                pe_flops = 2.0 * h * w * self.base[f"{PATCH}.weight"].numel()
                stats[self.base_task].executed_flops += pe_flops
                stats[self.base_task].theoretical_flops += pe_flops
        patches = None
        hs: dict[str, torch.Tensor] = {}
        for s in subs:
            lin = s.patch
            th = 2.0 * h * w * lin.weight_nnz
            if lin.mode == "dense":
                y = F.conv2d(x, lin.merged_w, lin.merged_b, stride=p).flatten(2).transpose(1, 2)
                ex = 2.0 * h * w * lin.weight_numel
            else:
                y = hb if lin.bias_delta is None else hb + lin.bias_delta
                if lin.sparse is not None:
                    if patches is None:  # [B·L, 3·p·p], in the conv weight's (C, kh, kw) order
                        patches = F.unfold(x, p, stride=p).transpose(1, 2).reshape(b * h * w, -1)
                    y = lin.sparse.linear(patches, add=y.reshape(b * h * w, -1)).reshape(b, h * w, -1)
                ex = 2.0 * h * w * lin.weight_work
            hs[s.name] = y
            if s.name in stats:
                stats[s.name].executed_flops += ex
                stats[s.name].theoretical_flops += th

        pos = _sincos_pos_embed(self.cfg.embed_dim, h, w).to(self.device, self.dtype)

        def tokens(y, cls):
            return torch.cat([cls.expand(b, -1, -1), y + pos], dim=1)

        return tokens(hb, self.base["cls_token"]), {s.name: tokens(hs[s.name], s.cls_token) for s in subs}

    def _outputs(self, tasks: list[str], feats: dict[str, torch.Tensor], size) -> dict[str, torch.Tensor]:
        """Every task's head on its tokens; adds attention and heads to the FLOPs when counting
        (they run as they are) and publishes ``last_stats``."""
        H, W = size
        b, n_tok, _ = feats[self.base_task].shape
        p = self.cfg.patch_size
        h, w = H // p, W // p
        out = {}
        for t in tasks:
            f = feats[t][:, 1:].transpose(1, 2).reshape(b, self.cfg.embed_dim, h, w)
            out[t] = self.heads[t](f, out_size=(H, W))
        if self._stats:
            attn = 4.0 * n_tok * n_tok * self.cfg.embed_dim * self.cfg.depth  # QKᵀ and AV per image
            for t in tasks:
                fixed = attn + self._head_cost(t, h, w, H, W)
                self._stats[t].executed_flops += fixed
                self._stats[t].theoretical_flops += fixed
            self.last_stats = self._stats
        return out

    def _dense_linear_flops(self, n_tok: int) -> float:
        d = self.cfg.embed_dim
        hidden = int(d * self.cfg.mlp_ratio)
        per_block = 2.0 * n_tok * (d * 3 * d + d * d + d * hidden + hidden * d)
        return per_block * self.cfg.depth

    def _head_cost(self, task: str, h: int, w: int, H: int, W: int) -> float:
        key = (task, h, w, H, W)
        if key not in self._head_flops:
            head = self.heads[task]
            z = torch.zeros(1, self.cfg.embed_dim, h, w, device=self.device, dtype=self.dtype)
            with FlopCounterMode(display=False) as counter:
                head(z, out_size=(H, W))
            self._head_flops[key] = float(counter.get_total_flops())
        return self._head_flops[key]

    def _block(self, i: int, xb: torch.Tensor, xs: dict[str, torch.Tensor], subs: list[_SubTask],
               linear: Callable | None = None, mlp: Callable | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One timm ``Block`` (pre-norm attention + MLP, no layer scale) for the base and every
        sub-task in lockstep: each linear runs for the base first, then for all sub-tasks at
        once, so their gathered rows share one GEMM with ``W_b`` (one weight packing, one call).
        ``linear``: how the linears run (default :meth:`_linear`); ``mlp(path, x_b, xs, subs)``:
        how the MLP runs (default: fc1, GELU, fc2 through ``linear``). A video stream passes its own."""
        pre = f"blocks.{i}."
        linear = linear or self._linear
        b, n, d = xb.shape
        heads = self.cfg.num_heads

        def norm(path, xb, xs):
            yb = F.layer_norm(xb, (d,), self.base[f"{path}.weight"], self.base[f"{path}.bias"], eps=LN_EPS)
            return yb, {s.name: F.layer_norm(xs[s.name], (d,), *s.norms[path], eps=LN_EPS) for s in subs}

        def attention(qkv):
            q, k, v = qkv.reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4).unbind(0)
            return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)

        yb, ys = norm(pre + "norm1", xb, xs)
        yb, ys = linear(pre + "attn.qkv", yb, ys, subs)
        yb, ys = linear(pre + "attn.proj", attention(yb), {t: attention(y) for t, y in ys.items()}, subs)
        xb, xs = xb + yb, {t: xs[t] + ys[t] for t in xs}
        yb, ys = norm(pre + "norm2", xb, xs)
        if mlp is None:
            yb, ys = linear(pre + "mlp.fc1", yb, ys, subs)
            yb, ys = linear(pre + "mlp.fc2", F.gelu(yb), {t: F.gelu(y) for t, y in ys.items()}, subs)
        else:
            yb, ys = mlp(pre + "mlp", yb, ys, subs)
        return xb + yb, {t: xs[t] + ys[t] for t in xs}

    def _linear(self, name: str, x_b: torch.Tensor, xs: dict[str, torch.Tensor], subs: list[_SubTask],
                y_b: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The base's linear (unless given as ``y_b``), then every sub-task's
        ``y_b + W_b · T_τ(x_s − x_b) + (M ⊙ δ) · x_s``."""
        w_b, b_b = self.base[f"{name}.weight"], self.base[f"{name}.bias"]
        if y_b is None:
            y_b = F.linear(x_b, w_b, b_b)
        d_out, d_in = w_b.shape
        n = x_b.numel() // d_in  # tokens in the batch
        ys: dict[str, torch.Tensor] = {}
        gathered: list[tuple[str, torch.Tensor, torch.Tensor]] = []  # (task, row indices, delta rows)
        for sub in subs:
            lin = sub.linears[name]
            x_s = xs[sub.name]
            st = self._stats.get(sub.name) if self._stats else None
            if lin.mode == "dense" or self._runs_merged(sub.name, name):
                ys[sub.name] = self._linear_merged(name, lin, x_s, x_b, st)
                continue

            delta = (x_s - x_b).reshape(n, d_in)
            tau = self._threshold(sub.name, name, delta)
            if tau > 0 and self.threshold_mode == "element":
                delta = delta.masked_fill(delta.abs() < tau, 0)
            # max |row| as max(max, −min): two reads, no |delta| temporary (measured up to 6x
            # faster than abs().amax() on wide layers, and ~5x faster than ne(0).any())
            rowmax = torch.maximum(delta.amax(dim=1), delta.amin(dim=1).neg_())
            rows = rowmax >= tau if (tau > 0 and self.threshold_mode == "token") else rowmax > 0
            idx = rows.nonzero().squeeze(1)
            fitting = self._fitting(sub.name)
            kept, total = idx.numel(), n
            if fitting:  # the whole set's fraction (every rank's share): plan and path must not depend on the sharding
                kept, total = self._fit_ranks.sum_floats(kept, total)
            r = kept / total
            if fitting and not self._sparse_pays(r, lin, d_in, d_out):
                # Fitting: at this τ the kept rows (plus a CSR weight) would not pay against the
                # merged layer, so the plan runs this layer merged (exact): it keeps no τ.
                self.thresholds[sub.name].pop(name, None)
                ys[sub.name] = self._linear_merged(name, lin, x_s, x_b, st)
                continue

            y = y_b.reshape(n, d_out)
            if lin.sparse is not None:  # (a) sparse delta weight on every token, written with y_b (+ δ_bias)
                y = lin.sparse.linear(x_s.reshape(n, d_in), add=y, bias=lin.bias_delta)
            elif lin.bias_delta is not None:
                y = y + lin.bias_delta
            elif r > 0:  # (otherwise nothing to add: y_s is y_b itself, no copy)
                y = y.clone()
            nnz = None
            if r == 0:
                act, ex_act, run = "skip", 0.0, 0.0
            elif r <= self.policy.gather_max:  # (b) skip zero rows: gather now, GEMM below
                rows_delta = delta.index_select(0, idx)
                gathered.append((sub.name, idx, rows_delta))
                act, ex_act, run = "gather", 2.0 * idx.numel() * d_in * d_out, r
                if st is not None:
                    nnz = int(torch.count_nonzero(rows_delta))
            else:
                if tau > 0 and self.threshold_mode == "token" and idx.numel() < n:
                    delta = delta * rows.unsqueeze(1).to(delta.dtype)
                if st is not None or self.threshold_mode == "element":
                    nnz = int(torch.count_nonzero(delta))
                if self.threshold_mode == "element" and nnz / (n * d_in) <= self.policy.csr_act_max:
                    # (a) unstructured sparse activations: CSR(delta) @ W_bᵀ
                    y += CSRMatrix(delta).matmul(self._weight_t(name))
                    act, ex_act, run = "csr", 2.0 * nnz * d_out, nnz / (n * d_in)
                else:  # (c) dense: one GEMM on the thresholded delta
                    y.addmm_(delta, w_b.t())
                    act, ex_act, run = "dense", 2.0 * n * d_in * d_out, 1.0
            ys[sub.name] = y
            if st is not None:
                nnz = 0 if nnz is None else nnz
                self._record(st, name, f"{act}+{lin.mode}", nnz / (n * d_in), r, run,
                             executed=ex_act + 2.0 * n * lin.weight_work,
                             theoretical=2.0 * (nnz * d_out + n * lin.weight_nnz), dense=2.0 * n * d_in * d_out)
        if gathered:  # (b) one GEMM with W_b over the surviving rows of every sub-task, scatter-add
            z = F.linear(torch.cat([rows for _, _, rows in gathered]), w_b)
            for (task, idx, _), part in zip(gathered, z.split([len(i) for _, i, _ in gathered])):
                ys[task].index_add_(0, idx, part)
        return y_b, {t: y.reshape(y_b.shape) for t, y in ys.items()}

    def _linear_merged(self, name: str, lin: _DeltaLinear, x_s: torch.Tensor, x_b: torch.Tensor,
                       st: TaskStats | None) -> torch.Tensor:
        """(c) one GEMM with the merged weight ``W_b + M ⊙ δ``: exact, the layer's dense cost."""
        w_m, b_m = self._merged(name, lin)
        y = F.linear(x_s, w_m, b_m)
        if st is not None:
            d_out, d_in = w_m.shape
            diff = (x_s - x_b).reshape(-1, d_in)
            n = diff.shape[0]
            nnz = int(torch.count_nonzero(diff))
            rows = float((diff.abs().amax(dim=1) > 0).float().mean())
            self._record(st, name, "merged", nnz / (n * d_in), rows, 1.0, executed=2.0 * n * d_in * d_out,
                         theoretical=2.0 * (nnz * d_out + n * lin.weight_nnz), dense=2.0 * n * d_in * d_out)
        return y

    def _record(self, st: TaskStats, name: str, path: str, density: float, row_density: float, rows_run: float,
                executed: float, theoretical: float, dense: float) -> None:
        st.paths[name] = path
        st.act_density[name] = density
        st.row_density[name] = row_density
        st.rows_run[name] = rows_run
        st.layer_flops[name] = dense / self._batch
        st.executed_flops += executed / self._batch  # FLOPs are reported per image
        st.theoretical_flops += theoretical / self._batch

    def _sparse_pays(self, rows: float, lin: _DeltaLinear, d_in: int, d_out: int) -> bool:
        """Whether gathered rows + the sparse delta weight beat the merged layer: in FLOPs, and
        in time by the measured gather crossover for the layer's shape
        (:meth:`SparsePolicy.gather_limit`)."""
        if not self.policy.never_above_dense:
            return True
        return rows <= self.policy.gather_limit(d_in, d_out) and rows + lin.weight_work / lin.weight_numel < 1.0

    def _runs_merged(self, task: str, name: str) -> bool:
        """The per-layer plan, fixed by the thresholds (never by the batch, so a model's outputs
        do not depend on what it is batched with): a layer with a τ runs sparse; one without
        (exact) would run every row (plus a CSR weight), at least the merged layer's cost, so it
        runs merged: one plain GEMM with ``W_b + M ⊙ δ`` (``W_b`` itself for a zero delta), no
        delta arithmetic. ``SparsePolicy(never_above_dense=False)`` keeps every layer sparse."""
        if not self.policy.never_above_dense or self._fitting(task):
            return False
        return not self.thresholds[task].get(name)

    def _fitting(self, task: str) -> bool:
        return self._fit_density is not None and task in self._fit_density

    def _merged(self, name: str, lin: _DeltaLinear) -> tuple[torch.Tensor, torch.Tensor]:
        """``W_b + M ⊙ δ`` (and bias) of a layer: made at load for a dense delta, on first use for
        a CSR or zero one (``W_b`` itself then, no copy), and kept."""
        if lin.merged_w is None:
            merged = self._merged_linear(name, lin)
            lin.merged_w, lin.merged_b = merged[f"{name}.weight"], merged[f"{name}.bias"]
        return lin.merged_w, lin.merged_b

    def _weight_t(self, name: str) -> torch.Tensor:
        """``W_bᵀ`` contiguous (the table of the CSR activation product), made on first use."""
        if name not in self._wt_cache:
            self._wt_cache[name] = self.base[f"{name}.weight"].t().contiguous()
        return self._wt_cache[name]

    # --- thresholds -----------------------------------------------------------------------------

    def _threshold(self, task: str, name: str, delta: torch.Tensor) -> float:
        if self._fitting(task):
            density = self._fit_density[task]
            if isinstance(density, Mapping):  # per layer, "*" for the rest
                density = density.get(name, density["*"])
            self.thresholds[task][name] = _tau_for_density(delta, density, self.threshold_mode, self._fit_ranks)
        return self.thresholds[task].get(name, 0.0)

    @torch.inference_mode()
    def fit_thresholds(self, images: torch.Tensor, density: float | Mapping[str, float],
                       ranks: Ranks | None = None) -> dict[str, torch.Tensor]:
        """Set every layer's τ so that a fraction ``density`` of the activation delta survives on
        ``images`` (rows in token mode, entries in element mode), layer after layer in one pass
        (each τ sees the deltas the earlier thresholds produced). ``density`` may be per task,
        and a task's may be per layer (``{path: density, "*": density of the others}``).
        Returns that pass's outputs, which are exactly the outputs under the new thresholds.

        ``ranks``: ``images`` is this rank's contiguous share of the set (``Ranks.share``); every
        rank calls this together, and each layer's τ and plan come from the deltas of the whole
        set (gathered), so every rank gets the τ one process would on all the images."""
        subs = list(self.subtasks)
        target = density if isinstance(density, Mapping) else {t: density for t in subs}
        self._fit_density = {t: (dict(v) if isinstance(v, Mapping) else float(v)) for t, v in target.items()}
        self._fit_ranks = ranks or Ranks.single()
        for t in self._fit_density:
            self.thresholds[t] = {}
        try:
            return self(images)
        finally:
            self._fit_density = None
            self._fit_ranks = Ranks.single()


def _tau_for_density(delta: torch.Tensor, density: float, mode: str, ranks: Ranks | None = None) -> float:
    """The τ that keeps a fraction ``density`` of the rows (token mode) or entries (element mode):
    the midpoint between the last kept and the first dropped magnitude, over every rank's rows."""
    if density >= 1.0:
        return 0.0
    mag = delta.abs().amax(dim=1) if mode == "token" else delta.abs().flatten()
    if ranks is not None:
        mag = ranks.gather(mag)  # in the set's order (contiguous shares): the same sample below
    if mag.numel() > 1 << 21:  # element mode on big layers: a fixed random sample is plenty
        g = torch.Generator(device="cpu").manual_seed(0)
        mag = mag[torch.randint(mag.numel(), (1 << 21,), generator=g).to(mag.device)]
    mag = mag.float().sort(descending=True).values
    keep = int(round(density * mag.numel()))
    if keep <= 0:
        return float(mag[0]) * (1 + 1e-6) + 1e-30  # above the largest: nothing survives
    if keep >= mag.numel():
        return 0.0
    return float(mag[keep - 1] + mag[keep]) / 2


# --- calibration --------------------------------------------------------------------------------

MetricFn = Callable[[str, torch.Tensor], float]


def _task_metric(task: str, output: torch.Tensor, target: torch.Tensor, dataset: str) -> float:
    """A task's own validation metric (mtshare.tasks), signed so that higher is better."""
    from mtshare.tasks import get_task

    spec = get_task(task)
    meter = spec.new_meter(dataset)
    meter.update(output.float().cpu(), target.cpu())
    value = float(meter.compute())
    return value if spec.higher_is_better else -value


def calibrate(engine: SharedEngine, images: torch.Tensor,
              targets_or_metric_fn: Mapping[str, torch.Tensor] | MetricFn, tolerance: float = 0.005,
              *, dataset: str = "pascal_context", steps: int = 10, per_layer: bool = False,
              ranks: Ranks | None = None, progress: Progress | None = None) -> dict[str, dict]:
    """Pick per-layer τ so that each sub-task's metric stays within ``tolerance`` (relative) of
    its τ = 0 value on ``images``; sets ``engine.thresholds`` and returns a summary per task.

    ``targets_or_metric_fn``: ``{task: target}`` (the task's own meter from ``mtshare.tasks`` on
    ``dataset``) or ``fn(task, output) -> float`` with higher = better.

    Method: one knob per task, the surviving activation density ρ. For a given ρ every layer's
    τ is set, in one pass, so that a fraction ρ of its delta (rows in token mode) survives
    (:meth:`SharedEngine.fit_thresholds`: τ adapts to each layer's scale). ρ = 1 is τ = 0 (exact).
    A bisection on ρ (all tasks at once: a sub-task's output depends only on its own τ) finds
    the smallest ρ whose metric is no worse than ``m0 − tolerance·|m0|``; the last feasible
    thresholds are kept, so the returned metric is a measured, feasible one.

    ``per_layer``: then, layer by layer (largest first, deeper first among equals), try a lower
    density for that layer alone (0, ρ/4, ρ/2: the first feasible one stays), since layers differ
    in how much their skipped rows cost the metric. Up to 3 passes per sparse layer.

    Sharded (``ranks``): ``images`` is this rank's contiguous share and every rank calls this
    together; τ are fitted on the whole set (:meth:`SharedEngine.fit_thresholds`) and the metric
    function must return the metric pooled over every rank (so every rank bisects alike).
    ``progress("calibrate", pass, passes)`` after each pass.
    """
    if callable(targets_or_metric_fn):
        metric = targets_or_metric_fn
    else:
        targets = targets_or_metric_fn
        metric = lambda task, out: _task_metric(task, out, targets[task], dataset)  # noqa: E731
    subs = list(engine.subtasks)
    for t in subs:
        engine.thresholds[t] = {}
    passes = 1 + steps
    report = progress or (lambda *_: None)
    ref_out = engine(images)
    m0 = {t: metric(t, ref_out[t]) for t in subs}
    done = 1
    report("calibrate", done, passes)
    lo = {t: 0.0 for t in subs}
    hi = {t: 1.0 for t in subs}
    best = {t: ({}, m0[t]) for t in subs}

    def feasible(t, m):
        return math.isfinite(m) and m >= m0[t] - tolerance * abs(m0[t])

    active = [t for t in subs if math.isfinite(m0[t])]
    for _ in range(steps):
        if not active:
            break
        mid = {t: (lo[t] + hi[t]) / 2 for t in active}
        out = engine.fit_thresholds(images, mid, ranks)
        for t in active:
            m = metric(t, out[t])
            if feasible(t, m):
                hi[t] = mid[t]
                best[t] = (dict(engine.thresholds[t]), m)
            else:
                lo[t] = mid[t]
        done += 1
        report("calibrate", done, passes)
    layer_density = {t: {"*": hi[t]} for t in subs}
    if per_layer:
        for t in active:
            order = sorted(best[t][0], key=lambda n: (-engine.base[f"{n}.weight"].numel(), -int(n.split(".")[1])))
            passes += 3 * len(order)  # at most
            for name in order:
                for cand in (0.0, hi[t] / 4, hi[t] / 2):
                    trial = {**layer_density[t], name: cand}
                    m = metric(t, engine.fit_thresholds(images, {t: trial}, ranks)[t])
                    done += 1
                    report("calibrate", done, passes)
                    if feasible(t, m):
                        layer_density[t] = trial
                        best[t] = (dict(engine.thresholds[t]), m)
                        break
    summary = {}
    for t in subs:
        engine.thresholds[t] = best[t][0]
        summary[t] = {"density": hi[t], "layer_density": layer_density[t], "metric_ref": m0[t],
                      "metric": best[t][1], "thresholds": best[t][0]}
    return summary
