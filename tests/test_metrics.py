"""Hand-computed checks of the evaluation meters and of Δm."""

import math

import pytest
import torch

from mtshare.metrics import (
    MaxFMeter,
    MIoUMeter,
    NormalsMeter,
    ODSFMeter,
    RMSEMeter,
    delta_m,
)

IGN = 255


def one_hot_logits(labels: torch.Tensor, num_classes: int, scale: float = 10.0) -> torch.Tensor:
    """[B,H,W] labels -> [B,C,H,W] logits whose argmax is ``labels``."""
    return torch.nn.functional.one_hot(labels, num_classes).permute(0, 3, 1, 2).float() * scale


def sal_logits(prob: torch.Tensor) -> torch.Tensor:
    """2-class logits [B,2,H,W] whose softmax[:,1] is ``prob`` [B,H,W]; channel 0 is offset
    by 2 so that a sigmoid of channel 1 alone would give different probabilities."""
    logit = torch.log(prob) - torch.log1p(-prob)
    return torch.stack([torch.full_like(prob, 2.0), 2.0 + logit], dim=1)


# ---------------------------------------------------------------- mIoU


def test_miou_perfect():
    gt = torch.randint(0, 5, (2, 8, 8))
    m = MIoUMeter(5)
    m.update(one_hot_logits(gt, 5), gt)
    assert m.compute() == 1.0


def test_miou_all_ignore_is_nan():
    m = MIoUMeter(3)
    gt = torch.full((1, 4, 4), IGN)
    m.update(torch.randn(1, 3, 4, 4), gt)
    assert math.isnan(m.compute())
    assert int(m.state()["confusion"].sum()) == 0


def test_miou_partial_overlap_by_hand():
    # GT: left two columns class 0, right two class 1 (8 px each).
    gt = torch.tensor([[0, 0, 1, 1]] * 4).unsqueeze(0)
    # Prediction: class 0 only in column 0, class 1 elsewhere.
    pred = torch.tensor([[0, 1, 1, 1]] * 4).unsqueeze(0)
    # One wrong pixel is ignored in the GT: it must count nowhere.
    gt_ign = gt.clone()
    gt_ign[0, 0, 1] = IGN
    m = MIoUMeter(3)  # class 2 is absent from GT and prediction: excluded from the mean
    m.update(one_hot_logits(pred, 3), gt_ign)
    # class 0: inter 4, GT 7 (one ignored), pred 4 -> 4 / 7
    # class 1: inter 8, GT 8, pred 11 (12 minus the ignored one) -> 8 / 11
    iou = m.per_class_iou()
    assert iou[0].item() == pytest.approx(4 / 7)
    assert iou[1].item() == pytest.approx(8 / 11)
    assert math.isnan(iou[2].item())
    assert m.compute() == pytest.approx((4 / 7 + 8 / 11) / 2)


def test_miou_class_only_predicted_counts_as_zero():
    gt = torch.zeros(1, 2, 2, dtype=torch.long)
    pred = torch.tensor([[[0, 0], [0, 1]]])
    m = MIoUMeter(2)
    m.update(one_hot_logits(pred, 2), gt)
    assert m.compute() == pytest.approx((3 / 4 + 0.0) / 2)


# ---------------------------------------------------------------- saliency maxF


def test_maxf_perfect_and_all_ignore():
    gt = torch.tensor([[[1, 0], [0, 1]]])
    m = MaxFMeter()
    m.update(sal_logits(torch.where(gt == 1, 0.99, 0.01)), gt)
    assert m.compute() == pytest.approx(1.0)
    m = MaxFMeter()
    m.update(torch.randn(1, 2, 2, 2), torch.full((1, 2, 2), IGN))
    assert math.isnan(m.compute())


def test_maxf_known_best_threshold():
    # Thresholds 0.1 .. 0.9 (n_bins=10). Positives 0.95, 0.75, 0.45; negatives 0.65, 0.25;
    # one ignored pixel with a high probability that must not count.
    prob = torch.tensor([[[0.95, 0.75, 0.45], [0.65, 0.25, 0.99]]])
    gt = torch.tensor([[[1, 1, 1], [0, 0, IGN]]])
    m = MaxFMeter(n_bins=10)
    m.update(sal_logits(prob), gt)

    def f(p, r):
        return 1.3 * p * r / (0.3 * p + r)

    # t = 0.7: TP 2, FP 0 -> P 1, R 2/3, the best of all thresholds:
    # t<=0.2: P .6 R 1; t=.3,.4: P .75 R 1; t=.5,.6: P 2/3 R 2/3; t=.8,.9: P 1 R 1/3.
    expected = f(1.0, 2 / 3)
    assert expected > max(f(0.6, 1), f(0.75, 1), f(2 / 3, 2 / 3), f(1, 1 / 3))
    scores = m.f_scores()
    assert int(scores.argmax()) == 6  # t_7 = 0.7
    assert m.compute() == pytest.approx(expected)


