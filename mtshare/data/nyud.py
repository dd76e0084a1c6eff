"""NYUD-v2 multi-task loader (the NYUD_MT release layout).

Root layout::

    images/<id>.jpg
    segmentation/<id>.png   0 void, 1..40 -> classes 0..39 (void -> 255)
    depth/<id>.npy          H x W float, metres (0 = invalid)
    normals/<id>.npy        H x W x 3 in [-1, 1] (zeros = invalid)
    edge/<id>.npy           H x W binary
    gt_sets/{train,val}.txt
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from mtshare.data import DataError, DatasetInfo, read_ids, read_image, read_npy
from mtshare.data.transforms import prepare

INFO = DatasetInfo(
    name="nyud",
    tasks=("semseg", "depth", "normals", "edge"),
    num_semseg_classes=40,
    edge_tolerance=0.011,
    default_size=416,
)


def split_path(root: Path, split: str) -> Path:
    return root / "gt_sets" / f"{split}.txt"


def paths(root: Path, im_id: str) -> dict[str, Path]:
    return {
        "image": root / "images" / f"{im_id}.jpg",
        "semseg": root / "segmentation" / f"{im_id}.png",
        "depth": root / "depth" / f"{im_id}.npy",
        "normals": root / "normals" / f"{im_id}.npy",
        "edge": root / "edge" / f"{im_id}.npy",
    }


def load_semseg(path: Path) -> np.ndarray:
    """File values 0 (void) / 1..40 -> 255 / 0..39."""
    seg = read_image(path)
    if seg.ndim != 2:
        raise DataError(f"{path}: segmentation png must be single-channel, got {seg.shape}")
    seg = seg.astype(np.int64)
    return np.where(seg == 0, 255, seg - 1).astype(np.uint8)


def load_depth(path: Path) -> np.ndarray:
    depth = read_npy(path).astype(np.float32)
    if depth.ndim == 3 and depth.shape[2] == 1:
        depth = depth[..., 0]
    if depth.ndim != 2:
        raise DataError(f"{path}: depth must be H x W, got shape {depth.shape}")
    # Non-finite or negative readings are sensor holes: mark them invalid (0).
    return np.where(np.isfinite(depth) & (depth > 0), depth, 0.0).astype(np.float32)


def load_normals(path: Path) -> np.ndarray:
    normals = read_npy(path).astype(np.float32)
    if normals.ndim != 3 or normals.shape[2] != 3:
        raise DataError(f"{path}: normals must be H x W x 3, got shape {normals.shape}")
    return np.where(np.isfinite(normals), normals, 0.0).astype(np.float32)


def load_edge(path: Path) -> np.ndarray:
    edge = read_npy(path)
    if edge.ndim != 2:
        raise DataError(f"{path}: edge must be H x W, got shape {edge.shape}")
    return (edge > 0).astype(np.uint8)


_LOADERS = {"semseg": load_semseg, "depth": load_depth, "normals": load_normals, "edge": load_edge}


class NYUD(Dataset):
    """NYUD-v2 items: see mtshare.data.transforms.to_tensors for the layout."""

    def __init__(self, root: Path, split: str, tasks: list[str], train: bool, img_size: int):
        self.root, self.tasks, self.train, self.img_size = root, tasks, train, img_size
        self.ids = read_ids(split_path(root, split))

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, index: int) -> dict[str, np.ndarray]:
        """Raw sample (original resolution) for the requested tasks."""
        p = paths(self.root, self.ids[index])
        image = read_image(p["image"], "RGB")
        sample = {"image": image}
        for task in self.tasks:
            arr = _LOADERS[task](p[task])
            if arr.shape[:2] != image.shape[:2]:
                raise DataError(f"{p[task]}: size {arr.shape[:2]} != image {image.shape[:2]}")
            sample[task] = arr
        return sample

    def __getitem__(self, index: int) -> dict:
        return prepare(self.load(index), self.ids[index], self.train, self.img_size)
