"""One training loop for every stage (base, step0, step1, step2, step3).

A :class:`StageSpec` says what differs between stages:

    kind    loads                       trains                   extra loss
    base    (pretrained encoder)        encoder + head           -
    step0   (pretrained encoder)        encoder + head           -
    step1   base                        δ, gate α, head          λ · L0(α)  (λ fixed, or steered to a sparsity)
    step2   base + step1 output         δ on its mask, head      -
    step3   base + step2 output         δ on its mask, head      activation penalty (rows, or the reference's L1)

A sub-task's last sharing step also calibrates its operating point (``mtshare.operating_point``).
Every evaluation — in training and at the end of the stage — runs on every rank over its own
contiguous share of the split, meter states pooled (``mtshare.evaluation.Ranks``): no rank waits
in a collective for another rank's serial work.

The loop runs on CPU or CUDA, fp32 or bf16, single process or under ``torch.distributed``.
It knows nothing of Ray or DeepSpeed: a caller that wants DeepSpeed passes a ``wrap``
function returning a :class:`Stepper` (backward / step / save and load its state), see
``cluster/stage_runner.py``; a caller that keeps resume states elsewhere (Ray Train) passes
``on_checkpoint`` and ``resume_dir``. Style: torchtitan's Trainer — ``__init__`` builds everything,
``train_step`` does one optimiser step, ``train`` loops (step → log → checkpoint → evaluate).
"""
from __future__ import annotations

import json
import math
import random
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Subset

from mtshare import checkpoint as ckpt
from mtshare import flops
from mtshare import operating_point as op
from mtshare.data import ClipDataset, build_dataset, sequences
from mtshare.engine import SharedEngine, SparsePolicy
from mtshare.evaluation import Progress, Ranks
from mtshare.models import DenseTaskModel, build_model, load_pretrained
from mtshare.models.delta import (
    ActivationRecorder, add_deltas, base_mode, close_smallest, delta_sparsity, effective_deltas, gate_sparsity,
    l0_penalty, set_mode,
)
from mtshare.models.vit import ViTEncoder
from mtshare.stages import StageSpec
from mtshare.tasks import get_task

RESUME_DIR = "resume"          # <out_dir>/resume/: the latest mid-stage resume state
TRAINER_STATE = "trainer.pt"   # in a resume directory: weights, counters, history (rank 0)
BEST_FILE = "best.safetensors"


class StageFailure(RuntimeError):
    """A stage cannot go on (non-finite loss, ...); the message names task, step and iteration."""


def lr_factor(it: int, total: int, schedule: str, power: float = 0.9, warmup: int = 0) -> float:
    """LR multiplier at iteration ``it`` (0-based) of ``total``: linear warmup, then poly,
    cosine or constant. Always in [0, 1]: progress is clamped, so it cannot overflow."""
    if warmup and it < warmup:
        return (it + 1) / warmup
    progress = min(max((it - warmup) / max(total - warmup, 1), 0.0), 1.0)
    if schedule == "poly":
        return (1.0 - progress) ** power
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def is_better(metric: float, best: float | None, higher_is_better: bool) -> bool:
    """NaN (an undefined metric, e.g. no positives in val) is never better than anything."""
    if math.isnan(metric):
        return False
    if best is None or math.isnan(best):
        return True
    return metric > best if higher_is_better else metric < best


# The engine thresholds the token rows of these linears' inputs (norm1 out, attention out,
# norm2 out, GELU out): the row penalty acts on exactly these.
LINEAR_INPUTS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")

# step1 controller (target_weight_sparsity): λ multiplies the *mean* expected L0 (so one value
# means the same on every model size). Below the target it grows by exp(RATE) per step; at or
# above the target λ is 0: under Adam any λ > 0 keeps closing gates whose task
# gradient is weak, so a merely smaller λ would not stop the sparsity from running past it.
L0_WEIGHT_INIT = 1.0
L0_WEIGHT_RATE = 0.05
L0_WEIGHT_RANGE = (0.1, 1e3)  # restart value after a pause, and a ceiling
# Adam's momentum carries falling gate logits on for ~1/(1 − β1) steps after λ drops, and many
# logits cross 0 together: the controller acts on the deterministic-gate sparsity extrapolated
# this many steps ahead at its current rate of increase.
L0_LOOKAHEAD = 5


