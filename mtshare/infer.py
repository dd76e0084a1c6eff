"""Run every task of a trained suite on user images (``launcher infer``), through the shared engine
at the sub-tasks' stored operating points.

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
from mtshare.engine import SharedEngine
from mtshare.report import STEP_ORDER, load_results
from mtshare.stream import compact_split
from mtshare.visualize import colorize, save_panel, to_prediction


def final_stages(results: dict[str, dict]) -> dict[str, dict]:
    """Per task, the stage whose checkpoint serves inference: base, else the last sharing step.
    (A dense step0 reference is a yardstick, never served.)"""
    out = {}
    if "base" in results:
        out[results["base"]["task"]] = results["base"]
    for task in sorted({r["task"] for r in results.values() if r["kind"] != "base"}):
        for kind in STEP_ORDER:
            if f"{task}/{kind}" in results:
                out[task] = results[f"{task}/{kind}"]
                break
    return out


def load_suite_engine(store: str | Path, device: str | torch.device = "cpu", **engine_kw) -> tuple[SharedEngine, dict]:
    """The trained suite as it is served: one :class:`SharedEngine` over the base and the last
    sharing step of every sub-task, each at its stored operating point (τ from its checkpoint's
    manifest; τ = 0, exact, for a step that has none), and, for a video suite, each task's
    temporal τ (``engine.temporal_thresholds``, ``engine.stream_settings``). Every file is verified against the
    checksum in its result. Returns (engine, base manifest)."""
    store = Path(store)
    results = load_results(store)
    if "base" not in results:
        raise ckpt.CheckpointError(f"{store}: no finished base stage")
    base_path = store / "base/model.safetensors"
    served = {t: r for t, r in final_stages(results).items() if r["kind"] in STEP_ORDER}
    paths = {t: store / r["stage"] / "model.safetensors" for t, r in served.items()}
    engine = SharedEngine.from_checkpoints(base_path, paths, device, base_sha256=results["base"]["checksum"],
                                           subtask_sha256={t: r["checksum"] for t, r in served.items()}, **engine_kw)
    for task, path in paths.items():
        engine.set_thresholds(task, (ckpt.read_manifest(path).get("operating_point") or {}).get("tau") or {})
    # Video suites: each task's temporal τ and the stream settings they were calibrated for.
    # A sub-task's split layer is its own plan (its temporal caches from there on; = depth: task
    # deltas in every block); one number where all sub-tasks share it.
    base_manifest = ckpt.read_manifest(base_path)
    splits = {}
    for task, path in {engine.base_task: base_path, **paths}.items():
        stream = base_manifest.get("stream") if path == base_path else ckpt.read_manifest(path).get("stream")
        if stream:
            engine.temporal_thresholds[task] = stream["tau"]
            engine.stream_settings = {"keyframe_every": stream["keyframe_every"], "split_layer": stream["split_layer"]}
            if path != base_path:
                splits[task] = stream["split_layer"]
    if engine.stream_settings and splits:
        engine.stream_settings["split_layer"] = compact_split(splits)
    return engine, base_manifest


def prepare_rgb(rgb: list[np.ndarray], size: int, patch: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """RGB uint8 images of one size, prepared as the suite's val images are (long side shrunk
    to ``size`` if larger, ImageNet normalisation, bottom/right padding to a multiple of the
    patch): ([N, 3, S, S], content (h, w) inside the pad)."""
    x = torch.stack([torch.from_numpy(normalize(im)).permute(2, 0, 1) for im in rgb])
    h, w = x.shape[-2:]
    if max(h, w) > size:
        r = size / max(h, w)
        x = F.interpolate(x, size=(max(1, round(h * r)), max(1, round(w * r))), mode="bilinear", align_corners=False)
    ch, cw = x.shape[-2:]
    side = max(size, -(-max(ch, cw) // patch) * patch)
    return F.pad(x, (0, side - cw, 0, side - ch)), (ch, cw)


def prepare_image(path: Path, size: int, patch: int) -> tuple[torch.Tensor, np.ndarray, tuple[int, int]]:
    """(normalised padded tensor [1,3,S,S], original RGB uint8, content (h, w) inside the pad)."""
    rgb = read_image(path, mode="RGB")
    x, content = prepare_rgb([rgb], size, patch)
    return x, rgb, content


@torch.no_grad()
def infer_images(workdir: str | Path, images: list[str | Path], out_dir: str | Path) -> list[Path]:
    """Write a panel and raw arrays for every image; returns the panel paths. All tasks run
    through the shared engine at their operating points (one base pass per image)."""
    store = Path(workdir) / "store"
    engine, manifest = load_suite_engine(store)
    spec = manifest["spec"]
    size, patch = spec["dataset"]["img_size"], spec["model"]["patch_size"]
    out_dir = Path(out_dir)
    panels = []
    for img_path in map(Path, images):
        x, rgb, (ch, cw) = prepare_image(img_path, size, patch)
        pictures = {}
        target = out_dir / img_path.stem
        target.mkdir(parents=True, exist_ok=True)
        outputs = engine(x)
        for task, out in outputs.items():
            out = out[0, :, :ch, :cw]
            out = F.interpolate(out[None], size=rgb.shape[:2], mode="bilinear", align_corners=False)[0]
            pred = to_prediction(task, out)
            np.save(target / f"{task}.npy", pred)
            pictures[task] = colorize(task, pred)
        save_panel(target / "panel.png", rgb, pictures)
        (target / "tasks.json").write_text(json.dumps(sorted(pictures)))
        panels.append(target / "panel.png")
    return panels
