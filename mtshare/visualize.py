"""Turn task outputs into pictures: colour maps per task and one PNG panel per image."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def voc_palette(n: int = 256) -> np.ndarray:
    """The standard PASCAL VOC colour map (bit-interleaved), [n, 3] uint8."""
    pal = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


def to_prediction(task: str, out: torch.Tensor) -> np.ndarray:
    """Raw output [C, H, W] of one image -> the array written as ``<task>.npy``.

    semseg / human_parts: class map (int64); sal: salient probability; edge: edge probability;
    normals: unit vectors [H, W, 3]; depth: metres [H, W]."""
    if task in ("semseg", "human_parts"):
        return out.argmax(0).numpy()
    if task == "sal":
        return out.softmax(0)[1].numpy()
    if task == "edge":
        return out[0].sigmoid().numpy()
    if task == "normals":
        return F.normalize(out, dim=0).permute(1, 2, 0).numpy()
    if task == "depth":
        return out[0].numpy()
    raise ValueError(f"unknown task '{task}'")


def colorize(task: str, pred: np.ndarray) -> np.ndarray:
    """A prediction from :func:`to_prediction` as an RGB uint8 picture."""
    if task in ("semseg", "human_parts"):
        return voc_palette()[pred.astype(np.int64) % 256]
    if task in ("sal", "edge"):
        g = (np.clip(pred, 0, 1) * 255).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=-1)
    if task == "normals":
        return ((pred + 1.0) * 127.5).clip(0, 255).astype(np.uint8)  # the distilled-normals encoding
    if task == "depth":
        from matplotlib import colormaps

        lo, hi = np.percentile(pred, 1), np.percentile(pred, 99)
        norm = (pred - lo) / max(hi - lo, 1e-6)
        return (colormaps["plasma"](np.clip(norm, 0, 1))[..., :3] * 255).astype(np.uint8)
    raise ValueError(f"unknown task '{task}'")


TITLES = {"semseg": "semseg", "human_parts": "parts", "sal": "saliency", "normals": "normals",
          "edge": "edges", "depth": "depth"}


def save_panel(path: str | Path, image: np.ndarray, pictures: dict[str, np.ndarray]) -> None:
    """One row: the input, then each task's picture, titled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 1 + len(pictures)
    fig, axes = plt.subplots(1, cols, figsize=(2.6 * cols, 2.9), squeeze=False)
    for ax, (title, pic) in zip(axes[0], [("input", image), *((TITLES.get(t, t), p) for t, p in pictures.items())]):
        ax.imshow(pic, interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