def activation_l1(sub: list[torch.Tensor], base: list[torch.Tensor]) -> torch.Tensor:
    """Σ |a_s − a_b| over the recorded activation points (the reference's step3 penalty, before c)."""
    return sum((s.float() - b.float()).abs().sum() for s, b in zip(sub, base, strict=True))


def activation_rows(sub: list[torch.Tensor], base: list[torch.Tensor]) -> torch.Tensor:
    """Group lasso on token rows, normalised: per recorded linear input, the mean over tokens of
    ‖x_s − x_b‖₂ divided by the mean ‖x_b‖₂ of the base's rows, averaged over the linears.
    Scale-free (batch, tokens, width and depth drop out), so its weight means the same on every
    model; a row whose delta reaches zero is a row the engine skips."""
    terms = []
    for s, b in zip(sub, base, strict=True):
        b = b.float()
        diff = (s.float() - b).flatten(0, -2)
        scale = b.flatten(0, -2).norm(dim=1).mean().clamp_min(1e-6)
        terms.append(diff.norm(dim=1).mean() / scale)
    return torch.stack(terms).mean()


def temporal_rows(sub: list[torch.Tensor], base: list[torch.Tensor]) -> torch.Tensor:
    """The temporal group lasso: the recorded inputs of a batch of 2-frame clips (frames
    interleaved: clip 0 frame 0, clip 0 frame 1, …), per linear the mean over tokens of
    ‖x_s,t − x_s,t−1‖₂ divided by the mean ‖x_b‖₂ of the base's rows, averaged over the linears
    (``activation_rows``' normalisation). A row that does not change is a row a stream keeps
    from its cache."""
    terms = []
    for s, b in zip(sub, base, strict=True):
        s = s.float().unflatten(0, (-1, 2))
        diff = (s[:, 1] - s[:, 0]).flatten(0, -2)
        scale = b.float().flatten(0, -2).norm(dim=1).mean().clamp_min(1e-6)
        terms.append(diff.norm(dim=1).mean() / scale)
    return torch.stack(terms).mean()


def next_l0_weight(weight: float, sparsity: float, target: float) -> float:
    """λ for the constraint sparsity ≥ target, kept ≥ 0 (a projected dual ascent in log space):
    ×exp(RATE) per step while below (restarting from the range's floor after a pause), 0 once
    the target is met."""
    if sparsity >= target:
        return 0.0
    lo, hi = L0_WEIGHT_RANGE
    return min(hi, max(lo, weight) * math.exp(L0_WEIGHT_RATE))


class Stepper:
    """Plain PyTorch optimiser step: backward, clip the trained tensors' norm, step, zero."""

    autocast = True  # the loop runs bf16 through torch.autocast

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float | None):
        self.model, self.optimizer, self.grad_clip = model, optimizer, grad_clip

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip if self.grad_clip else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def save_state(self, directory: Path) -> None:
        """Write the optimiser state into a resume directory (single process: no shards)."""
        ckpt.save_train_state(directory / "optimizer.pt", self.optimizer.state_dict())

    def load_state(self, directory: Path) -> None:
        self.optimizer.load_state_dict(ckpt.load_train_state(directory / "optimizer.pt"))


