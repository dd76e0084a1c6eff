"""Data layer: synthetic layouts, checker, loaders, transforms, learnability."""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image
from torch.utils.data import default_collate

from mtshare.data import DATASETS, DataError, build_dataset, check_dataset, read_ids, synthesize
from mtshare.data import pascal_context as pc
from mtshare.data.transforms import hflip, train_transform, val_transform

SIZE = 48
N = 16


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("synthetic")
    return {
        layout: synthesize(layout, base / layout, n=N, size=SIZE, seed=3)
        for layout in ("pascal_context", "nyud")
    }


def _copy(root: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(root, tmp_path / root.name))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# --- synthesis ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layout, label",
    [
        ("pascal_context", "semseg/pascal-context/2008_000002.png"),
        ("nyud", "segmentation/0002.png"),
    ],
)
def test_synthesize_is_deterministic(tmp_path, layout, label):
    a = _files(synthesize(layout, tmp_path / "a", n=6, size=32, seed=7))
    b = _files(synthesize(layout, tmp_path / "b", n=6, size=32, seed=7))
    c = _files(synthesize(layout, tmp_path / "c", n=6, size=32, seed=8))
    assert a == b  # every file, .mat files included
    assert a[label] != c[label]


def test_synthesize_is_fast(tmp_path):
    start = time.perf_counter()
    synthesize("pascal_context", tmp_path, n=200, size=64)
    assert time.perf_counter() - start < 30


def test_synthesize_rejects_unknown_layout(tmp_path):
    with pytest.raises(DataError, match="layout"):
        synthesize("cityscapes", tmp_path)


def test_split_and_person_fractions(roots):
    ids = {s: read_ids(pc.split_path(roots["pascal_context"], s)) for s in ("train", "val")}
    assert len(ids["train"]) + len(ids["val"]) == N and len(ids["val"]) == N // 4
    files = [pc.paths(roots["pascal_context"], i) for i in ids["train"] + ids["val"]]
    parts = [pc.has_person_parts(f["human_parts"]) for f in files]
    assert 0.3 <= np.mean(parts) <= 0.5


def test_human_parts_mat_indexing(roots):
    root = roots["pascal_context"]
    person_found = other_found = False
    for mat in sorted((root / "human_parts").glob("*.mat")):
        anno = scipy.io.loadmat(mat)["anno"]
        assert anno.shape == (1, 1) and anno.dtype.names == ("imname", "objects")
        objects = anno[0][0][1]
        assert objects.shape[0] == 1
        assert objects.dtype.names == ("class", "class_ind", "mask", "parts")
        for obj in anno[0][0][1][0]:
            assert obj[2].shape == (SIZE, SIZE) and obj[2].any()
            if obj[1][0][0] == pc.PERSON:
                person_found = True
                assert obj[3].dtype.names == ("part_name", "mask")
                for k in range(len(obj[3][0])):
                    part = obj[3][0][k]
                    assert part[0][0] in pc.PART_GROUPS
                    assert part[1].shape == (SIZE, SIZE)
                    assert not (part[1].astype(bool) & ~obj[2].astype(bool)).any()
            else:
                other_found = True
                assert len(obj[3]) == 0
    assert person_found and other_found


def test_label_map_mat(roots):
    mat = next((roots["pascal_context"] / "pascal-context" / "trainval").glob("*.mat"))
    label_map = scipy.io.loadmat(mat)["LabelMap"]
    assert label_map.shape == (SIZE, SIZE)
    assert set(np.unique(label_map)) <= set(range(1, 460))


# --- checker --------------------------------------------------------------------------


def test_check_passes(roots):
    summary = check_dataset("pascal_context", roots["pascal_context"])
    assert "train 12, val 4" in summary and "all files present" in summary
    assert "with human parts" in summary
    assert "train 12, val 4" in check_dataset("nyud", roots["nyud"])


def test_check_decodes_at_most_max_decode_ids_per_split(roots):
    summary = check_dataset("nyud", roots["nyud"], max_decode=2)
    assert "contents checked on 4 of 16 ids" in summary


