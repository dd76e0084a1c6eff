"""Run every task of a trained suite on user images (``launcher infer``).

Images of any size are prepared like validation images (long side shrunk to the suite's
``img_size`` if larger, ImageNet normalisation, bottom/right padding); outputs are cropped back
to the content and resized to the original size. Per image: ``<stem>/panel.png`` (input + one
picture per task) and ``<stem>/<task>.npy`` (raw predictions, see ``visualize.to_prediction``).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mtshare import checkpoint as ckpt
from mtshare.data import read_image
from mtshare.data.transforms import normalize
from mtshare.models import DenseTaskModel, build_model
from mtshare.report import STEP_ORDER, load_results
from mtshare.tasks import get_task
from mtshare.visualize import colorize, save_panel, to_prediction


def final_stages(results: dict[str, dict]) -> dict[str, dict]:
    """Per task, the stage whose checkpoint serves inference: base, else the last sharing step,
    else the dense step0 reference."""
    out = {}
    if "base" in results:
        out[results["base"]["task"]] = results["base"]
    for task in sorted({r["task"] for r in results.values() if r["kind"] != "base"}):
        for kind in (*STEP_ORDER, "step0"):
            if f"{task}/{kind}" in results:
                out[task] = results[f"{task}/{kind}"]
                break
    return out


def load_task_models(store: str | Path) -> tuple[dict[str, DenseTaskModel], dict]:
    """Dense per-task models (sub-task encoders hold ``W_b + M⊙δ``), verified against the
    checksums in the results. Returns (models by task, base manifest)."""
    store = Path(store)
    results = load_results(store)
    if "base" not in results:
        raise ckpt.CheckpointError(f"{store}: no finished base stage")
    base_sha = results["base"]["checksum"]
    base_enc, _, base_manifest = ckpt.load_dense(store / "base/model.safetensors", expected_sha256=base_sha)
    dataset = base_manifest["dataset"]
    models = {}
    for task, r in final_stages(results).items():
        path = store / r["stage"] / "model.safetensors"
        m = build_model(base_manifest["model"]["flavor"], base_manifest["model"]["patch_size"], task,
                        get_task(task).out_channels(dataset))
        if r["kind"] == "base" or r["kind"] == "step0":
            enc, head, _ = ckpt.load_dense(path, expected_sha256=r["checksum"])
        else:
            deltas, head, _ = ckpt.load_subtask(path, base_sha256=base_sha, expected_sha256=r["checksum"])
            ckpt.check_keys(path, set(deltas), set(base_enc), "deltas")
            enc = {k: v + deltas[k].to(v.dtype) for k, v in base_enc.items()}
        m.encoder.load_state_dict(enc, strict=True)
        m.head.load_state_dict(head, strict=True)
        models[task] = m.eval()
    return models, base_manifest


def prepare_image(path: Path, size: int, patch: int) -> tuple[torch.Tensor, np.ndarray, tuple[int, int]]:
    """(normalised padded tensor [1,3,S,S], original RGB uint8, content (h, w) inside the pad)."""
    rgb = read_image(path, mode="RGB")
    h, w = rgb.shape[:2]
    x = torch.from_numpy(normalize(rgb)).permute(2, 0, 1)[None]
    if max(h, w) > size:
        r = size / max(h, w)
        x = F.interpolate(x, size=(max(1, round(h * r)), max(1, round(w * r))), mode="bilinear", align_corners=False)
    ch, cw = x.shape[-2:]
    side = max(size, -(-max(ch, cw) // patch) * patch)
    x = F.pad(x, (0, side - cw, 0, side - ch))
    return x, rgb, (ch, cw)


@torch.no_grad()
def infer_images(workdir: str | Path, images: list[str | Path], out_dir: str | Path) -> list[Path]:
    """Write a panel and raw arrays for every image; returns the panel paths."""
    store = Path(workdir) / "store"
    models, manifest = load_task_models(store)
    spec = manifest["spec"]
    size, patch = spec["dataset"]["img_size"], spec["model"]["patch_size"]
    out_dir = Path(out_dir)
    panels = []
    for img_path in map(Path, images):
        x, rgb, (ch, cw) = prepare_image(img_path, size, patch)
        pictures = {}
        target = out_dir / img_path.stem
        target.mkdir(parents=True, exist_ok=True)
        for task, model in models.items():
            out = model(x)[0, :, :ch, :cw]
            out = F.interpolate(out[None], size=rgb.shape[:2], mode="bilinear", align_corners=False)[0]
            pred = to_prediction(task, out)
            np.save(target / f"{task}.npy", pred)
            pictures[task] = colorize(task, pred)
        save_panel(target / "panel.png", rgb, pictures)
        (target / "tasks.json").write_text(json.dumps(sorted(pictures)))
        panels.append(target / "panel.png")
    return panels
