"""Data layer: PASCAL-Context and NYUD-v2 multi-task loaders, joint transforms,
synthetic scenes written in the real on-disk layouts, and a layout checker.

Public API (other modules rely on these names)::

    build_dataset(dataset, root, split, tasks, train, img_size) -> torch Dataset
    synthesize(layout, out, n=32, size=64, seed=0) -> Path
    synthesize_sequences(layout, out, sequences=4, frames=16, size=64, seed=0, camera="moving") -> Path
    sequences(ids) -> {sequence: [frame ids in order]}      (frame ids are "<sequence>/<frame>")
    ClipDataset(dataset, clip_len) -> consecutive frames of one sequence, augmented alike
    check_dataset(dataset, root) -> str
    DATASETS: dict[str, DatasetInfo]
    DataError

Dataset items are dicts of tensors ("image", one key per task, "id", "orig_size");
see ``transforms.to_tensors`` for dtypes and shapes.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image
from scipy.io.matlab import MatReadError
from torch.utils.data import Dataset


class DataError(ValueError):
    """A dataset file or argument is missing or malformed.

    The message starts with the offending path (or argument name), then a colon.
    """


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about one dataset."""

    name: str
    tasks: tuple[str, ...]
    num_semseg_classes: int
    edge_tolerance: float  # ODS-F matching distance, fraction of the image diagonal
    default_size: int


# --- file readers shared by the loaders and the checker: every failure is a DataError ---


def read_ids(path: Path) -> list[str]:
    """Read a split file (one id per line); raise DataError if absent or empty."""
    if not path.is_file():
        raise DataError(f"{path}: split file not found")
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise DataError(f"{path}: split file lists no ids")
    return ids


def read_image(path: Path, mode: str | None = None) -> np.ndarray:
    """Decode an image file to a numpy array, optionally converted to a PIL mode."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with Image.open(path) as img:
            if mode is not None and img.mode != mode:
                img = img.convert(mode)
            return np.asarray(img)
    except OSError as err:
        raise DataError(f"{path}: cannot decode image ({err})") from err


def read_npy(path: Path) -> np.ndarray:
    """Load a .npy array (no pickles)."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read .npy ({err})") from err


def read_mat(path: Path, var: str) -> np.ndarray:
    """Load one variable of a MATLAB .mat file."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        mat = scipy.io.loadmat(path, variable_names=[var])
    except (OSError, ValueError, TypeError, MatReadError, zlib.error) as err:
        raise DataError(f"{path}: cannot read .mat ({err})") from err
    if var not in mat:
        raise DataError(f"{path}: variable {var!r} missing")
    return mat[var]


# Imported after DataError, DatasetInfo and the readers exist: the submodules use them.
from mtshare.data import nyud, pascal_context  # noqa: E402
from mtshare.data.check import check_dataset  # noqa: E402
from mtshare.data.synthetic import synthesize, synthesize_sequences  # noqa: E402
from mtshare.data.clips import ClipDataset, sequences  # noqa: E402

DATASETS: dict[str, DatasetInfo] = {
    pascal_context.INFO.name: pascal_context.INFO,
    nyud.INFO.name: nyud.INFO,
}

_DATASET_CLASSES = {
    pascal_context.INFO.name: pascal_context.PascalContext,
    nyud.INFO.name: nyud.NYUD,
}


def build_dataset(
    dataset: str,
    root: str | Path,
    split: str,
    tasks: list[str],
    train: bool,
    img_size: int,
) -> Dataset:
    """Build the dataset ``dataset`` reading ``root``/<split file>.

    ``train`` selects the random augmentation (scale, crop, flip, photometric);
    otherwise images are only padded (or shrunk when larger than ``img_size``).
    """
    if dataset not in DATASETS:
        raise DataError(f"dataset: unknown dataset {dataset!r} (known: {', '.join(DATASETS)})")
    info = DATASETS[dataset]
    for task in tasks:
        if task not in info.tasks:
            raise DataError(
                f"tasks: task {task!r} is not available for {dataset} "
                f"(available: {', '.join(info.tasks)})"
            )
    if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size <= 0:
        raise DataError(f"img_size: must be a positive integer, got {img_size!r}")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset root not found")
    return _DATASET_CLASSES[dataset](root, split, list(tasks), train, img_size)


__all__ = [
    "DATASETS",
    "DataError",
    "DatasetInfo",
    "build_dataset",
    "check_dataset",
    "read_ids",
    "read_image",
    "read_mat",
    "read_npy",
    "synthesize",
    "synthesize_sequences",
    "sequences",
    "ClipDataset",
]
