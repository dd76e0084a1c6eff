"""Evaluation meters for the six dense tasks, pooled over a whole split, plus Δm.

Every meter takes the RAW model output and applies its own activation exactly once
(softmax / sigmoid / argmax / normalisation); the reference code applied sigmoid twice to
saliency, which this layout makes impossible.

Distributed evaluation: a meter's ``state()`` is a dict of float64/int64 CPU tensors whose
element-wise SUM over workers is the pooled state of the split. Workers all-reduce-sum the
tensors and ``load_state`` the result (or one process ``merge``s the others' states), then
``compute()``. Averaging per-rank metrics, the reference code's fault, is never needed.

A metric that is undefined for what was seen (no valid pixel, no positive / edge pixel in
the ground truth, no class present) computes to NaN rather than to a made-up number.

Ignore label: 255 in every integer target. Invalid normals are all-zero vectors, invalid
depth is 0 (or non-finite).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

# ODS-F's matcher lives in a numpy-only module (its pool's processes do not import torch)
from mtshare.edge_match import _match_images, seeded_correspond_pixels, set_num_processes  # noqa: F401


IGNORE_INDEX = 255

__all__ = [
    "IGNORE_INDEX",
    "Meter",
    "MIoUMeter",
    "MaxFMeter",
    "NormalsMeter",
    "RMSEMeter",
    "ODSFMeter",
    "delta_m",
]


def _check_spatial(pred: torch.Tensor, target: torch.Tensor) -> None:
    if pred.shape[0] != target.shape[0] or pred.shape[-2:] != target.shape[-2:]:
        raise ValueError(
            f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in "
            "batch size or spatial size (predictions must be at target resolution)"
        )


def _squeeze_channel(target: torch.Tensor) -> torch.Tensor:
    """[B,1,H,W] -> [B,H,W]; [B,H,W] unchanged."""
    return target[:, 0] if target.dim() == 4 else target


class Meter:
    """Accumulator of additive statistics; subclasses define ``_empty_state``, ``update``
    and ``compute``."""

    def __init__(self) -> None:
        self._state = self._empty_state()

    def _empty_state(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        raise NotImplementedError

    def compute(self) -> float:
        raise NotImplementedError

    def state(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self._state.items()}

    def _checked(self, state: dict) -> dict[str, torch.Tensor]:
        """``state`` as CPU tensors of this meter's keys, dtypes and shapes, or ValueError."""
        if set(state) != set(self._state):
            raise ValueError(f"state keys {sorted(state)} != expected {sorted(self._state)}")
        out = {}
        for key, ref in self._state.items():
            value = torch.as_tensor(state[key]).detach().to("cpu", ref.dtype)
            if value.shape != ref.shape:
                raise ValueError(
                    f"state '{key}' has shape {tuple(value.shape)}, expected {tuple(ref.shape)}"
                )
            out[key] = value.clone()
        return out

    def load_state(self, state: dict) -> None:
        self._state = self._checked(state)

    def merge(self, other_state: dict) -> None:
        for key, value in self._checked(other_state).items():
            self._state[key] += value

    def reset(self) -> None:
        self._state = self._empty_state()


class MIoUMeter(Meter):
    """Mean intersection-over-union from a pooled confusion matrix (pred = argmax of logits).

    The mean runs over the classes whose union (GT pixels + predicted pixels, on valid
    pixels) is non-zero, the standard convention: a class absent from both the GT and the
    prediction of the whole split neither helps nor hurts.
    """

    def __init__(self, num_classes: int) -> None:
        self.num_classes = int(num_classes)
        super().__init__()

    def _empty_state(self):
        n = self.num_classes
        return {"confusion": torch.zeros(n, n, dtype=torch.int64)}  # rows GT, cols pred

    @torch.no_grad()
    def update(self, pred, target):
        _check_spatial(pred, target)
        if pred.shape[1] != self.num_classes:
            raise ValueError(f"expected {self.num_classes} channels, got {pred.shape[1]}")
        target = _squeeze_channel(target)
        label = pred.argmax(dim=1)
        valid = target != IGNORE_INDEX
        gt = target[valid].long()
        if gt.numel() and (gt.min() < 0 or gt.max() >= self.num_classes):
            raise ValueError(f"target labels outside 0..{self.num_classes - 1} and {IGNORE_INDEX}")
        n = self.num_classes
        counts = torch.bincount(gt * n + label[valid], minlength=n * n)
        self._state["confusion"] += counts.view(n, n).cpu()

    def per_class_iou(self) -> torch.Tensor:
        """IoU per class (float64); NaN for classes with an empty union."""
        cm = self._state["confusion"].double()
        inter = cm.diag()
        union = cm.sum(0) + cm.sum(1) - inter
        return torch.where(union > 0, inter / union.clamp_min(1), torch.full_like(inter, math.nan))

    def compute(self):
        iou = self.per_class_iou()
        present = ~iou.isnan()
        return float(iou[present].mean()) if present.any() else math.nan