def test_maxf_applies_softmax_exactly_once():
    # A positive at p=0.91 and a negative at p=0.89 are separated by t=0.9 -> F = 1.
    # Softmax applied twice gives sigmoid(2p-1) = 0.694 / 0.686 (same bin), and a sigmoid
    # of channel 1 alone (ignoring channel 0's offset) 0.987 / 0.984 (same bin): F would
    # then be at best P=.5, R=1 -> 0.565.
    prob = torch.tensor([[[0.91, 0.89]]])
    gt = torch.tensor([[[1, 0]]])
    m = MaxFMeter(n_bins=10)
    m.update(sal_logits(prob), gt)
    assert m.compute() == pytest.approx(1.0)

    twice = MaxFMeter(n_bins=10)
    twice.update(torch.softmax(sal_logits(prob), dim=1), gt)  # a caller's extra softmax
    assert twice.compute() == pytest.approx(1.3 * 0.5 / (0.3 * 0.5 + 1))


# ---------------------------------------------------------------- normals


def test_normals_equal_orthogonal_and_invalid():
    target = torch.zeros(1, 3, 2, 2)
    target[0, 2] = 1.0  # all (0,0,1)
    target[0, :, 1, 1] = 0.0  # invalid pixel
    m = NormalsMeter()
    m.update(target * 5.0, target)  # unnormalised but parallel: 0 degrees
    assert m.compute() == pytest.approx(0.0, abs=1e-6)

    pred = torch.zeros(1, 3, 2, 2)
    pred[0, 0] = 3.0  # (1,0,0): orthogonal to the target everywhere
    pred[0, :, 1, 1] = torch.tensor([0.0, 0.0, -1.0])  # would be 180 deg if counted
    m = NormalsMeter()
    m.update(pred, target)
    assert m.compute() == pytest.approx(90.0)
    assert int(m.state()["count"]) == 3


def test_normals_all_invalid_is_nan():
    m = NormalsMeter()
    m.update(torch.randn(1, 3, 2, 2), torch.zeros(1, 3, 2, 2))
    assert math.isnan(m.compute())


# ---------------------------------------------------------------- depth RMSE


def test_rmse_known_value():
    pred = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2)
    target = torch.tensor([1.0, 0.0, 5.0, 5.0]).view(1, 1, 2, 2)  # 0 = invalid
    m = RMSEMeter()
    m.update(pred, target)
    assert m.compute() == pytest.approx(math.sqrt((0 + 4 + 1) / 3))
    m = RMSEMeter()
    m.update(target, target)
    assert m.compute() == 0.0
    m = RMSEMeter()
    m.update(pred, torch.zeros_like(pred))
    assert math.isnan(m.compute())


# ---------------------------------------------------------------- edge ODS-F
# 128x128: diagonal 181 px, so the PASCAL tolerance 0.0075 is 1.36 px. The BSDS matcher is
# randomised (time-seeded sparse outlier edges) and now and then leaves a few pixels of an
# otherwise perfect match unmatched: on these ~180 px maps 0 misses in 2/3 of the calls,
# at most 5 in 3000 calls. Hence a tolerance of 0.05 (about 9 misses) on matched scores.

S = 128
TOL = 0.05


def edge_gt() -> torch.Tensor:
    gt = torch.zeros(1, S, S, dtype=torch.long)
    gt[0, 40, 10:110] = 1
    gt[0, 20:100, 70] = 1
    return gt


def edge_logits(binary: torch.Tensor) -> torch.Tensor:
    return torch.where(binary.bool(), 8.0, -8.0).unsqueeze(1)


def test_odsf_perfect_is_one():
    gt = edge_gt()
    m = ODSFMeter(max_dist=0.0075, n_thresholds=9)
    m.update(edge_logits(gt), gt)
    assert m.compute() == pytest.approx(1.0, abs=TOL)


