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


MATCH_SEED = 1  # the BSDS matcher's random seed, set before every match

_SEEDED_MATCHER = None


def seeded_correspond_pixels():
    """``pyEdgeEval._lib.correspond_pixels``, made deterministic.

    The BSDS matcher draws its sparse graph of outlier edges from one C++ global generator,
    ``Random::rand``, which it seeds from the clock when the library loads; its Python API
    has no seed. So the same two maps could match a few pixels differently from call to call,
    and an edge metric moved by about ±0.3 % from run to run (the demo's ODS-F), which the
    operating-point calibrations then bisected on. The generator's methods are exported
    symbols of the extension, so we reseed it (``Random::reseed(MATCH_SEED)``, through ctypes)
    before every match: a match is a function of its two maps. Where the symbols are missing
    (another build), the matcher stays clock-seeded and a warning says so."""
    global _SEEDED_MATCHER
    if _SEEDED_MATCHER is None:
        import ctypes
        import sys
        import warnings

        from pyEdgeEval._lib import correspond_pixels

        try:
            lib = ctypes.CDLL(sys.modules["pyEdgeEval._lib.correspond_pixels"].__file__)
            generator = ctypes.addressof(ctypes.c_char.in_dll(lib, "_ZN6Random4randE"))  # Random::rand
            reseed = lib._ZN6Random6reseedEm  # Random::reseed(u_int64_t), `this` first (Itanium C++ ABI)
            reseed.argtypes, reseed.restype = [ctypes.c_void_p, ctypes.c_uint64], None
        except (OSError, AttributeError, ValueError, KeyError) as e:
            warnings.warn(f"pyEdgeEval: cannot seed the BSDS matcher ({e}); edge F-measures may vary by a few "
                          f"matched pixels from run to run", RuntimeWarning, stacklevel=2)
            _SEEDED_MATCHER = correspond_pixels
        else:
            def seeded(img0, img1, **kwargs):
                reseed(generator, MATCH_SEED)
                return correspond_pixels(img0, img1, **kwargs)
            _SEEDED_MATCHER = seeded
    return _SEEDED_MATCHER


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


# --- ODS-F matching, in this process or in a pool ------------------------------------------------

_MATCH_PROCESSES = 1
_POOL = None


def set_num_processes(n: int) -> None:
    """How many processes :class:`ODSFMeter` may match edge maps in (like ``torch.set_num_threads``:
    a stage worker gives it the CPUs it holds). 1: in this process. The figures do not depend on
    it: every (image, threshold) match is a function of its two maps."""
    global _MATCH_PROCESSES, _POOL
    n = max(1, int(n))
    if n != _MATCH_PROCESSES and _POOL is not None:
        _POOL.shutdown()
        _POOL = None
    _MATCH_PROCESSES = n


def _pool():
    global _POOL
    if _POOL is None:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        # spawn: forking a process that runs torch / gloo threads is not safe
        _POOL = ProcessPoolExecutor(_MATCH_PROCESSES, mp_context=mp.get_context("spawn"))
    return _POOL


def _match_thresholds(prob: np.ndarray, gt: np.ndarray, thresholds: np.ndarray, max_dist: float,
                      thin: bool) -> np.ndarray:
    """Rows (matched predicted, predicted, matched GT) per threshold of one image's map."""
    from pyEdgeEval.preprocess import binary_thin  # the C extension: only where edges are evaluated

    correspond_pixels = seeded_correspond_pixels()
    n_gt = int(gt.sum())
    rows = np.zeros((len(thresholds), 3), dtype=np.int64)
    last_raw_count, last_row = -1, None
    for i, t in enumerate(thresholds):
        binary = prob >= t
        raw_count = int(binary.sum())
        # Thresholds rise, so maps are nested: an equal pixel count means the same map.
        if raw_count == last_raw_count:
            rows[i] = last_row
            continue
        if thin and raw_count:
            binary = binary_thin(binary)
        n_pred = int(binary.sum())
        matched_pred = matched_gt = 0
        if n_pred and n_gt:
            match_pred, match_gt, _, _ = correspond_pixels(binary, gt, max_dist=max_dist)
            matched_pred, matched_gt = int((match_pred > 0).sum()), int((match_gt > 0).sum())
        rows[i] = (matched_pred, n_pred, matched_gt)
        last_raw_count, last_row = raw_count, rows[i]
    return rows


def _match_images(probs: np.ndarray, gts: np.ndarray, thresholds: np.ndarray, max_dist: float,
                  thin: bool) -> list[tuple[int, np.ndarray]]:
    """``(GT edge pixels, rows per threshold)`` of each image. With several processes the
    (image, threshold chunk) pieces run in the pool: low thresholds cost most (more predicted
    pixels), so each image's thresholds are cut into a few chunks per process."""
    if _MATCH_PROCESSES == 1 or not len(probs):
        return [(int(g.sum()), _match_thresholds(p, g, thresholds, max_dist, thin)) for p, g in zip(probs, gts)]
    n_chunks = min(len(thresholds), max(1, -(-4 * _MATCH_PROCESSES // len(probs))))
    cuts = np.array_split(np.arange(len(thresholds)), n_chunks)
    pieces = [(p, g, thresholds[c], max_dist, thin) for p, g in zip(probs, gts) for c in cuts]
    done = list(_pool().map(_match_thresholds, *zip(*pieces)))
    return [(int(g.sum()), np.concatenate(done[i * n_chunks:(i + 1) * n_chunks])) for i, g in enumerate(gts)]


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
