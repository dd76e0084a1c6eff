"""Frame sequences (video): synthetic sequences in the real layouts, grouping, clips, checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mtshare.data import ClipDataset, DataError, build_dataset, check_dataset, sequences, synthesize_sequences
from mtshare.data import nyud
from mtshare.data.synthetic import FLOOR, KINDS, WALL

@pytest.fixture(scope="module")
def seqs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("sequences")
    return {
        "moving": synthesize_sequences("nyud", base / "moving", sequences=3, frames=4, size=48, seed=5),
        "static": synthesize_sequences("nyud", base / "static", sequences=3, frames=4, size=48, seed=5,
                                       camera="static"),
    }


def _frame(root: Path, seq: str, f: int, what: str) -> np.ndarray:
    p = nyud.paths(root, f"{seq}/{f:06d}")[what]
    return np.load(p) if p.suffix == ".npy" else np.asarray(Image.open(p))


def test_layout_and_check(seqs):
    root = seqs["moving"]
    assert sorted(p.name for p in (root / "images").iterdir()) == ["seq0001", "seq0002", "seq0003"]
    assert sorted(p.name for p in (root / "depth" / "seq0002").iterdir())[0] == "000000.npy"
    summary = check_dataset("nyud", root)
    assert "frame sequences: train 2, val 1" in summary


def test_sequences_are_deterministic(seqs, tmp_path):
    again = synthesize_sequences("nyud", tmp_path / "again", sequences=3, frames=4, size=48, seed=5)
    for rel in ("images/seq0001/000003.jpg", "depth/seq0003/000002.npy", "gt_sets/val.txt"):
        assert (again / rel).read_bytes() == (seqs["moving"] / rel).read_bytes()


def test_static_camera_moves_only_the_objects(seqs):
    root = seqs["static"]
    changed = 0
    for seq in ("seq0001", "seq0002", "seq0003"):
        seg0, seg3 = _frame(root, seq, 0, "semseg"), _frame(root, seq, 3, "semseg")
        d0, d3 = _frame(root, seq, 0, "depth"), _frame(root, seq, 3, "depth")
        room = np.isin(seg0, (KINDS[WALL].nyud, KINDS[FLOOR].nyud)) & (seg0 == seg3)
        assert room.mean() > 0.5
        np.testing.assert_array_equal(d0[room], d3[room])  # the room does not move
        changed += int((seg0 != seg3).sum())
    assert changed > 0  # but the objects do


def test_moving_camera_depth_follows_the_motion(seqs):
    """The camera moves at a constant velocity: the wall's depth falls by the same step each frame."""
    root = seqs["moving"]
    steps = []
    for f in range(3):
        seg = [_frame(root, "seq0001", f + k, "semseg") for k in (0, 1)]
        d = [_frame(root, "seq0001", f + k, "depth") for k in (0, 1)]
        wall = (seg[0] == KINDS[WALL].nyud) & (seg[1] == KINDS[WALL].nyud)
        assert wall.sum() > 10
        steps.append(float(np.median(d[0][wall] - d[1][wall])))
    assert steps[0] >= 0 and np.allclose(steps, steps[0], atol=1e-5)
    images = [_frame(root, "seq0001", f, "image").astype(float) for f in (0, 1)]
    assert np.abs(images[0] - images[1]).mean() > 1.0


def test_sequences_group_and_order_frames():
    ids = ["b/000010", "a/000002", "b/000002", "a/000001"]
    assert sequences(ids) == {"b": ["b/000002", "b/000010"], "a": ["a/000001", "a/000002"]}
    assert sequences(["2008_000001", "2008_000002"]) == {}
    with pytest.raises(DataError, match="still image"):
        sequences(["a/000001", "2008_000001"])
    with pytest.raises(DataError, match="frame number"):
        sequences(["a/first"])


def test_clip_frames_share_one_augmentation(seqs):
    """Static camera: the room's labels agree between the frames of a clip even after random
    scale / crop / flip, which would not hold if every frame drew its own."""
    ds = build_dataset("nyud", seqs["static"], "train", ["semseg", "depth"], train=True, img_size=48)
    clips = ClipDataset(ds, clip_len=2)
    assert len(clips) == 2 * (4 - 1)  # 2 train sequences, 3 clip starts each
    agree = []
    for k in range(len(clips)):
        clip = clips[k]
        assert clip["image"].shape == (2, 3, 48, 48) and clip["depth"].shape == (2, 1, 48, 48)
        seq = {i.split("/")[0] for i in clip["id"]}
        assert len(seq) == 1
        agree.append(float((clip["semseg"][0] == clip["semseg"][1]).float().mean()))
    # measured: each clip >= 0.88, mean ~0.98; frames augmented independently: mean ~0.55
    assert min(agree) > 0.8 and np.mean(agree) > 0.9


def test_check_rejects_a_sequence_in_both_splits(seqs, tmp_path):
    import shutil

    root = Path(shutil.copytree(seqs["moving"], tmp_path / "both"))
    train = (root / "gt_sets" / "train.txt").read_text().split()
    (root / "gt_sets" / "val.txt").write_text("\n".join(train[:1]) + "\n")
    with pytest.raises(DataError, match=r"val\.txt: sequence seq000\d is in both train and val"):
        check_dataset("nyud", root)


def test_synth_sequences_command(tmp_path, capsys):
    from launcher.__main__ import main

    assert main(["data", "synth", "--layout", "pascal_context", "--out", str(tmp_path / "pc"), "--sequences", "2",
                 "--frames", "3", "--size", "32", "--camera", "static"]) == 0
    assert (tmp_path / "pc" / "JPEGImages" / "seq0002" / "000002.jpg").is_file()
    capsys.readouterr()
    assert main(["data", "synth", "--layout", "nyud", "--out", str(tmp_path / "bad"), "--sequences", "2",
                 "--frames", "1"]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "frames" in err
    assert not (tmp_path / "bad").exists()


def test_temporal_rows_by_hand():
    """Two clips of two frames, one linear input of 2 tokens x 2 channels: the mean over tokens
    of ‖x_t − x_(t−1)‖₂, over the mean norm of the base's rows."""
    import torch

    from mtshare.train import temporal_rows

    sub = torch.tensor([[[0.0, 0.0], [1.0, 0.0]],  # clip 0, frame 0
                        [[3.0, 4.0], [1.0, 0.0]],  # clip 0, frame 1: token 0 moved by 5, token 1 not
                        [[1.0, 1.0], [0.0, 0.0]],  # clip 1, frame 0
                        [[1.0, 1.0], [0.0, 2.0]]])  # clip 1, frame 1: token 1 moved by 2
    base = torch.full((4, 2, 2), 0.0)
    base[..., 0] = 2.0  # every base row has norm 2
    expected = ((5.0 + 0.0 + 0.0 + 2.0) / 4) / 2.0
    assert float(temporal_rows([sub], [base])) == pytest.approx(expected)