def test_odsf_is_deterministic():
    """The BSDS matcher's random outlier graph is seeded before every match: the same maps
    match the same pixels in every call (clock-seeded, 2 of 6 repeats of this match differed)."""
    import numpy as np

    from mtshare.metrics import seeded_correspond_pixels

    rng = np.random.default_rng(0)
    a, b = (rng.random((64, 64)) > 0.8 for _ in range(2))
    match = seeded_correspond_pixels()
    runs = {tuple(int((m > 0).sum()) for m in match(a.astype(float), b.astype(float), max_dist=0.02)[:2])
            for _ in range(12)}
    assert len(runs) == 1
    # and through the meter: noisy maps at many thresholds, evaluated again from scratch
    g = torch.Generator().manual_seed(0)
    gt = (torch.rand(2, 64, 64, generator=g) > 0.85).long()
    logits = torch.randn(2, 1, 64, 64, generator=g) * 2
    values = set()
    for _ in range(4):
        m = ODSFMeter(max_dist=0.02, n_thresholds=9)
        m.update(logits, gt)
        values.add(tuple(m.f_scores().tolist()))
    assert len(values) == 1


def test_odsf_in_a_process_pool_counts_what_one_process_counts():
    """``set_num_processes``: a batch's (image, threshold chunk) pieces match in a pool; the
    pooled counts (so the F per threshold) are exactly those matched in this process."""
    from mtshare import metrics

    g = torch.Generator().manual_seed(1)
    gt = (torch.rand(3, 48, 48, generator=g) > 0.9).long()
    gt[0, :4] = 255
    logits = torch.randn(3, 1, 48, 48, generator=g) * 3
    states = []
    for processes in (1, 2):
        metrics.set_num_processes(processes)
        try:
            m = ODSFMeter(max_dist=0.02, n_thresholds=25)
            m.update(logits[:2], gt[:2])
            m.update(logits[2:], gt[2:])
            states.append(m.state())
        finally:
            metrics.set_num_processes(1)
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert int(states[0]["pred"].sum()) > 0 and int(states[0]["matched_gt"].sum()) > 0


def test_odsf_far_away_is_zero():
    gt = edge_gt()
    pred = torch.zeros_like(gt)
    pred[0, 120, 10:110] = 1
    m = ODSFMeter(max_dist=0.0075, n_thresholds=9)
    m.update(edge_logits(pred), gt)
    assert m.compute() == 0.0
    assert int(m.state()["pred"][0]) == 100  # counted as false positives


def test_odsf_one_pixel_shift_within_tolerance():
    gt = torch.zeros(1, S, S, dtype=torch.long)
    gt[0, 40, 10:110] = gt[0, 80, 10:110] = 1
    shifted = torch.roll(gt, shifts=1, dims=1)  # 1 px < 1.36 px tolerance
    m = ODSFMeter(max_dist=0.0075, n_thresholds=9)
    m.update(edge_logits(shifted), gt)
    assert m.compute() == pytest.approx(1.0, abs=TOL)
    # With a tolerance below one pixel (0.72 px) the same shift matches nothing.
    m = ODSFMeter(max_dist=0.004, n_thresholds=9)
    m.update(edge_logits(shifted), gt)
    assert m.compute() == 0.0


def test_odsf_thins_thick_predictions():
    gt = torch.zeros(1, S, S, dtype=torch.long)
    gt[0, 60, 10:110] = 1
    thick = torch.zeros_like(gt)
    thick[0, 59:62, 10:110] = 1  # 3 px wide band around the GT line
    thinned = ODSFMeter(max_dist=0.0075, n_thresholds=3)
    thinned.update(edge_logits(thick), gt)
    raw = ODSFMeter(max_dist=0.0075, n_thresholds=3, thin=False)
    raw.update(edge_logits(thick), gt)
    assert thinned.compute() > 1 - TOL
    assert raw.compute() == pytest.approx(2 * (1 / 3) / (1 / 3 + 1), abs=TOL)


def test_odsf_ignore_pixels_count_nowhere():
    gt = edge_gt()
    pred = gt.clone()
    pred[0, 100:128, 0:128] = 1  # spurious edges, but in an ignored region
    gt_ign = gt.clone()
    gt_ign[0, 100:128, :] = IGN
    m = ODSFMeter(max_dist=0.0075, n_thresholds=9)
    m.update(edge_logits(pred), gt_ign)
    assert m.compute() == pytest.approx(1.0, abs=TOL)

    m = ODSFMeter(max_dist=0.0075, n_thresholds=9)
    m.update(torch.randn(1, 1, S, S), torch.full((1, S, S), IGN))
    assert math.isnan(m.compute())


def test_odsf_thresholds_bsds_default():
    m = ODSFMeter()
    assert len(m.thresholds) == 99
    assert m.thresholds[0] == pytest.approx(0.01) and m.thresholds[-1] == pytest.approx(0.99)


