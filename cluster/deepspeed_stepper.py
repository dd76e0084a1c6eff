"""DeepSpeed behind the training loop's ``Stepper`` interface (``mtshare.train.Stepper``).

``mtshare`` knows nothing of DeepSpeed: the stage runner passes :func:`make_wrap` as the
Trainer's ``wrap``; the Trainer's AdamW (with its δ / α / dense parameter groups) becomes the
DeepSpeed client optimizer, and the engine does backward, gradient reduction (ZeRO 0–2),
clipping and the optimiser step.

Precision: the engine keeps fp32 weights; on GPU the Trainer runs bf16 through
``torch.autocast`` (``autocast = True``), as it does without DeepSpeed. DeepSpeed's own
``bf16`` mode would cast the module to bf16 and expect bf16 inputs, and the step3 penalty
compares against base activations computed outside the engine: one autocast region keeps
both sides in the same precision. On CPU the suite runs fp32 (DESIGN: no fp16 on CPU).
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def load_ds_config(path: str | Path) -> dict:
    """Read a DeepSpeed JSON (``configs/deepspeed/zero*.json``); errors name the file."""
    from mtshare.config import ConfigError, read_mapping

    cfg = read_mapping(path, "JSON", field="deepspeed")
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise ConfigError(f"deepspeed: {path}: zero_optimization.stage {stage!r} is not supported (0, 1 or 2)")
    return cfg


def stage_ds_config(base: dict, batch_size: int, grad_clip: float | None) -> dict:
    """The per-stage DeepSpeed config: the suite's JSON plus what the stage decides (micro batch,
    clipping). fp16/bf16 engine modes stay off (see the module docstring)."""
    cfg = copy.deepcopy(base)
    cfg["train_micro_batch_size_per_gpu"] = batch_size
    cfg["gradient_accumulation_steps"] = 1
    cfg.pop("train_batch_size", None)  # derived by DeepSpeed: micro batch x accumulation x world
    cfg["gradient_clipping"] = float(grad_clip) if grad_clip else 0.0
    cfg.setdefault("steps_per_print", 10**9)
    for key in ("fp16", "bf16"):
        if cfg.get(key, {}).get("enabled"):
            log.warning("deepspeed: ignoring %s.enabled (the trainer autocasts bf16 itself)", key)
        cfg[key] = {"enabled": False}
    return cfg


def skip_cpu_shm_build() -> None:
    """DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce op (~30 s) when it
    creates its comm backend. Training never uses it (only ``inference_all_reduce`` does), so
    mark it incompatible: DeepSpeed then falls back to torch.distributed (gloo). DeepSpeed caches
    this dict in the module on purpose so that edits persist."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


@contextlib.contextmanager
def _broadcast_scalars_ourselves(model: torch.nn.Module):
    """DeepSpeed 0.19 broadcasts every parameter from rank 0 at init as ``p.data.view(uint8)``,
    which raises for 0-dim tensors (the per-tensor gate logit ``log_alpha_tensor`` is one).
    It skips parameters flagged ``ds_optim_param`` (its own sharded LoRA weights; the flag has
    no other effect without LoRA modules), so during ``deepspeed.initialize`` the scalars wear
    that flag and are broadcast here with plain torch.distributed instead. Reshaping them to
    [1] would not do: ZeRO's gradient hooks would remember the wrong shape."""
    scalars = [p for p in model.parameters() if p.dim() == 0]
    if dist.is_initialized() and dist.get_world_size() > 1:
        for p in scalars:
            dist.broadcast(p.data, src=0)
    for p in scalars:
        p.ds_optim_param = True
    try:
        yield
    finally:
        for p in scalars:
            del p.ds_optim_param