@pytest.mark.parametrize(
    "layout, victim",
    [
        ("pascal_context", "sal_distill/2008_000005.png"),
        ("pascal_context", "pascal-context/trainval/2008_000003.mat"),
        ("nyud", "depth/0004.npy"),
        ("nyud", "gt_sets/val.txt"),
    ],
)
def test_check_names_missing_file(roots, tmp_path, layout, victim):
    root = _copy(roots[layout], tmp_path)
    (root / victim).unlink()
    with pytest.raises(DataError, match=f"^{re.escape(str(root / victim))}: "):
        check_dataset(layout, root)


def test_check_names_a_missing_human_parts_file(roots, tmp_path):
    """The release has human_parts/<id>.mat for every image (persons or not): one missing is a
    broken download, named — not read as "no person"."""
    root = _copy(roots["pascal_context"], tmp_path)
    victim = next((root / "human_parts").glob("*.mat"))
    victim.unlink()
    with pytest.raises(DataError, match=f"^{re.escape(str(victim))}: file not found"):
        check_dataset("pascal_context", root)


def test_check_names_bad_label_values(roots, tmp_path):
    root = _copy(roots["pascal_context"], tmp_path)
    png = root / "semseg/pascal-context/2008_000002.png"
    Image.fromarray(np.full((SIZE, SIZE), 30, np.uint8)).save(png)
    with pytest.raises(DataError, match=f"^{re.escape(str(png))}: semseg values"):
        check_dataset("pascal_context", root)

    root = _copy(roots["nyud"], tmp_path / "n")
    edge = root / "edge/0003.npy"
    np.save(edge, np.full((SIZE, SIZE), 2.0, np.float32))
    with pytest.raises(DataError, match=f"^{re.escape(str(edge))}: edge map must be binary"):
        check_dataset("nyud", root)
    seg = root / "segmentation/0001.png"
    Image.fromarray(np.full((SIZE, SIZE), 41, np.uint8)).save(seg)
    with pytest.raises(DataError, match=f"^{re.escape(str(seg))}: "):
        check_dataset("nyud", root)


# --- loaders --------------------------------------------------------------------------


def _check_item(item: dict, tasks: tuple[str, ...], num_classes: int, size: int) -> None:
    assert set(item) == {"image", "id", "orig_size", *tasks}
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, size, size)
    assert item["orig_size"].dtype == torch.int64 and item["orig_size"].tolist() == [SIZE, SIZE]
    for key in ("semseg", "human_parts", "sal", "edge"):
        if key in item:
            assert item[key].dtype == torch.int64 and item[key].shape == (size, size)
    if "semseg" in item:
        values = set(item["semseg"].unique().tolist())
        assert values <= set(range(num_classes)) | {255}
    if "human_parts" in item:
        assert set(item["human_parts"].unique().tolist()) <= set(range(7)) | {255}
    for key in ("sal", "edge"):
        if key in item:
            assert set(item[key].unique().tolist()) <= {0, 1, 255}
    if "normals" in item:
        assert item["normals"].dtype == torch.float32 and item["normals"].shape == (3, size, size)
        norm = item["normals"].norm(dim=0)
        assert torch.all(((norm - 1).abs() < 1e-4) | (norm == 0))
    if "depth" in item:
        assert item["depth"].dtype == torch.float32 and item["depth"].shape == (1, size, size)
        assert item["depth"].min() >= 0 and item["depth"].max() < 20


@pytest.mark.parametrize("dataset", ["pascal_context", "nyud"])
@pytest.mark.parametrize("train", [True, False])
def test_build_dataset_items(roots, dataset, train):
    info = DATASETS[dataset]
    size = 40 if train else 64
    ds = build_dataset(dataset, roots[dataset], "train", list(info.tasks), train, size)
    assert len(ds) == 12
    torch.manual_seed(0)
    items = [ds[i] for i in range(len(ds))]
    for item in items:
        _check_item(item, info.tasks, info.num_semseg_classes, size)
    batch = default_collate(items)
    assert batch["image"].shape == (12, 3, size, size) and len(batch["id"]) == 12
    if not train:  # pad-only: the 48x48 content sits top-left, the rest is padding
        assert (batch["semseg"][:, SIZE:, :] == 255).all()
        assert (batch["semseg"][:, :SIZE, :SIZE] != 255).any()
        assert (batch["image"][:, :, :, SIZE:] == 0).all()
        assert (batch["normals"][:, :, SIZE:] == 0).all()
        if "human_parts" in batch:
            has_parts = (batch["human_parts"][:, :SIZE, :SIZE] != 255).flatten(1).any(1)
            assert 0 < has_parts.sum() < 12  # images without persons are all ignore


