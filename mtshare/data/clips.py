"""Frame sequences (video) in the still-image layouts.

A frame's id is ``<sequence>/<frame>``, the frame a number (``seq0003/000012``): every folder
of the layout (images and each label folder) holds one folder of numbered frames per
sequence, and the split files list frame ids. Still-image code (loaders, ``data check``,
training, calibration) reads frames as ordinary images; :func:`sequences` groups them and
:class:`ClipDataset` yields consecutive labelled frames of one sequence. A frame without
labels is simply not listed in the split file (``infer --video`` / ``bench --video`` read a
folder of frames directly).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from mtshare.data import DataError
from mtshare.data.transforms import prepare


def frame_number(im_id: str) -> tuple[str, int] | None:
    """``"seq0003/000012"`` -> ``("seq0003", 12)``; None for a still image's id."""
    seq, sep, frame = im_id.rpartition("/")
    if not sep or not seq:
        return None
    if not frame.isdigit():
        raise DataError(f"{im_id}: a frame id is <sequence>/<frame number>, got frame {frame!r}")
    return seq, int(frame)


def sequences(ids: list[str]) -> dict[str, list[str]]:
    """Frame ids grouped by sequence, each ordered by frame number; {} for still images."""
    groups: dict[str, list[tuple[int, str]]] = {}
    stills = []
    for im_id in ids:
        parsed = frame_number(im_id)
        if parsed is None:
            stills.append(im_id)
        else:
            groups.setdefault(parsed[0], []).append((parsed[1], im_id))
    if stills and groups:
        raise DataError(f"{stills[0]}: a still image id among frame ids (<sequence>/<frame>)")
    out = {}
    for seq, frames in groups.items():
        numbers = [n for n, _ in frames]
        if len(set(numbers)) != len(numbers):
            raise DataError(f"{seq}: frame numbers listed twice")
        out[seq] = [i for _, i in sorted(frames)]
    return out


class ClipDataset(Dataset):
    """Clips of ``clip_len`` consecutive listed frames of one sequence, over a still dataset
    (``build_dataset``'s: it has ``ids``, ``load``, ``train`` and ``img_size``), from its
    frames ``indices`` only when given.

    One item per possible clip start. Every frame of a clip gets the same random augmentation
    (scale, crop, flip, photometric), so the clip shows motion and nothing else. An item is a
    still item whose tensors gain a leading time dimension ``[T, ...]`` and whose ``id`` is the
    list of frame ids."""

    def __init__(self, frames: Dataset, clip_len: int = 2, indices: list[int] | None = None):
        if clip_len < 1:
            raise DataError(f"clip_len: must be >= 1, got {clip_len}")
        self.frames = frames
        kept = range(len(frames.ids)) if indices is None else indices  # (a training stage keeps its holdout out)
        index = {frames.ids[k]: k for k in kept}
        groups = sequences(list(index))
        if not groups:
            raise DataError("dataset: no frame sequences (ids <sequence>/<frame>) in the split")
        self.clips = [[index[i] for i in ids[s:s + clip_len]]
                      for ids in groups.values() for s in range(len(ids) - clip_len + 1)]
        if not self.clips:
            raise DataError(f"clip_len: no sequence has {clip_len} listed frames")
        self.clip_len = clip_len

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> dict:
        seed = int(torch.randint(0, 2**62, ()).item())  # one augmentation for the whole clip
        items = [prepare(self.frames.load(k), self.frames.ids[k], self.frames.train, self.frames.img_size,
                         rng=np.random.default_rng(seed)) for k in self.clips[index]]
        clip = {key: torch.stack([it[key] for it in items]) for key in items[0] if key != "id"}
        clip["id"] = [it["id"] for it in items]
        return clip