class MaxFMeter(Meter):
    """Saliency max F-measure (β² = 0.3) over thresholds, from pooled histograms.

    prob = softmax(logits)[:, 1] of the 2-channel output. Each valid pixel's probability
    goes to one of ``n_bins`` equal bins, separately for GT positives and negatives.
    Threshold t_k = k / n_bins, k = 1 .. n_bins-1 (a pixel is predicted salient iff
    prob >= t_k), as ATRC's ``arange(step, 1, step)``; precision and recall per threshold
    come from the pooled counts, and the result is the max F.
    """

    def __init__(self, n_bins: int = 255, beta_sq: float = 0.3) -> None:
        if n_bins < 2:
            raise ValueError("n_bins must be >= 2")
        self.n_bins = int(n_bins)
        self.beta_sq = float(beta_sq)
        super().__init__()

    def _empty_state(self):
        return {
            "pos_hist": torch.zeros(self.n_bins, dtype=torch.int64),
            "neg_hist": torch.zeros(self.n_bins, dtype=torch.int64),
        }

    @torch.no_grad()
    def update(self, pred, target):
        _check_spatial(pred, target)
        target = _squeeze_channel(target)
        if pred.shape[1] != 2:
            raise ValueError(f"saliency output must have 2 channels, got {pred.shape[1]}")
        prob = torch.softmax(pred.float(), dim=1)[:, 1]
        valid = target != IGNORE_INDEX
        bins = (prob[valid] * self.n_bins).long().clamp_(0, self.n_bins - 1)
        positive = target[valid] == 1
        for key, sel in (("pos_hist", positive), ("neg_hist", ~positive)):
            self._state[key] += torch.bincount(bins[sel], minlength=self.n_bins).cpu()

    def f_scores(self) -> torch.Tensor:
        """F per threshold t_k = k / n_bins, k = 1 .. n_bins-1 (float64)."""
        # Pixels predicted positive at t_k are those in bins >= k: reverse cumulative sums.
        tp = self._state["pos_hist"].flip(0).cumsum(0).flip(0)[1:].double()
        fp = self._state["neg_hist"].flip(0).cumsum(0).flip(0)[1:].double()
        n_pos = self._state["pos_hist"].sum().double()
        precision = tp / (tp + fp).clamp_min(1)
        recall = tp / n_pos.clamp_min(1)
        denom = self.beta_sq * precision + recall
        return torch.where(
            denom > 0, (1 + self.beta_sq) * precision * recall / denom.clamp_min(1e-300), 0.0
        )

    def compute(self):
        if self._state["pos_hist"].sum() == 0:
            return math.nan  # recall undefined without salient GT pixels
        return float(self.f_scores().max())


class NormalsMeter(Meter):
    """Mean angular error in degrees over valid pixels (target norm > 0).

    Both prediction and target are normalised; the angle is 2·atan2(|p − g|, |p + g|), which
    stays accurate near 0° and 180° where acos of a dot product does not.
    """

    def _empty_state(self):
        return {
            "sum_deg": torch.zeros(1, dtype=torch.float64),
            "count": torch.zeros(1, dtype=torch.int64),
        }

    @torch.no_grad()
    def update(self, pred, target):
        _check_spatial(pred, target)
        if pred.shape[1] != 3 or target.shape[1] != 3:
            raise ValueError("normals prediction and target must have 3 channels")
        valid = target.norm(dim=1) > 0
        p = F.normalize(pred.double(), dim=1)
        g = F.normalize(target.double(), dim=1)
        angle = 2 * torch.atan2((p - g).norm(dim=1), (p + g).norm(dim=1))
        self._state["sum_deg"] += torch.rad2deg(angle[valid]).sum().cpu()
        self._state["count"] += int(valid.sum())

    def compute(self):
        count = int(self._state["count"])
        return float(self._state["sum_deg"]) / count if count else math.nan


class RMSEMeter(Meter):
    """Depth root-mean-square error over valid pixels (finite target > 0), pooled over all
    pixels of the split (not a mean of per-image RMSEs)."""

    def _empty_state(self):
        return {
            "sum_sq": torch.zeros(1, dtype=torch.float64),
            "count": torch.zeros(1, dtype=torch.int64),
        }

    @torch.no_grad()
    def update(self, pred, target):
        _check_spatial(pred, target)
        pred, target = _squeeze_channel(pred), _squeeze_channel(target)
        valid = (target > 0) & torch.isfinite(target)
        err = pred.double()[valid] - target.double()[valid]
        self._state["sum_sq"] += (err * err).sum().cpu()
        self._state["count"] += int(valid.sum())

    def compute(self):
        count = int(self._state["count"])
        return math.sqrt(float(self._state["sum_sq"]) / count) if count else math.nan