def build_stage_model(spec: StageSpec, base_path: Path | None, base_sha256: str | None,
                      prev_path: Path | None) -> tuple[DenseTaskModel, dict]:
    """The model a stage trains, with its inputs loaded strictly. Returns (model, deltas)."""
    task = get_task(spec.task)
    out_ch = task.out_channels(spec.dataset.name)
    model = build_model(spec.model.flavor, spec.model.patch_size, spec.task, out_ch)
    if spec.kind in ("base", "step0"):
        if spec.model.pretrained:
            load_pretrained(model.encoder, spec.model.pretrained)
        return model, {}
    # Sub-task steps: frozen base encoder + deltas. The head starts fresh in step1.
    enc_sd, _, manifest = ckpt.load_dense(base_path, expected_sha256=base_sha256)
    if manifest.get("kind") != "base":
        raise ckpt.CheckpointError(f"{base_path}: not a base checkpoint")
    ckpt.check_keys(base_path, set(enc_sd), set(model.encoder.state_dict()), "encoder")
    model.encoder.load_state_dict(enc_sd, strict=True)
    deltas = add_deltas(model.encoder, structure=spec.optim.delta_gates)
    if spec.kind in ("step2", "step3"):
        sha = base_sha256 or ckpt.sha256_file(base_path)
        prev_deltas, head_sd, _ = ckpt.load_subtask(prev_path, base_sha256=sha)
        ckpt.check_keys(prev_path, set(prev_deltas), set(deltas), "deltas")
        with torch.no_grad():
            for name, d in deltas.items():
                d.delta.copy_(prev_deltas[name])
                d.mask.copy_((prev_deltas[name] != 0).to(d.mask.dtype))
        model.head.load_state_dict(head_sd, strict=True)
        set_mode(deltas, "mask")
        for d in deltas.values():  # the mask is fixed: gates do not train any more
            d.log_alpha.requires_grad_(False)
            d.log_alpha_tensor.requires_grad_(False)
    return model, deltas


def holdout_set(spec: StageSpec) -> Subset:
    """The last ``dataset.holdout`` images of the train split, with val transforms: no stage
    trains on them; they calibrate the operating points (so the val split stays unseen)."""
    d = spec.dataset
    train = build_dataset(d.name, d.root, "train", [spec.task], train=False, img_size=d.img_size)
    return Subset(train, list(range(len(train) - d.holdout, len(train))))


