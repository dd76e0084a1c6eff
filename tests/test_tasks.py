"""Task registry: names, channels, meters and the (unweighted) losses."""

import dataclasses
import math
import pickle

import pytest
import torch

from mtshare.metrics import MaxFMeter, MIoUMeter, NormalsMeter, ODSFMeter, RMSEMeter
from mtshare.tasks import TASKS, Task, get_task

IGN = 255
B, H, W = 2, 6, 6
LN2 = math.log(2.0)


def test_registry_contents():
    expected = {
        # name: (metric, higher_is_better, loss_weight)
        "semseg": ("mIoU", True, 1.0),
        "human_parts": ("mIoU", True, 2.0),
        "sal": ("maxF", True, 5.0),
        "normals": ("mErr", False, 1.0),
        "edge": ("odsF", True, 50.0),
        "depth": ("rmse", False, 1.0),
    }
    assert set(TASKS) == set(expected)
    for name, (metric, hib, weight) in expected.items():
        task = get_task(name)
        assert isinstance(task, Task) and task.name == name
        assert (task.metric, task.higher_is_better, task.loss_weight) == (metric, hib, weight)


def test_task_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_task("semseg").loss_weight = 3.0


def test_unknown_task():
    with pytest.raises(ValueError, match=r"unknown task 'x' \(known: semseg, "):
        get_task("x")


def test_out_channels():
    pascal = {"semseg": 21, "human_parts": 7, "sal": 2, "normals": 3, "edge": 1}
    nyud = {"semseg": 40, "normals": 3, "edge": 1, "depth": 1}
    for name, c in pascal.items():
        assert get_task(name).out_channels("pascal_context") == c
    for name, c in nyud.items():
        assert get_task(name).out_channels("nyud") == c
    with pytest.raises(ValueError):
        get_task("depth").out_channels("pascal_context")
    with pytest.raises(ValueError):
        get_task("human_parts").new_meter("nyud")
    with pytest.raises(ValueError):
        get_task("semseg").out_channels("cityscapes")


def test_new_meter_types_and_options():
    assert isinstance(get_task("semseg").new_meter("nyud"), MIoUMeter)
    assert get_task("semseg").new_meter("nyud").num_classes == 40
    assert get_task("human_parts").new_meter("pascal_context").num_classes == 7
    assert isinstance(get_task("sal").new_meter("pascal_context"), MaxFMeter)
    assert isinstance(get_task("normals").new_meter("nyud"), NormalsMeter)
    assert isinstance(get_task("depth").new_meter("nyud"), RMSEMeter)
    edge_pascal = get_task("edge").new_meter("pascal_context")
    edge_nyud = get_task("edge").new_meter("nyud", n_thresholds=9)
    assert isinstance(edge_pascal, ODSFMeter)
    assert (edge_pascal.max_dist, len(edge_pascal.thresholds)) == (0.0075, 99)
    assert (edge_nyud.max_dist, len(edge_nyud.thresholds)) == (0.011, 9)


# ---------------------------------------------------------------- losses


def _batch(name: str):
    """(raw prediction requiring grad, target) of the documented shapes for ``name``."""
    g = torch.Generator().manual_seed(0)
    if name in ("semseg", "human_parts", "sal", "edge"):
        c = {"semseg": 21, "human_parts": 7, "sal": 2, "edge": 1}[name]
        target = torch.randint(0, max(c, 2), (B, H, W), generator=g)
        target[:, 0] = IGN
    elif name == "normals":
        target = torch.nn.functional.normalize(torch.randn(B, 3, H, W, generator=g), dim=1)
        target[:, :, 0] = 0
        c = 3
    else:
        target = torch.rand(B, 1, H, W, generator=g) * 5
        target[:, :, 0] = 0
        c = 1
    return torch.randn(B, c, H, W, generator=g, requires_grad=True), target


def _all_invalid(name: str, target: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(target) if target.is_floating_point() else torch.full_like(target, IGN)


@pytest.mark.parametrize("name", list(TASKS))
def test_loss_scalar_finite_with_gradient(name):
    pred, target = _batch(name)
    loss = get_task(name).loss(pred, target)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss > 0
    loss.backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all()
    assert pred.grad.abs().sum() > 0


@pytest.mark.parametrize("name", list(TASKS))
def test_loss_all_ignored_is_zero_and_differentiable(name):
    pred, target = _batch(name)
    loss = get_task(name).loss(pred, _all_invalid(name, target))
    assert torch.isfinite(loss) and loss.item() == 0.0
    loss.backward()
    assert pred.grad is not None and (pred.grad == 0).all()


def test_loss_ignores_invalid_pixels():
    # Changing predictions only at ignored pixels must not change any loss.
    for name in TASKS:
        pred, target = _batch(name)
        other = pred.detach().clone()
        other[..., 0, :] += 100.0  # row 0 is invalid in every _batch target
        task = get_task(name)
        assert task.loss(pred, target).item() == pytest.approx(task.loss(other, target).item())


def test_perfect_normals_and_depth_losses_are_zero():
    _, normals = _batch("normals")
    assert get_task("normals").loss(normals * 3.0, normals).item() == pytest.approx(0, abs=1e-6)
    _, depth = _batch("depth")
    assert get_task("depth").loss(depth.clone(), depth).item() == 0.0


def test_cross_entropy_perfect_is_near_zero():
    _, target = _batch("semseg")
    logits = torch.nn.functional.one_hot(target.clamp(max=20), 21).permute(0, 3, 1, 2) * 30.0
    assert get_task("semseg").loss(logits.float(), target).item() < 1e-6


def test_depth_loss_by_hand():
    pred = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2)
    target = torch.tensor([1.5, 0.0, 1.0, 4.0]).view(1, 1, 2, 2)
    assert get_task("depth").loss(pred, target).item() == pytest.approx((0.5 + 2 + 0) / 3)


def test_edge_loss_by_hand():
    # Logit 0 -> p = 0.5: an edge pixel costs 0.95 ln2, a non-edge pixel 0.05 ln2.
    target = torch.tensor([[[1, 0], [0, IGN]]])
    loss = get_task("edge").loss(torch.zeros(1, 1, 2, 2), target)
    assert loss.item() == pytest.approx((0.95 + 0.05 + 0.05) * LN2 / 3)


def test_saliency_balanced_loss_by_hand():
    # 3 positives, 1 negative, 1 ignored; uniform logits -> every CE term is ln2.
    # w_pos = #neg / #valid = 1/4; weights: negatives 3/4, positives 1/4;
    # loss = (3 * 1/4 + 1 * 3/4) ln2 / 4.
    target = torch.tensor([[[1, 1, 1, 0, IGN]]])
    loss = get_task("sal").loss(torch.zeros(1, 2, 1, 5), target)
    assert loss.item() == pytest.approx(1.5 * LN2 / 4)


def test_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        get_task("semseg").loss(torch.randn(1, 21, 4, 4), torch.zeros(1, 8, 8, dtype=torch.long))


def test_task_pickles_by_name():
    task = get_task("edge")
    assert pickle.loads(pickle.dumps(task)) is task
