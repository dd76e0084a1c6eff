"""Evaluation sharded across the ranks of a process group, with figures equal to one process's.

Every rank of a stage evaluates a disjoint, contiguous share of a split (:meth:`Ranks.share`)
through the same engine; meter states are sums (``mtshare.metrics``), so all-reducing them
pools the split exactly, and every rank then computes the same figure. Counts are pooled,
never per-rank figures averaged (detectron2's evaluators, torchmetrics' sum-reduced states).

Shares are contiguous (rank 0 the first images, rank 1 the next, ...) so that anything
gathered in rank order is in the split's order: a quantile or a sample taken over the gathered
values is the one a single process takes. Outside ``torch.distributed`` (or with one rank)
every operation is the identity: the same code serves one process.

Pure PyTorch (``torch.distributed``): the collectives run on the default process group, which
Ray Train (or ``torchrun``) has set up; NCCL needs its tensors on the rank's CUDA device.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist

# (phase, done, total): progress of a long evaluation on this rank, e.g. ("val", 120, 1277)
Progress = Callable[[str, int, int], None]


class Ranks:
    """The ranks an evaluation is sharded over: the default process group, or one process."""

    def __init__(self, device: torch.device | str | None = None):
        self.distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        # NCCL reduces CUDA tensors only (on the rank's device); gloo CPU ones
        nccl = self.distributed and dist.get_backend() == "nccl"
        self.device = torch.device(device or "cuda") if nccl else torch.device("cpu")

    @classmethod
    def single(cls) -> "Ranks":
        """One process, whatever process group exists (an evaluation that is not sharded)."""
        ranks = cls.__new__(cls)
        ranks.distributed, ranks.rank, ranks.world_size, ranks.device = False, 0, 1, torch.device("cpu")
        return ranks

    def __repr__(self) -> str:
        return f"Ranks(rank={self.rank}, world_size={self.world_size})"

    # --- shares -----------------------------------------------------------------------------
    def bounds(self, n: int, rank: int | None = None) -> tuple[int, int]:
        """``[start, stop)`` of ``rank``'s share of ``n`` items: contiguous, sizes differing by at
        most one (the first ``n % world_size`` ranks take one more)."""
        rank = self.rank if rank is None else rank
        q, r = divmod(n, self.world_size)
        start = rank * q + min(rank, r)
        return start, start + q + (rank < r)

    def share(self, n: int) -> range:
        """This rank's item indices of ``n``."""
        return range(*self.bounds(n))

    def sizes(self, n: int) -> list[int]:
        """Every rank's share size, in rank order (they sum to ``n``)."""
        return [b - a for a, b in (self.bounds(n, r) for r in range(self.world_size))]

    # --- collectives ------------------------------------------------------------------------
    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum over ranks (a new CPU tensor of the same dtype)."""
        if not self.distributed:
            return tensor.detach().cpu().clone()
        t = tensor.detach().to(self.device).clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.cpu()

    def sum_floats(self, *values: float) -> list[float]:
        """Scalars summed over ranks (float64: counts and FLOPs stay exact far beyond 2**24)."""
        return self.sum(torch.tensor(values, dtype=torch.float64)).tolist()

    def merge(self, meter):
        """``meter`` with its state summed over ranks (the pooled meter of the whole split)."""
        if self.distributed:
            meter.load_state({k: self.sum(v) for k, v in meter.state().items()})
        return meter

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's ``tensor`` (same shape but for dim 0) concatenated along dim 0 in rank
        order: with contiguous shares, the split's order."""
        if not self.distributed:
            return tensor
        counts = torch.zeros(self.world_size, dtype=torch.int64)
        counts[self.rank] = tensor.shape[0]
        counts = self.sum(counts)  # every rank's length
        width = int(counts.max())
        local = tensor.detach().to(self.device)
        padded = local.new_zeros((width, *local.shape[1:]))
        padded[:local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return torch.cat([p[:int(c)] for p, c in zip(parts, counts)]).to(tensor.device)

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's picklable ``obj``, in rank order."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
