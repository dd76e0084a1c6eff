"""DeepSpeed's own checkpoint behind the stepper, with real torch.distributed (gloo) processes:
every rank writes its ZeRO shard; the same worker count gets the weights and the Adam moments
back exactly (read with weights-only loads); another worker count (2 → 1) gets the weights
and starts the moments fresh (DeepSpeed cannot re-partition them online)."""
from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cluster.deepspeed_stepper import DeepSpeedStepper, stage_ds_config


class _Model(torch.nn.Module):
    """A linear layer, a frozen one, and a 0-dim parameter (like the per-tensor gate logits)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.frozen = torch.nn.Linear(6, 6).requires_grad_(False)
        self.head = torch.nn.Linear(6, 3)
        self.scale = torch.nn.Parameter(torch.tensor(0.5))

    def forward(self, x):
        return self.head(self.frozen(x)) * self.scale


def _stepper(zero: int) -> DeepSpeedStepper:
    model = _Model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return DeepSpeedStepper(model, opt, stage_ds_config({"zero_optimization": {"stage": zero}}, 4, 1.0))


def _train(stepper: DeepSpeedStepper, seed: int, steps: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)  # each rank its own batches, as in data parallel
    for _ in range(steps):
        stepper.backward(stepper.engine(torch.randn(4, 6, generator=g)).square().mean())
        stepper.step()


def _moments(stepper: DeepSpeedStepper) -> dict[str, torch.Tensor]:
    """exp_avg / exp_avg_sq of this rank, flattened in parameter order (ZeRO: its partition)."""
    inner = getattr(stepper.optimizer, "optimizer", stepper.optimizer)
    return {key: torch.cat([inner.state[p][key].reshape(-1) for g in inner.param_groups for p in g["params"]
                            if key in inner.state[p]] or [torch.zeros(0)])
            for key in ("exp_avg", "exp_avg_sq")}


def _weights(stepper: DeepSpeedStepper) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in stepper.engine.module.state_dict().items()}


def _init(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks_train_and_save(rank: int, port: int, zero: int, out: str) -> None:
    _init(rank, 2, port)
    stepper = _stepper(zero)
    _train(stepper, seed=100 + rank)
    stepper.save_state(Path(out))
    torch.save(_weights(stepper), Path(out) / f"weights-rank{rank}.pt")
    dist.destroy_process_group()


def _one_rank_round_trip(rank: int, port: int, zero: int, out: str) -> None:
    """Same world size (1 → 1): weights and moments come back exactly, and training goes on
    exactly as it would have without the interruption."""
    _init(0, 1, port)
    saved = _stepper(zero)
    _train(saved, seed=1)
    saved.save_state(Path(out))
    restored = _stepper(zero)
    restored.load_state(Path(out))
    for name, value in _weights(saved).items():
        assert torch.equal(_weights(restored)[name], value), name
    for key, value in _moments(saved).items():
        assert value.numel() and torch.equal(_moments(restored)[key], value), key
    _train(saved, seed=2, steps=1)
    _train(restored, seed=2, steps=1)
    for name, value in _weights(saved).items():
        assert torch.equal(_weights(restored)[name], value), name


def _one_rank_resumes_two(rank: int, port: int, zero: int, out: str) -> None:
    _init(0, 1, port)
    expected = torch.load(Path(out) / "weights-rank0.pt", weights_only=True)
    stepper = _stepper(zero)
    warnings: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("cluster.deepspeed_stepper").addHandler(handler)
    stepper.load_state(Path(out))
    got = _weights(stepper)
    for name, value in expected.items():
        assert torch.equal(got[name], value), name
    if zero:  # partitioned moments cannot follow the worker count: fresh, and said so
        assert any("moments start fresh" in w for w in warnings), warnings
        assert _moments(stepper)["exp_avg"].numel() == 0
    else:  # ZeRO-0 keeps the whole optimizer on rank 0: any worker count loads it
        assert not warnings and _moments(stepper)["exp_avg"].numel() > 0
    _train(stepper, seed=3, steps=1)  # and training goes on from there
    assert all(torch.isfinite(v).all() for v in _weights(stepper).values())


@pytest.mark.parametrize("zero", [0, 2])
def test_deepspeed_checkpoint_round_trip_then_another_worker_count(zero, tmp_path):
    # Each phase in fresh processes: DeepSpeed caches its process groups for the process's life.
    mp.spawn(_one_rank_round_trip, args=(_free_port(), zero, str(tmp_path / "one")), nprocs=1, join=True)
    # Two workers save one shard each (ZeRO) and rank 0 the module; one worker resumes from it.
    mp.spawn(_two_ranks_train_and_save, args=(_free_port(), zero, str(tmp_path / "two")), nprocs=2, join=True)
    files = sorted(p.name for p in (tmp_path / "two" / "deepspeed").iterdir())
    assert sum(f.startswith("zero_pp_rank_") for f in files) == (2 if zero else 0), files
    mp.spawn(_one_rank_resumes_two, args=(_free_port(), zero, str(tmp_path / "two")), nprocs=1, join=True)