class Trainer:
    """Trains one stage. ``train()`` returns the stage result (metrics, sparsity, figures) and
    leaves ``model.safetensors`` (last), ``best.safetensors`` and ``result.json`` in ``out_dir``.

    Raises :class:`StageFailure` on a non-finite loss and ``CheckpointError`` on bad inputs.
    """

    def __init__(
        self,
        spec: StageSpec,
        out_dir: str | Path,
        base_path: str | Path | None = None,
        base_sha256: str | None = None,
        prev_path: str | Path | None = None,
        device: str | torch.device | None = None,
        wrap: Callable[[nn.Module, torch.optim.Optimizer, float | None], Any] | None = None,
        on_log: Callable[[dict, int], None] | None = None,
        on_checkpoint: Callable[[Path], None] | None = None,
        resume_dir: str | Path | None = None,
        on_progress: Progress | None = None,
    ):
        """``resume_dir``: a resume state to start from (default ``<out_dir>/resume`` when it
        exists). ``on_checkpoint(dir)``: called on every rank after each resume state is written
        to ``dir`` (the directory is reused: copy what you keep). ``on_progress(phase, done,
        total)``: rank 0's progress through the end-of-stage evaluations (its own share)."""
        self.spec = spec
        self.out_dir = Path(out_dir)
        self.device = torch.device(device or spec.device)
        self.ranks = Ranks(self.device)  # evaluations are sharded over the stage's ranks
        self.rank, self.world_size = self.ranks.rank, self.ranks.world_size
        self.is_rank_zero = self.rank == 0
        self.on_log = on_log if self.is_rank_zero else None
        self.on_progress = on_progress if self.is_rank_zero else None
        self.phase_seconds: dict[str, float] = {}  # end-of-stage evaluation phases (see _progress)
        self._phase: str | None = None
        self._phase_started = 0.0
        self.on_checkpoint = on_checkpoint
        self.resume_dir = Path(resume_dir) if resume_dir else self.out_dir / RESUME_DIR
        self.task = get_task(spec.task)
        self.base_path = Path(base_path) if base_path else None
        self.base_sha256 = base_sha256
        seed = spec.seed + 1000 * self.rank  # per-rank offset: different augmentation per worker
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)

        self.model, self.deltas = build_stage_model(spec, self.base_path, base_sha256, Path(prev_path) if prev_path else None)
        self.model.to(self.device)
        self.recorder = None
        if spec.kind == "step3":
            row = spec.optim.act_penalty == "row"
            self.recorder = ActivationRecorder(self.model.encoder, LINEAR_INPUTS if row else ViTEncoder.ACTIVATION_POINTS,
                                               inputs=row)
        self.l0_weight = L0_WEIGHT_INIT  # step1 with target_weight_sparsity: the controller's λ
        self.last_gate_sparsity: float | None = None
        self._setup_data()
        self._setup_optimizer(wrap)
        self.n_delta = sum(d.delta.numel() for d in self.deltas.values())
        self.closed_at_end = 0
        self.iteration = 0
        self.epoch = 0
        self.best: float | None = None
        self.history: list[dict] = []

    # --- setup ---------------------------------------------------------------------------
    def _setup_data(self) -> None:
        d = self.spec.dataset
        train_set = build_dataset(d.name, d.root, "train", [self.spec.task], train=True, img_size=d.img_size)
        val_set = build_dataset(d.name, d.root, "val", [self.spec.task], train=False, img_size=d.img_size)
        n_fit = len(train_set) - d.holdout
        if n_fit < self.spec.optim.batch_size * self.world_size:
            raise StageFailure(f"{self.spec.name}: {len(train_set)} training images minus dataset.holdout "
                               f"{d.holdout} < one global batch")
        self.holdout_set = holdout_set(self.spec)
        self.full_val_set = val_set
        if self.spec.calibration is not None and d.holdout < self.world_size:
            raise StageFailure(f"{self.spec.name}: dataset.holdout {d.holdout} < resources.workers "
                               f"{self.world_size}: every rank calibrates on its own share of the holdout")
        self.act_temporal = self._act_temporal(train_set)
        if self.act_temporal:  # 2-frame clips, as many frames per step as without
            train_set = ClipDataset(train_set, clip_len=2, indices=list(range(n_fit)))
            batch_size = max(1, self.spec.optim.batch_size // 2)
        else:
            train_set = Subset(train_set, list(range(n_fit)))
            batch_size = self.spec.optim.batch_size
        self.train_sampler = torch.utils.data.DistributedSampler(
            train_set, num_replicas=self.world_size, rank=self.rank, shuffle=True, seed=self.spec.seed, drop_last=True
        )
        self.train_loader = DataLoader(
            train_set, batch_size=batch_size, sampler=self.train_sampler, drop_last=True,
            num_workers=d.num_workers, persistent_workers=d.num_workers > 0,
        )
        # Validation: each rank takes a disjoint contiguous share (no padding duplicates), counts are pooled.
        self.val_loader = self._share_loader(val_set)

    def _share_loader(self, dataset) -> DataLoader:
        """This rank's contiguous share of ``dataset`` (``Ranks.share``), in batches."""
        return DataLoader(Subset(dataset, list(self.ranks.share(len(dataset)))), batch_size=self.spec.optim.batch_size,
                          num_workers=self.spec.dataset.num_workers)

    def _act_temporal(self, train_set) -> float:
        """Step3's temporal penalty weight: ``act_temporal``, or ``act_row`` when that is unset and
        the dataset holds frame sequences; 0 outside step3 and for the element penalty."""
        o = self.spec.optim
        if self.spec.kind != "step3" or o.act_penalty != "row":
            return 0.0
        if o.act_temporal is not None:
            return o.act_temporal
        return o.act_row if sequences(list(train_set.ids)) else 0.0

    def _setup_optimizer(self, wrap) -> None:
        o = self.spec.optim
        groups = self.model.param_groups()
        dense_lr = o.lr
        param_groups = [
            {"params": groups["dense"], "lr": dense_lr, "base_lr": dense_lr, "weight_decay": o.weight_decay, "name": "dense"},
            {"params": groups["delta"], "lr": o.lr_delta, "base_lr": o.lr_delta, "weight_decay": 0.0, "name": "delta"},
            {"params": groups["alpha"], "lr": o.lr_alpha, "base_lr": o.lr_alpha, "weight_decay": 0.0, "name": "alpha"},
        ]
        param_groups = [g for g in param_groups if g["params"]]
        optimizer = torch.optim.AdamW(param_groups, betas=(0.9, 0.999))
        self.stepper = (wrap or Stepper)(self.model, optimizer, o.grad_clip)
        self.forward_model = getattr(self.stepper, "module_for_forward", self.model)

    # --- one step --------------------------------------------------------------------------
    def _autocast(self):
        enabled = self.spec.precision == "bf16" and self.stepper.autocast
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def train_step(self, batch: dict) -> dict[str, float]:
        o = self.spec.optim
        x = batch["image"].to(self.device, non_blocking=True)
        target = batch[self.spec.task].to(self.device, non_blocking=True)
        clips = x.dim() == 5  # [B, T, 3, H, W] (step3's temporal term): frames interleaved per clip
        if clips:
            x, target = x.flatten(0, 1), target.flatten(0, 1)
        self.model.train()
        for g in self.stepper.param_groups:
            g["lr"] = g["base_lr"] * lr_factor(self.iteration, o.iters, o.schedule, o.poly_power, o.warmup_iters)
        logs: dict[str, float] = {}
        with self._autocast():
            if self.recorder is not None:
                with torch.no_grad(), base_mode(self.deltas), self.recorder.record() as base_acts:
                    self.model.encoder(x)
                with self.recorder.record(skip=(base_acts, self.train_row_density())) as sub_acts:
                    pred = self.forward_model(x)
            else:
                pred = self.forward_model(x)
            task_loss = self.task.loss(pred.float(), target) * self.task.loss_weight
            loss = task_loss
            if self.spec.kind == "step1" and o.target_weight_sparsity is not None:
                l0 = l0_penalty(self.deltas)
                loss = loss + self.l0_weight * l0 / self.n_delta
                logs.update(l0=l0.item(), l0_weight=self.l0_weight)
            elif self.spec.kind == "step1" and o.l0_lambda > 0:
                l0 = l0_penalty(self.deltas)
                loss = loss + o.l0_lambda * l0
                logs["l0"] = l0.item()
            if self.recorder is not None:
                if o.act_penalty == "row":
                    # relative to the task loss too: one act_row suits tasks whose losses differ
                    # in scale by 100x (normals' L1 vs edges' 50 x BCE)
                    act = activation_rows(sub_acts, base_acts)
                    loss = loss + o.act_row * task_loss.detach() * act
                    if clips:
                        temporal = temporal_rows(sub_acts, base_acts)
                        loss = loss + self.act_temporal * task_loss.detach() * temporal
                        logs["act_temporal"] = temporal.item()
                else:
                    act = activation_l1(sub_acts, base_acts)
                    loss = loss + o.act_l1 * act
                logs[f"act_{o.act_penalty}"] = act.item()
        if o.fail_at_iter is not None and self.iteration == o.fail_at_iter:
            loss = loss * float("nan")  # fault injection (config knob), see docs/reliability.md
        if not torch.isfinite(loss):
            raise StageFailure(
                f"task {self.spec.task}, {self.spec.kind}: loss is {loss.item()} at iteration {self.iteration}"
            )
        self.stepper.backward(loss)
        grad_norm = self.stepper.step()
        if self.spec.kind == "step1" and o.target_weight_sparsity is not None:
            sparsity = gate_sparsity(self.deltas)
            last = self.last_gate_sparsity
            rising = max(0.0, sparsity - last) if last is not None else 0.0
            self.last_gate_sparsity = sparsity
            self.l0_weight = next_l0_weight(self.l0_weight, sparsity + L0_LOOKAHEAD * rising, o.target_weight_sparsity)
            logs["gate_sparsity"] = sparsity
        self.iteration += 1
        logs.update(loss=loss.item(), task_loss=task_loss.item(), grad_norm=grad_norm,
                    lr=self.stepper.param_groups[0]["lr"])
        return logs

    def train_row_density(self) -> float:
        """Step3's row density now: ``train_row_density`` eased in linearly over the first half."""
        target = self.spec.optim.train_row_density
        if target is None:
            return 1.0
        ramp = min(1.0, self.iteration / max(1, self.spec.optim.iters // 2))
        return 1.0 - (1.0 - target) * ramp

    # --- evaluation --------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> float:
        """The task metric on the val split, pooled over all ranks (counts summed, not averaged)."""
        self.model.eval()
        options = {"n_thresholds": self.spec.optim.edge_thresholds} if self.spec.task == "edge" else {}
        meter = self.task.new_meter(self.spec.dataset.name, **options)
        for batch in self.val_loader:
            with self._autocast():
                pred = self.forward_model(batch["image"].to(self.device))
            meter.update(pred.float().cpu(), batch[self.spec.task])
        return float(self.ranks.merge(meter).compute())

    # --- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Weights and loop counters; the optimiser state is the stepper's (sharded under ZeRO)."""
        return {
            "iteration": self.iteration, "epoch": self.epoch, "best": self.best,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "history": self.history, "l0_weight": self.l0_weight, "last_gate_sparsity": self.last_gate_sparsity,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"], strict=True)
        self.iteration, self.epoch, self.best = state["iteration"], state["epoch"], state["best"]
        self.history = list(state.get("history", []))
        self.l0_weight = float(state.get("l0_weight", L0_WEIGHT_INIT))
        self.last_gate_sparsity = state.get("last_gate_sparsity")

    def _barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def save_resume(self) -> None:
        """Write the resume state (rank 0: weights and counters; every rank: its optimiser shard)
        into a fresh directory, which then replaces ``<out_dir>/resume``."""
        fresh = self.out_dir / f"{RESUME_DIR}.partial"
        if fresh.exists():
            shutil.rmtree(fresh)
        fresh.mkdir(parents=True)
        if self.is_rank_zero:
            ckpt.save_train_state(fresh / TRAINER_STATE, self.state_dict())
        self.stepper.save_state(fresh)  # collective under DeepSpeed
        final = self.out_dir / RESUME_DIR
        shutil.rmtree(final, ignore_errors=True)
        fresh.rename(final)
        self._barrier()
        if self.on_checkpoint is not None:
            self.on_checkpoint(final)

    def try_resume(self) -> bool:
        if not (self.resume_dir / TRAINER_STATE).exists():
            return False
        self.load_state_dict(ckpt.load_train_state(self.resume_dir / TRAINER_STATE))
        self.stepper.load_state(self.resume_dir)  # after the weights: ZeRO refreshes its fp32 copy
        return True

    def manifest(self) -> dict:
        return {"task": self.spec.task, "stage": self.spec.kind, "suite": self.spec.suite,
                "dataset": self.spec.dataset.name, "model": self.spec.model.model_dump(),
                "spec": self.spec.model_dump(mode="json"), "iteration": self.iteration}

    def save_model(self, path: Path, extra: dict | None = None) -> str | None:
        """Write the stage's compact checkpoint (rank 0 only); returns its sha256."""
        if not self.is_rank_zero:
            return None
        manifest = {**self.manifest(), **(extra or {})}
        head_sd = self.model.head.state_dict()
        if self.spec.kind in ("base", "step0"):
            kind = "base" if self.spec.kind == "base" else "dense"
            return ckpt.save_dense(path, self.model.encoder.state_dict(), head_sd, manifest, kind=kind)
        sha = self.base_sha256 or ckpt.sha256_file(self.base_path)
        return ckpt.save_subtask(path, effective_deltas(self.deltas), head_sd, manifest, base_sha256=sha)

    def _meter_options(self) -> dict:
        return op.meter_options(self.spec.task, self.spec.optim.edge_thresholds)

    @torch.no_grad()
    def figures(self) -> dict:
        """FLOPs per image, parameter counts and (sub-tasks) delta sparsities, for the report.

        A sub-task's last sharing step calibrates its operating point and measures it through
        the shared engine on the whole val split (``mtshare.operating_point``): ``flops`` is what
        the engine executes there and ``delta_activation_sparsity`` the FLOPs-weighted fraction
        of token rows it skips. Earlier steps are not served, so they claim no sharing of
        activations (``flops`` = dense, sparsity None)."""
        img = self.spec.dataset.img_size
        dense_model = build_model(self.spec.model.flavor, self.spec.model.patch_size, self.spec.task,
                                  self.task.out_channels(self.spec.dataset.name))
        dense = flops.dense_flops(dense_model, img)
        out = {"dense_flops": dense, "params_dense": flops.param_counts(dense_model)[1]}
        if not self.deltas:
            out = {**out, "flops": dense, "params_stored": out["params_dense"],
                   "delta_weight_sparsity": None, "delta_activation_sparsity": None}
            if self.spec.kind == "base" and self.spec.stream is not None:
                enc = self.model.encoder
                engine = SharedEngine(enc.cfg, self.spec.task, enc.state_dict(), self.model.head, {},
                                      device=self.device)
                out["stream"] = self._stream_point(engine)
            return out
        eff = effective_deltas(self.deltas)
        out.update(params_stored=flops.param_counts(self.model, flops.delta_nnz(eff))[0],
                   delta_weight_sparsity=delta_sparsity(self.deltas), closed_at_end=self.closed_at_end)
        cal = self.spec.calibration
        if cal is None:
            return {**out, "flops": dense, "delta_activation_sparsity": None}
        engine = SharedEngine.from_base_checkpoint(self.base_path, {self.spec.task: (eff, self.model.head)},
                                                   self.base_sha256, device=self.device,
                                                   policy=SparsePolicy.for_plan(cal.plan))
        # Every rank calibrates and evaluates its own share; the figures pool all shares.
        self._progress("calibrate", 0, cal.steps + 1)
        calib = op.stack(self._share_loader(self.holdout_set), self.spec.task)
        criterion = op.meter_options(self.spec.task, cal.edge_thresholds or self.spec.optim.edge_thresholds)
        point = op.operating_point(engine, self.spec.task, calib, self._share_loader(self.full_val_set),
                                   self.spec.dataset.name, cal.tolerance, cal.margin, cal.steps, self._meter_options(),
                                   cal.per_layer, self.ranks, self._progress, criterion)
        # stored with τ: which plan they were calibrated for, on which criterion
        point["calibration"].update(plan=cal.plan, meter_options=criterion)
        out = {**out, "flops": point["flops"], "delta_activation_sparsity": point["rows_skipped"],
               "operating_point": point}
        if self.spec.stream is not None:  # on top of the base's temporal τ (stored with the base)
            base_stream = ckpt.read_manifest(self.base_path).get("stream") or {}
            engine.temporal_thresholds = {engine.base_task: base_stream.get("tau") or {}}
            out["stream"] = self._stream_point(engine)
        return out

    def _stream_point(self, engine: SharedEngine) -> dict:
        """The task's video stream figures (``mtshare.operating_point.stream_point``): temporal τ
        on the holdout frames, measured on the whole val split, sequence by sequence."""
        s = self.spec.stream
        calib = op.sequence_clips(self.holdout_set, [self.spec.task])
        val = op.sequence_clips(self.full_val_set, [self.spec.task], self.ranks)
        if not calib or not self.ranks.sum_floats(len(val))[0]:  # (a rank may hold no clip, the split must)
            raise StageFailure(f"{self.spec.name}: stream: the dataset at {self.spec.dataset.root} has no frame "
                               f"sequences (ids <sequence>/<frame>; `data synth --sequences`)")
        self._progress("stream_calibrate", 0, s.steps)
        return op.stream_point(engine, self.spec.task, calib, val, self.spec.dataset.name, s.keyframe_every,
                               s.split_layer, s.tolerance, s.margin, s.steps, self._meter_options(), self.ranks,
                               self._progress)

    def _progress(self, phase: str, done: int, total: int) -> None:
        """Time each end-of-stage phase (``phase_seconds``: from its first report to the next
        phase's, for the result and the stage's MLflow run) and pass rank 0's progress on."""
        if phase != self._phase:
            self._end_phase()
            self._phase, self._phase_started = phase, time.time()
        if self.on_progress is not None:
            self.on_progress(phase, done, total)

    def _end_phase(self) -> None:
        if self._phase is not None:
            self.phase_seconds[self._phase] = self.phase_seconds.get(self._phase, 0.0) + time.time() - self._phase_started
            self._phase = None

    # --- the loop -------------------------------------------------------------------------
    def train(self) -> dict:
        o = self.spec.optim
        self.out_dir.mkdir(parents=True, exist_ok=True)
        resumed_from = self.iteration if self.try_resume() else None
        if resumed_from is not None and self.on_log:
            self.on_log({"resumed_from": float(self.iteration)}, self.iteration)
        t0 = time.time()
        metric = None
        while self.iteration < o.iters:
            self.train_sampler.set_epoch(self.epoch)
            for batch in self.train_loader:
                logs = self.train_step(batch)
                it = self.iteration
                if self.on_log and (it % o.log_every == 0 or it == o.iters):
                    if self.spec.kind == "step1":
                        logs["delta_sparsity"] = delta_sparsity(self.deltas)
                    self.on_log(logs, it)
                if it % o.eval_every == 0 or it == o.iters:
                    metric = self.evaluate()
                    self.history.append({"iteration": it, self.task.metric: metric})
                    if self.on_log:
                        self.on_log({f"val_{self.task.metric}": metric}, it)
                    better = is_better(metric, self.best, self.task.higher_is_better)
                    if better:
                        self.best = metric
                        self.save_model(self.out_dir / BEST_FILE, {"metric": metric})
                if it % o.ckpt_every == 0 and it < o.iters:
                    self.save_resume()
                if it >= o.iters:
                    break
            self.epoch += 1
        target = o.target_weight_sparsity if self.spec.kind == "step1" else None
        if target is not None:  # the controller steers; a shortfall left at the end is closed here
            self.closed_at_end = close_smallest(self.deltas, target)
            if self.closed_at_end:
                metric = None
        if metric is None:  # resumed exactly at the end, or the model changed since the last evaluation
            metric = self.evaluate()
        result = {
            "stage": self.spec.name, "task": self.spec.task, "kind": self.spec.kind,
            "metric_name": self.task.metric, "higher_is_better": self.task.higher_is_better,
            "metric": metric, "best_metric": self.best, "iterations": self.iteration,
            "resumed_from": resumed_from, "train_seconds": time.time() - t0,
            # `metric`'s evaluation: val shared by the stage's ranks, meter states pooled
            "eval": {"ranks": self.world_size, "images_per_rank": self.ranks.sizes(len(self.full_val_set))},
        }
        t_figures = time.time()
        result.update(self.figures())  # every rank: its share of each evaluation, figures pooled
        self._end_phase()
        result["phase_seconds"] = {**self.phase_seconds, "figures": time.time() - t_figures}
        if self.on_log:
            self.on_log({f"time_{k}_s": v for k, v in result["phase_seconds"].items()}, self.iteration)
        sha = self.save_model(self.out_dir / "model.safetensors",
                              {"metric": metric, "result": result, "operating_point": result.get("operating_point"),
                               "stream": result.get("stream")})
        result["checksum"] = self.ranks.broadcast_object(sha)  # every rank chains the next step from it
        if self.is_rank_zero:
            ckpt.atomic_write_bytes(self.out_dir / "result.json", json.dumps(result, indent=1).encode())
            shutil.rmtree(self.out_dir / RESUME_DIR, ignore_errors=True)  # finished: the output supersedes it
        self._barrier()
        return result