def test_train_items_are_reproducible(roots):
    ds = build_dataset("nyud", roots["nyud"], "train", ["semseg", "normals"], True, 32)
    torch.manual_seed(5)
    first = ds[0]
    torch.manual_seed(5)
    again = ds[0]
    assert torch.equal(first["image"], again["image"])
    assert torch.equal(first["normals"], again["normals"])


def test_pascal_normals_only_on_valid_classes(roots):
    ds = build_dataset("pascal_context", roots["pascal_context"], "train", ["normals"], False, SIZE)
    sky_seen = False
    for i in range(len(ds)):
        normals = ds.load(i)["normals"]
        label_map = pc.load_label_map(pc.paths(ds.root, ds.ids[i])["label_map"])
        valid = np.isin(label_map, list(pc.NORMALS_VALID_CLASSES))
        assert np.allclose(np.linalg.norm(normals[valid], axis=1), 1, atol=1e-5)
        assert (normals[~valid] == 0).all()
        sky_seen |= bool((~valid).any())
    assert sky_seen  # sky (context class 360) has no NYUD counterpart


def test_unknown_task_dataset_and_split(roots):
    with pytest.raises(DataError, match="'depth'"):
        build_dataset("pascal_context", roots["pascal_context"], "train", ["depth"], True, 32)
    with pytest.raises(DataError, match="'sal'"):
        build_dataset("nyud", roots["nyud"], "train", ["sal"], True, 32)
    with pytest.raises(DataError, match="cityscapes"):
        build_dataset("cityscapes", roots["nyud"], "train", ["semseg"], True, 32)
    with pytest.raises(DataError, match="test.txt: split file not found"):
        build_dataset("nyud", roots["nyud"], "test", ["semseg"], True, 32)


def test_human_parts_only_keeps_person_ids(roots):
    root = roots["pascal_context"]
    everything = build_dataset("pascal_context", root, "train", ["human_parts", "sal"], False, SIZE)
    parts_only = build_dataset("pascal_context", root, "train", ["human_parts"], False, SIZE)
    expected = [i for i in everything.ids if pc.has_person_parts(pc.paths(root, i)["human_parts"])]
    assert parts_only.ids == expected and 0 < len(expected) < len(everything)
    for i in range(len(parts_only)):
        assert (parts_only[i]["human_parts"] != 255).any()


def test_edges_are_thin_semantic_boundaries():
    label_map = np.zeros((20, 20), np.int32)
    label_map[5:15, 5:15] = 7
    edges = pc.edges_from_label_map(label_map)
    # The Laplacian marks a 2-pixel band (both sides of the boundary); thinning keeps one.
    band = np.zeros_like(edges, dtype=bool)
    band[4:16, 4:16] = True
    band[6:14, 6:14] = False
    assert not (edges.astype(bool) & ~band).any()
    assert 30 <= edges.sum() <= 44  # about the square's perimeter, not the band's 80


def test_thin_matches_skimage_docstring_example():
    square = np.zeros((7, 7), np.uint8)
    square[1:-1, 2:-2] = 1
    square[0, 1] = 1
    expected = np.zeros((7, 7), bool)
    expected[[0, 1, 2, 3, 4], [1, 2, 3, 3, 3]] = True
    assert np.array_equal(pc.thin(square), expected)


# --- transforms -----------------------------------------------------------------------


def _sample(h: int, w: int) -> dict:
    rng = np.random.default_rng(0)
    normals = rng.normal(size=(h, w, 3)).astype(np.float32)
    normals /= np.linalg.norm(normals, axis=2, keepdims=True)
    return {
        "image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
        "semseg": rng.integers(0, 21, (h, w), dtype=np.uint8),
        "normals": normals,
        "depth": rng.uniform(0.5, 5, (h, w)).astype(np.float32),
    }