def test_odsf_pools_counts_not_scores():
    # Image 1: perfect, 100 px (F=1). Image 2: 300 GT px, 300 predicted px far away (F=0).
    # Pooled counts: P = R = 100/400 -> F = 0.25 (the mean of per-image F would be 0.5).
    gt1 = torch.zeros(1, S, S, dtype=torch.long)
    gt1[0, 40, 14:114] = 1
    gt2 = torch.zeros(1, S, S, dtype=torch.long)
    gt2[0, 10, 14:114] = gt2[0, 20, 14:114] = gt2[0, 30, 14:114] = 1
    pred2 = torch.zeros_like(gt2)
    pred2[0, 90, 14:114] = pred2[0, 100, 14:114] = pred2[0, 110, 14:114] = 1
    m = ODSFMeter(max_dist=0.0075, n_thresholds=5)
    m.update(edge_logits(torch.cat([gt1, pred2])), torch.cat([gt1, gt2]))
    assert m.compute() == pytest.approx(0.25, abs=TOL)


# ---------------------------------------------------------------- merging states


def _meters_and_batches():
    g = torch.Generator().manual_seed(0)

    def seg(c):
        t = torch.randint(0, c, (2, 6, 6), generator=g)
        t[0, 0] = IGN
        return torch.randn(2, c, 6, 6, generator=g), t

    def normals():
        t = torch.nn.functional.normalize(torch.randn(2, 3, 6, 6, generator=g), dim=1)
        t[:, :, 0] = 0
        return torch.randn(2, 3, 6, 6, generator=g), t

    def depth():
        t = torch.rand(2, 1, 6, 6, generator=g) * 5
        t[:, :, 0] = 0
        return torch.rand(2, 1, 6, 6, generator=g) * 5, t

    return [
        (lambda: MIoUMeter(4), lambda: seg(4)),
        (lambda: MaxFMeter(), lambda: seg(2)),
        (NormalsMeter, normals),
        (RMSEMeter, depth),
    ]


@pytest.mark.parametrize("index", range(4))
def test_merge_equals_single_meter(index):
    make_meter, make_batch = _meters_and_batches()[index]
    b1, b2 = make_batch(), make_batch()
    a, b, both = make_meter(), make_meter(), make_meter()
    a.update(*b1)
    b.update(*b2)
    both.update(*b1)
    both.update(*b2)
    a.merge(b.state())
    for key, value in both.state().items():
        assert value.dtype in (torch.float64, torch.int64)
        torch.testing.assert_close(a.state()[key], value)
    assert a.compute() == pytest.approx(both.compute())

    # load_state of the elementwise sum (what an all-reduce yields) gives the same result.
    c = make_meter()
    c.load_state({k: v + make_meter().state()[k] for k, v in both.state().items()})
    assert c.compute() == pytest.approx(both.compute())
    c.reset()
    assert all(int(v.abs().sum()) == 0 for v in c.state().values())


def test_merge_odsf():
    gt = edge_gt()
    far = torch.zeros_like(gt)
    far[0, 120, 10:110] = 1
    a, b, both = (ODSFMeter(max_dist=0.0075, n_thresholds=5) for _ in range(3))
    a.update(edge_logits(gt), gt)
    b.update(edge_logits(far), gt)
    both.update(edge_logits(torch.cat([gt, far])), torch.cat([gt, gt]))
    expected = {k: a.state()[k] + b.state()[k] for k in a.state()}
    a.merge(b.state())
    for key, value in expected.items():
        assert value.dtype == torch.int64
        torch.testing.assert_close(a.state()[key], value)
    # Same pooled counts up to the matcher's rare random miss.
    assert a.compute() == pytest.approx(both.compute(), abs=TOL)
    assert int(a.state()["gt"]) == 2 * int(gt.sum())


def test_load_state_rejects_wrong_shape():
    m = MIoUMeter(3)
    with pytest.raises(ValueError):
        m.load_state({"confusion": torch.zeros(4, 4, dtype=torch.int64)})
    with pytest.raises(ValueError):
        m.merge({"other": torch.zeros(3, 3)})


# ---------------------------------------------------------------- delta_m


def test_delta_m_mixed_directions():
    values = {"semseg": 66.0, "normals": 13.5, "depth": 0.55}
    refs = {"semseg": 60.0, "normals": 15.0, "depth": 0.5}
    hib = {"semseg": True, "normals": False, "depth": False}
    # semseg +10 %, normals error -10 % (better: +10), depth error +10 % (worse: -10)
    assert delta_m(values, refs, hib) == pytest.approx((10 + 10 - 10) / 3)


def test_delta_m_missing_reference_raises_zero_reference_is_nan():
    with pytest.raises(ValueError):
        delta_m({"semseg": 1.0}, {}, {"semseg": True})
    assert math.isnan(delta_m({"semseg": 1.0}, {"semseg": 0.0}, {"semseg": True}))