class ODSFMeter(Meter):
    """Edge ODS F-measure (optimal dataset scale), as the BSDS / SEISM benchmark.

    prob = sigmoid(logit). For each threshold t (default the 99 BSDS thresholds
    linspace(1/100, 99/100, 99)) the map prob >= t is binarised, thinned to one-pixel width
    (``pyEdgeEval.preprocess.binary_thin``, the port of MATLAB ``bwmorph(.., 'thin', inf)``
    that BSDS applies; no NMS) and matched to the GT edges with the BSDS C matcher
    ``pyEdgeEval._lib.correspond_pixels``, whose ``max_dist`` is a fraction of the image
    diagonal (0.0075 PASCAL-Context, 0.011 NYUD-v2). Per threshold the split pools
    matched / total predicted pixels and matched GT pixels; total GT pixels is one count.
    ODS-F = max over thresholds of F (β = 1) from the pooled counts.

    Ignore (255) pixels are set to 0 in both maps. The matcher builds a sparse random graph
    of outlier edges; BSDS seeds it from the clock, so a re-evaluation could differ by a few
    matched pixels (about 0.5 % F on a ~200-pixel map). We seed it before every match
    (:func:`seeded_correspond_pixels`): the same maps give the same F in every run.

    Cost: one thinning and one match per threshold and image (a threshold whose binary map
    equals the previous one reuses it); the match dominates and grows with the number of
    predicted pixels (measured on one CPU core: 1-5 s for a 512x512 map with 10k-40k
    pixels after thinning), so 99 thresholds of an unsharp map take up to a minute per image.
    Pass a smaller ``n_thresholds`` (e.g. 9) for in-training validation and keep the BSDS 99 for
    the reported number; :func:`set_num_processes` matches the (image, threshold) pieces of a
    batch in a process pool (a stage worker gives it its ``cpus_per_worker``), same figures.
    """

    def __init__(self, max_dist: float = 0.0075, n_thresholds: int = 99, thin: bool = True):
        if not max_dist > 0:
            raise ValueError("max_dist must be > 0 (a fraction of the image diagonal)")
        if n_thresholds < 1:
            raise ValueError("n_thresholds must be >= 1")
        self.max_dist = float(max_dist)
        self.thin = bool(thin)
        n = int(n_thresholds)
        self.thresholds = np.linspace(1.0 / (n + 1), 1.0 - 1.0 / (n + 1), n)
        super().__init__()

    def _empty_state(self):
        n = len(self.thresholds)
        return {
            "matched_pred": torch.zeros(n, dtype=torch.int64),
            "pred": torch.zeros(n, dtype=torch.int64),
            "matched_gt": torch.zeros(n, dtype=torch.int64),
            "gt": torch.zeros(1, dtype=torch.int64),
        }

    @torch.no_grad()
    def update(self, pred, target):
        _check_spatial(pred, target)
        if pred.dim() == 4 and pred.shape[1] != 1:
            raise ValueError(f"edge output must have 1 channel, got {pred.shape[1]}")
        target = _squeeze_channel(target)
        valid = target != IGNORE_INDEX
        prob = torch.sigmoid(_squeeze_channel(pred).double()).masked_fill(~valid, 0.0)
        gt = (target == 1) & valid
        for n_gt, rows in _match_images(prob.cpu().numpy(), gt.cpu().numpy(), self.thresholds, self.max_dist,
                                        self.thin):
            self._state["matched_pred"] += torch.from_numpy(rows[:, 0])
            self._state["pred"] += torch.from_numpy(rows[:, 1])
            self._state["matched_gt"] += torch.from_numpy(rows[:, 2])
            self._state["gt"] += n_gt

    def f_scores(self) -> torch.Tensor:
        """F per threshold (float64), in the order of ``self.thresholds``."""
        s = {k: v.double() for k, v in self._state.items()}
        precision = s["matched_pred"] / s["pred"].clamp_min(1)
        recall = s["matched_gt"] / s["gt"].clamp_min(1)
        denom = precision + recall
        return torch.where(denom > 0, 2 * precision * recall / denom.clamp_min(1e-300), 0.0)

    def compute(self):
        if int(self._state["gt"]) == 0:
            return math.nan  # recall undefined without GT edge pixels
        return float(self.f_scores().max())


def delta_m(
    values: dict[str, float],
    references: dict[str, float],
    higher_is_better: dict[str, bool],
) -> float:
    """Multi-task performance change Δm in percent (positive = better than the reference).

    Δm = 1/T Σ_i (-1)^{l_i} (M_m,i − M_s,i) / M_s,i · 100 over the tasks of ``values``,
    with l_i = 1 when lower is better for task i. A task missing from ``references`` or
    ``higher_is_better`` is an error; a zero reference makes the relative change undefined,
    so Δm is then NaN (as it is when any value or reference is NaN).
    """
    if not values:
        raise ValueError("delta_m needs at least one task")
    total = 0.0
    for task, value in values.items():
        if task not in references or task not in higher_is_better:
            raise ValueError(f"delta_m: no reference value or direction for task '{task}'")
        ref = float(references[task])
        if ref == 0:
            return math.nan
        sign = 1.0 if higher_is_better[task] else -1.0
        total += sign * (float(value) - ref) / ref * 100.0
    return total / len(values)
