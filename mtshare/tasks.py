"""Task registry: output channels, losses and evaluation meters of the six dense tasks.

``TASKS`` maps a task name to a frozen ``Task``. A task's ``loss`` is UNWEIGHTED (the
training loop multiplies by ``loss_weight``, the reference code's weights) and stays finite
and differentiable when every pixel of the batch is ignored (it is then 0, with a zero
gradient). Targets follow the data layer: integer maps with 255 = ignore, all-zero invalid
normals, depth 0 = invalid.

Datasets: ``pascal_context`` (semseg, human_parts, sal, normals, edge) and ``nyud``
(semseg, normals, edge, depth).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from mtshare.metrics import (
    IGNORE_INDEX,
    MaxFMeter,
    Meter,
    MIoUMeter,
    NormalsMeter,
    ODSFMeter,
    RMSEMeter,
)

__all__ = ["Task", "TASKS", "get_task", "DATASETS", "EDGE_MAX_DIST"]

DATASETS = ("pascal_context", "nyud")

# BSDS matching tolerance as a fraction of the image diagonal (ATRC / InvPT protocol).
EDGE_MAX_DIST = {"pascal_context": 0.0075, "nyud": 0.011}

EDGE_POS_WEIGHT = 0.95


def _masked_mean(loss_map: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of ``loss_map`` over ``valid``; 0 (still attached to the graph) if none is valid.

    ``torch.where`` rather than a product, so NaN/inf at invalid pixels cannot leak in.
    """
    total = torch.where(valid, loss_map, torch.zeros_like(loss_map)).sum()
    return total / valid.sum().clamp_min(1)


def _labels(target: torch.Tensor) -> torch.Tensor:
    """Integer label map [B,H,W] (accepts [B,1,H,W])."""
    return (target[:, 0] if target.dim() == 4 else target).long()


def cross_entropy_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Pixel-wise CE over valid pixels (semseg, human_parts)."""
    target = _labels(target)
    loss_map = F.cross_entropy(pred, target, ignore_index=IGNORE_INDEX, reduction="none")
    return _masked_mean(loss_map, target != IGNORE_INDEX)


def balanced_cross_entropy_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Class-balanced 2-class CE (saliency), as ATRC's BalancedCrossEntropyLoss.

    Per batch, w_pos = #negatives / #valid; class weights (1 − w_pos, w_pos) so the rarer
    class weighs more; the weighted sum is divided by #valid (not by the weight sum).
    """
    target = _labels(target)
    valid = target != IGNORE_INDEX
    n_valid = valid.sum().clamp_min(1)
    w_pos = ((target == 0) & valid).sum() / n_valid
    class_weight = torch.stack((1.0 - w_pos, w_pos)).to(pred.dtype)
    loss_map = F.cross_entropy(
        pred, target, weight=class_weight, ignore_index=IGNORE_INDEX, reduction="none"
    )
    return _masked_mean(loss_map, valid)


def balanced_bce_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Edge loss −(0.95·y·log p + 0.05·(1−y)·log(1−p)), p = sigmoid(logit), averaged over
    valid pixels (ATRC's BalancedBinaryCrossEntropyLoss with pos_weight 0.95)."""
    target = _labels(target)
    logit = pred[:, 0]
    y = (target == 1).to(logit.dtype)
    loss_map = -(
        EDGE_POS_WEIGHT * y * F.logsigmoid(logit)
        + (1.0 - EDGE_POS_WEIGHT) * (1.0 - y) * F.logsigmoid(-logit)
    )
    return _masked_mean(loss_map, target != IGNORE_INDEX)


def normals_l1_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 between the unit-normalised prediction and the target, over pixels with |target| > 0.

    Mean over valid pixels of the per-pixel L1 summed over the 3 components.
    """
    valid = target.norm(dim=1) > 0
    loss_map = (F.normalize(pred, dim=1) - target).abs().sum(dim=1)
    return _masked_mean(loss_map, valid)


def depth_l1_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 in metres over pixels with a finite target > 0."""
    target = target.reshape(pred.shape)  # [B,H,W] or [B,1,H,W]; never broadcast B against 1
    valid = (target > 0) & torch.isfinite(target)
    return _masked_mean((pred - target).abs(), valid)


@dataclass(frozen=True)
class Task:
    """One dense task: its metric, loss weight, channels per dataset, loss and meter."""

    name: str
    metric: str
    higher_is_better: bool
    loss_weight: float
    channels: Mapping[str, int] = field(compare=False, hash=False)  # dataset -> out channels
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = field(
        compare=False, hash=False, repr=False
    )
    meter_factory: Callable[..., Meter] = field(compare=False, hash=False, repr=False)

    def _check_dataset(self, dataset: str) -> None:
        if dataset not in self.channels:
            raise ValueError(
                f"task '{self.name}' is not defined on dataset '{dataset}' "
                f"(has: {', '.join(self.channels)})"
            )

    def out_channels(self, dataset: str) -> int:
        self._check_dataset(dataset)
        return self.channels[dataset]

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Unweighted scalar loss of raw output ``pred`` against the batched ``target``."""
        if pred.shape[0] != target.shape[0] or pred.shape[-2:] != target.shape[-2:]:
            raise ValueError(
                f"{self.name}: prediction {tuple(pred.shape)} and target "
                f"{tuple(target.shape)} differ in batch or spatial size"
            )
        return self.loss_fn(pred, target)

    def new_meter(self, dataset: str, **options) -> Meter:
        """A fresh meter for ``dataset``; ``options`` go to the meter's constructor (e.g.
        ``n_thresholds=9`` for a quick edge validation)."""
        self._check_dataset(dataset)
        return self.meter_factory(dataset, self.channels[dataset], **options)

    def __reduce__(self):
        # Pickle by name (Ray / multiprocessing): the registry entry is the task.
        return (get_task, (self.name,))


# Meter factories: (dataset, out_channels, **options) -> Meter.
def _miou_meter(dataset: str, channels: int, **options) -> Meter:
    return MIoUMeter(channels, **options)


def _maxf_meter(dataset: str, channels: int, **options) -> Meter:
    return MaxFMeter(**options)


def _normals_meter(dataset: str, channels: int, **options) -> Meter:
    return NormalsMeter(**options)


def _odsf_meter(dataset: str, channels: int, **options) -> Meter:
    return ODSFMeter(**{"max_dist": EDGE_MAX_DIST[dataset], **options})


def _rmse_meter(dataset: str, channels: int, **options) -> Meter:
    return RMSEMeter(**options)


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task(
            "semseg", "mIoU", True, 1.0, MappingProxyType({"pascal_context": 21, "nyud": 40}),
            cross_entropy_loss, _miou_meter,
        ),
        Task(
            "human_parts", "mIoU", True, 2.0, MappingProxyType({"pascal_context": 7}),
            cross_entropy_loss, _miou_meter,
        ),
        Task(
            "sal", "maxF", True, 5.0, MappingProxyType({"pascal_context": 2}),
            balanced_cross_entropy_loss, _maxf_meter,
        ),
        Task(
            "normals", "mErr", False, 1.0, MappingProxyType({"pascal_context": 3, "nyud": 3}),
            normals_l1_loss, _normals_meter,
        ),
        Task(
            "edge", "odsF", True, 50.0, MappingProxyType({"pascal_context": 1, "nyud": 1}),
            balanced_bce_loss, _odsf_meter,
        ),
        Task(
            "depth", "rmse", False, 1.0, MappingProxyType({"nyud": 1}),
            depth_l1_loss, _rmse_meter,
        ),
    )
}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task '{name}' (known: {', '.join(TASKS)})") from None