def test_hflip_negates_normal_x():
    sample = _sample(4, 5)
    flipped = hflip(sample)
    assert np.array_equal(flipped["semseg"], sample["semseg"][:, ::-1])
    assert np.array_equal(flipped["normals"][..., 0], -sample["normals"][:, ::-1, 0])
    assert np.array_equal(flipped["normals"][..., 1:], sample["normals"][:, ::-1, 1:])


def test_train_transform_is_joint():
    sample = _sample(30, 50)
    sample["depth"] = sample["semseg"].astype(np.float32) + 1  # depth mirrors the labels
    for seed in range(8):
        out = train_transform(dict(sample), 32, np.random.default_rng(seed))
        assert out["image"].shape == (32, 32, 3) and out["semseg"].shape == (32, 32)
        labelled = out["semseg"] != 255
        # Scale, crop, pad and flip moved every map together.
        assert np.array_equal(out["depth"][labelled], out["semseg"][labelled] + 1.0)
        assert (out["depth"][~labelled] == 0).all() and (out["image"][~labelled] == 0).all()
        norm = np.linalg.norm(out["normals"], axis=2)
        assert np.allclose(norm[labelled], 1, atol=1e-5) and (norm[~labelled] == 0).all()


def test_val_transform_pads_only():
    sample = _sample(20, 30)
    out = val_transform(sample, 32)
    assert np.array_equal(out["semseg"][:20, :30], sample["semseg"])
    assert np.array_equal(out["depth"][:20, :30], sample["depth"])
    assert (out["semseg"][20:] == 255).all() and (out["semseg"][:, 30:] == 255).all()
    assert (out["depth"][20:] == 0).all() and (out["normals"][:, 30:] == 0).all()
    assert (out["image"][20:] == 0).all()
    # larger than S: the long side shrinks to S, aspect kept, then padding
    out = val_transform(_sample(40, 20), 32)
    assert (out["semseg"][:, :16] != 255).all() and (out["semseg"][:, 16:] == 255).all()


# --- learnability ---------------------------------------------------------------------


def _pixels(root: Path, split: str, label: str) -> tuple[np.ndarray, np.ndarray]:
    ids = read_ids(pc.split_path(root, split))
    colours = [np.asarray(Image.open(root / "JPEGImages" / f"{i}.jpg")).reshape(-1, 3) for i in ids]
    labels = [np.asarray(Image.open(root / label / f"{i}.png")).reshape(-1) for i in ids]
    return np.concatenate(colours).astype(np.float32), np.concatenate(labels)


def test_semseg_is_separable_by_colour(roots):
    """A 1-nearest-neighbour colour classifier per pixel far beats chance."""
    root = roots["pascal_context"]
    x_train, y_train = _pixels(root, "train", "semseg/pascal-context")
    x_val, y_val = _pixels(root, "val", "semseg/pascal-context")
    rng = np.random.default_rng(0)
    per_class = [rng.permutation(np.flatnonzero(y_train == c))[:300] for c in np.unique(y_train)]
    keep = np.concatenate(per_class)
    dist = torch.cdist(torch.from_numpy(x_val), torch.from_numpy(x_train[keep]))
    pred = y_train[keep][dist.argmin(1).numpy()]
    classes = np.unique(y_val)
    recall = [np.mean(pred[y_val == c] == c) for c in classes]
    assert np.mean(recall) > 0.8 and np.mean(recall) > 3 / len(classes)


def test_depth_grows_toward_horizon(roots):
    root = roots["nyud"]
    for im_id in ("0001", "0002", "0003"):
        seg = np.asarray(Image.open(root / "segmentation" / f"{im_id}.png"))
        depth = np.load(root / "depth" / f"{im_id}.npy")
        rows, cols = np.nonzero(seg == 2)  # NYUD floor
        floor = depth[rows, cols]
        # On the ground plane depth falls towards the bottom row, and is constant along a row.
        assert np.corrcoef(rows, floor)[0, 1] < -0.8
        for row in np.unique(rows):
            assert np.ptp(floor[rows == row]) < 1e-3 * floor[rows == row].mean()