class DeepSpeedStepper:
    """``Stepper`` backed by a DeepSpeed engine. ``module_for_forward`` is the engine."""

    autocast = True

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict):
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        skip_cpu_shm_build()
        self.zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
        # Without ZeRO, DeepSpeed clips with an in-place multiply by a [1]-shaped factor, which
        # fails on 0-dim gradients (the gate logits): clip here instead, after DeepSpeed's
        # all-reduce (in backward) and before its optimiser step.
        self._clip = None
        if self.zero_stage == 0 and ds_config.get("gradient_clipping"):
            self._clip = float(ds_config["gradient_clipping"])
            ds_config = {**ds_config, "gradient_clipping": 0.0}
        with _broadcast_scalars_ourselves(model):
            self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        self.module_for_forward = self.engine

    @property
    def param_groups(self) -> list[dict]:
        # ZeRO keeps the client groups' keys (lr, base_lr, name), so the Trainer's LR schedule
        # works unchanged.
        return self.optimizer.param_groups

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> float:
        if self._clip is not None:
            params = [p for p in self.engine.module.parameters() if p.grad is not None]
            norm = float(torch.nn.utils.clip_grad_norm_(params, self._clip))
            self.engine.step()
            return norm
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else math.nan

    def save_state(self, directory: Path) -> None:
        """DeepSpeed's own checkpoint, into ``directory/deepspeed``: every rank writes its ZeRO
        shard (``zero_pp_rank_<r>_*``) and rank 0 the module states. Collective. Each rank's
        files stay on its node until Ray Train uploads them into one checkpoint directory."""
        self.engine.save_checkpoint(str(directory), tag=DS_TAG, save_latest=False)

    def load_state(self, directory: Path) -> None:
        """Load what :meth:`save_state` wrote (files read with ``torch.load(weights_only=True)``).

        ZeRO partitions the moments by world size, and DeepSpeed loads them only into the same
        world size (another one needs its offline universal-checkpoint conversion, which expects
        Megatron-style metadata and unpickles everything). So a resume with another worker count
        restores the weights and counters (the Trainer did) and starts the moments fresh."""
        ds_dir = directory / DS_TAG
        world = dist.get_world_size() if dist.is_initialized() else 1
        if not ds_dir.is_dir():
            log.warning("resume: %s holds no DeepSpeed state; optimizer moments start fresh", directory)
            self._refresh_master_weights()
            return
        shards = len(list(ds_dir.glob("zero_pp_rank_*_optim_states.pt")))
        same_layout = not self.zero_stage or shards == world
        if not same_layout:
            log.warning("resume: %s was saved by %d worker(s), this run has %d: weights restored, "
                        "optimizer moments start fresh", directory, shards, world)
        self.engine.checkpoint_engine = _WeightsOnlyCheckpointEngine(self.engine.checkpoint_engine)
        path, _ = self.engine.load_checkpoint(str(directory), tag=DS_TAG, load_module_strict=True,
                                              load_optimizer_states=same_layout, load_lr_scheduler_states=False,
                                              load_module_only=not same_layout)
        if path is None:
            raise RuntimeError(f"{directory}: DeepSpeed found no checkpoint to load")
        if not same_layout:
            self._refresh_master_weights()

    def _refresh_master_weights(self) -> None:
        # ZeRO's fp32 master partitions are a copy of the weights the Trainer just loaded; they
        # would overwrite them at the next step unless refreshed.
        refresh = getattr(self.optimizer, "refresh_fp32_params", None)
        if refresh is not None:
            refresh()


DS_TAG = "deepspeed"


class _WeightsOnlyCheckpointEngine:
    """DeepSpeed's torch checkpoint engine, but loading with ``weights_only=True`` (our rule for
    every file read back: no pickled code). A ZeRO shard holds three DeepSpeed classes beside
    tensors and plain containers; they are allow-listed for the load and nothing else is."""

    def __init__(self, inner):
        self._inner = inner

    def load(self, path: str, map_location=None):
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
            return torch.load(path, map_location=map_location, weights_only=True)

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


def make_wrap(ds_config: dict, batch_size: int):
    """A Trainer ``wrap`` callable: ``wrap(model, optimizer, grad_clip) -> DeepSpeedStepper``."""

    def wrap(model: torch.nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float | None) -> Any:
        return DeepSpeedStepper(model, optimizer, stage_ds_config(ds_config, batch_size, grad_clip))

    return wrap
