"""Verify a dataset root against its real on-disk layout.

Two passes per dataset:
1. existence: both split files, and every file of every listed id (frame ids
   ``<sequence>/<frame>`` group into sequences, none in both splits; PASCAL's
   human_parts/<id>.mat included: the release has one for every image, persons or not, so a
   missing one is a broken download);
2. contents: decode images and labels and check shapes and value ranges, for at most
   ``max_decode`` ids per split (evenly spread over the split), so that a full-size
   release is checked in seconds rather than minutes.

The first problem raises DataError("<path>: <what is wrong>").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mtshare.data import DataError, nyud, read_ids, read_image, read_npy
from mtshare.data import pascal_context as pc
from mtshare.data.clips import sequences

SPLITS = ("train", "val")


def check_dataset(dataset: str, root: str | Path, max_decode: int = 200) -> str:
    """Check ``root`` as ``dataset`` ("pascal_context" or "nyud"); return a summary."""
    if dataset not in _CHECKS:
        raise DataError(f"dataset: unknown dataset {dataset!r} (known: {', '.join(_CHECKS)})")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset root not found")
    module, required, decode = _CHECKS[dataset]
    splits = {split: read_ids(module.split_path(root, split)) for split in SPLITS}
    for ids in splits.values():
        for im_id in ids:
            files = module.paths(root, im_id)
            for key in required:
                if not files[key].is_file():
                    raise DataError(f"{files[key]}: file not found")
    decoded = [im_id for ids in splits.values() for im_id in _spread(ids, max_decode)]
    notes = [decode(module.paths(root, im_id)) for im_id in decoded]
    total = sum(len(ids) for ids in splits.values())
    counts = ", ".join(f"{split} {len(ids)}" for split, ids in splits.items())
    seqs = {split: sequences(ids) for split, ids in splits.items()}
    if any(seqs.values()):
        counts += "; frame sequences: " + ", ".join(f"{split} {len(s)}" for split, s in seqs.items())
        both = sorted(set(seqs["train"]) & set(seqs["val"]))
        if both:
            raise DataError(f"{module.split_path(root, 'val')}: sequence {both[0]} is in both train and val")
    if dataset == "pascal_context":
        of = "" if len(decoded) == total else f" of {len(decoded)} decoded ids"
        counts += f"; {sum(notes)}{of} with human parts"
    return (
        f"{dataset} at {root}: {counts}; all files present\n"
        f"contents checked on {len(decoded)} of {total} ids (at most {max_decode} per split)"
    )


def _spread(ids: list[str], k: int) -> list[str]:
    """At most k ids, evenly spaced over the list."""
    if len(ids) <= k:
        return ids
    return [ids[i] for i in np.unique(np.linspace(0, len(ids) - 1, k).round().astype(int))]


def _values(path: Path, arr: np.ndarray, ok: np.ndarray, what: str) -> None:
    if not ok.all():
        bad = np.unique(arr[~ok])[:5].tolist()
        raise DataError(f"{path}: {what}, found {bad}")


def _same_size(path: Path, arr: np.ndarray, shape: tuple[int, int]) -> None:
    if arr.shape[:2] != shape:
        raise DataError(f"{path}: size {arr.shape[:2]} does not match the image {shape}")


def _decode_pascal(files: dict[str, Path]) -> bool:
    """Decode one PASCAL-Context id; returns whether it has a person with parts."""
    shape = read_image(files["image"], "RGB").shape[:2]
    semseg = pc.load_semseg(files["semseg"])
    _same_size(files["semseg"], semseg, shape)
    valid = (semseg < pc.INFO.num_semseg_classes) | (semseg == 255)
    _values(files["semseg"], semseg, valid, "semseg values must be 0..20 or 255")
    label_map = pc.load_label_map(files["label_map"])
    _same_size(files["label_map"], label_map, shape)
    valid = (label_map >= 0) & (label_map <= pc.NUM_CONTEXT_CLASSES)
    _values(files["label_map"], label_map, valid, "LabelMap values must be 0..459")
    normals = read_image(files["normals"])
    _same_size(files["normals"], normals, shape)
    if normals.ndim != 3 or normals.shape[2] != 3:
        raise DataError(f"{files['normals']}: normals png must be RGB, got shape {normals.shape}")
    _same_size(files["sal"], read_image(files["sal"]), shape)
    parts = pc.load_human_parts(files["human_parts"], shape)
    return bool((parts != 255).any())


def _decode_nyud(files: dict[str, Path]) -> None:
    shape = read_image(files["image"], "RGB").shape[:2]
    seg = read_image(files["semseg"])
    _same_size(files["semseg"], seg, shape)
    if seg.ndim != 2:
        raise DataError(f"{files['semseg']}: segmentation png must be single-channel")
    _values(files["semseg"], seg, seg <= nyud.INFO.num_semseg_classes, "values must be 0..40")
    depth = read_npy(files["depth"])
    _same_size(files["depth"], depth, shape)
    _values(files["depth"], depth, np.isfinite(depth) & (depth >= 0), "depth must be finite, >= 0")
    normals = read_npy(files["normals"])
    if normals.shape != (*shape, 3):
        raise DataError(f"{files['normals']}: shape {normals.shape}, expected {(*shape, 3)}")
    in_range = np.isfinite(normals) & (np.abs(normals) <= 1.01)
    _values(files["normals"], normals, in_range, "normals must lie in [-1, 1]")
    edge = read_npy(files["edge"])
    if edge.shape != shape:
        raise DataError(f"{files['edge']}: shape {edge.shape}, expected {shape}")
    _values(files["edge"], edge, np.isin(edge, (0, 1)), "edge map must be binary")


# dataset -> (loader module, files every id must have, per-id decoder)
_CHECKS = {
    "pascal_context": (pc, ("image", "semseg", "label_map", "human_parts", "normals", "sal"), _decode_pascal),
    "nyud": (nyud, ("image", "semseg", "depth", "normals", "edge"), _decode_nyud),
}
