"""Joint image/label transforms (ATRC-style augmentation) and conversion to tensors.

A *sample* is a dict of numpy arrays at the original resolution:

    image        uint8  [H, W, 3]
    semseg, human_parts, sal, edge
                 uint8  [H, W]   (255 = ignore)
    normals      float32 [H, W, 3]  unit vectors, zeros where invalid
    depth        float32 [H, W]     metres, 0 where invalid

Train: random scale 0.5-2 (bilinear image, nearest for every label map), random
crop/pad to S x S, horizontal flip (normals x negated), photometric distortion,
ImageNet normalisation. Val: no augmentation; images larger than S are shrunk so
their long side is S (aspect kept), then everything is padded at the bottom/right
to S x S. Shrinking is our choice: the reference pads only, which cannot fit an
image larger than the crop; with the default sizes (512 PASCAL, real images <= 500)
PASCAL val is never resized.

Padding: image 0 after normalisation (= the mean colour), class maps 255,
normals and depth 0.

Randomness comes from a numpy Generator seeded by the torch RNG on every call, so
a run is reproducible under ``torch.manual_seed`` and each DataLoader worker (which
torch seeds differently) draws different augmentations.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

CLASS_MAPS = ("semseg", "human_parts", "sal", "edge")
IGNORE = 255
SCALE_RANGE = (0.5, 2.0)


def make_rng() -> np.random.Generator:
    """A numpy Generator seeded from the torch RNG (reproducible, worker-safe)."""
    seed = int(torch.randint(0, 2**62, ()).item())
    return np.random.default_rng(seed)


def _nearest(arr: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Nearest-neighbour resize of the first two axes (pixel-centre aligned)."""
    h, w = arr.shape[:2]
    rows = np.minimum(((np.arange(out_h) + 0.5) * h / out_h).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(out_w) + 0.5) * w / out_w).astype(np.int64), w - 1)
    return arr[rows][:, cols]


def resize(sample: dict, out_h: int, out_w: int) -> dict:
    """Resize every map of a sample to (out_h, out_w)."""
    out = {}
    for key, arr in sample.items():
        if key == "image":
            # PIL bilinear filters over the whole footprint when shrinking (no aliasing).
            out[key] = np.asarray(Image.fromarray(arr).resize((out_w, out_h), Image.BILINEAR))
        elif key == "normals":
            n = _nearest(arr, out_h, out_w)
            norm = np.linalg.norm(n, axis=2, keepdims=True)
            out[key] = np.where(norm > 0, n / np.maximum(norm, 1e-12), 0.0).astype(np.float32)
        else:
            out[key] = _nearest(arr, out_h, out_w)
    return out


def _pad_value(key: str) -> float:
    return IGNORE if key in CLASS_MAPS else 0


def crop_pad(sample: dict, top: int, left: int, size: int) -> dict:
    """Crop a size x size window at (top, left), padding bottom/right past the edge."""
    out = {}
    for key, arr in sample.items():
        window = arr[top : top + size, left : left + size]
        pad = [(0, size - window.shape[0]), (0, size - window.shape[1])]
        pad += [(0, 0)] * (arr.ndim - 2)
        out[key] = np.pad(window, pad, constant_values=_pad_value(key))
    return out


def hflip(sample: dict) -> dict:
    """Mirror left-right; a mirrored surface's normal has its x component negated."""
    out = {key: arr[:, ::-1].copy() for key, arr in sample.items()}
    if "normals" in out:
        out["normals"][..., 0] *= -1
    return out


def _grey(img: np.ndarray) -> np.ndarray:
    return (img @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[..., None]


# RGB <-> YIQ: rotating the (I, Q) chroma plane shifts the hue.
_RGB2YIQ = np.array(
    [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=np.float32
)
_YIQ2RGB = np.linalg.inv(_RGB2YIQ).astype(np.float32)


def photometric_distortion(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast, saturation and hue jitter (each with p=0.5), mmseg ranges.

    ``img`` is float32 RGB in [0, 255]; the result is clipped to that range.
    """
    img = img.astype(np.float32)
    if rng.random() < 0.5:
        img = img + rng.uniform(-32, 32)
    if rng.random() < 0.5:
        mean = _grey(np.clip(img, 0, 255)).mean()
        img = mean + rng.uniform(0.5, 1.5) * (img - mean)
    img = np.clip(img, 0, 255)
    if rng.random() < 0.5:
        grey = _grey(img)
        img = np.clip(grey + rng.uniform(0.5, 1.5) * (img - grey), 0, 255)
    if rng.random() < 0.5:
        angle = np.deg2rad(rng.uniform(-18, 18))
        c, s = np.cos(angle), np.sin(angle)
        rot = np.array([[1, 0, 0], [0, c, -s], [0, s, c]], dtype=np.float32)
        img = np.clip(img @ (_YIQ2RGB @ rot @ _RGB2YIQ).T, 0, 255)
    return img.astype(np.float32)


def normalize(img: np.ndarray) -> np.ndarray:
    """[0, 255] RGB -> ImageNet-normalised float32."""
    return ((img.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)


def train_transform(sample: dict, size: int, rng: np.random.Generator) -> dict:
    """Random scale, crop/pad to size x size, flip, photometric distortion, normalise."""
    h, w = sample["image"].shape[:2]
    scale = rng.uniform(*SCALE_RANGE)
    sample = resize(sample, max(1, round(h * scale)), max(1, round(w * scale)))
    sample["image"] = normalize(photometric_distortion(sample["image"], rng))
    h, w = sample["image"].shape[:2]
    top = int(rng.integers(0, max(h - size, 0) + 1))
    left = int(rng.integers(0, max(w - size, 0) + 1))
    sample = crop_pad(sample, top, left, size)
    if rng.random() < 0.5:
        sample = hflip(sample)
    return sample


def val_transform(sample: dict, size: int) -> dict:
    """Shrink only if the long side exceeds ``size``, normalise, pad bottom/right."""
    h, w = sample["image"].shape[:2]
    if max(h, w) > size:
        ratio = size / max(h, w)
        sample = resize(sample, max(1, round(h * ratio)), max(1, round(w * ratio)))
    sample = dict(sample, image=normalize(sample["image"]))
    return crop_pad(sample, 0, 0, size)


def to_tensors(sample: dict) -> dict[str, torch.Tensor]:
    """Transformed numpy maps -> the documented tensor layout.

    image float32 [3,S,S]; semseg/human_parts/sal/edge int64 [S,S];
    normals float32 [3,S,S]; depth float32 [1,S,S].
    """
    out = {}
    for key, arr in sample.items():
        arr = np.ascontiguousarray(arr)
        if key in ("image", "normals"):
            out[key] = torch.from_numpy(arr.astype(np.float32)).permute(2, 0, 1).contiguous()
        elif key == "depth":
            out[key] = torch.from_numpy(arr.astype(np.float32))[None]
        else:
            out[key] = torch.from_numpy(arr.astype(np.int64))
    return out


def prepare(sample: dict, sample_id: str, train: bool, size: int, rng: np.random.Generator | None = None) -> dict:
    """Transform a raw sample and convert it to a dataset item (``rng``: the augmentation's
    random draws; default a fresh one from the torch RNG)."""
    h, w = sample["image"].shape[:2]
    sample = train_transform(sample, size, rng or make_rng()) if train else val_transform(sample, size)
    item = to_tensors(sample)
    item["id"] = sample_id
    item["orig_size"] = torch.tensor([h, w], dtype=torch.int64)
    return item
