"""Video in and out, and the two video commands: ``bench --video`` and ``infer --video``.

A video is a folder of frames (image files, in name order) or a video file (read with OpenCV,
already a dependency). A folder that is one sequence of a dataset in its real layout
(``<root>/JPEGImages/<sequence>`` for PASCAL-Context, ``<root>/images/<sequence>`` for NYUD,
see ``mtshare.data.clips``) has labels: its listed frames are read with them, through the
dataset's own loader, and the stream's metric is measured.

Temporal thresholds, in this order: the ones stored with the suite (a suite with a ``stream``
section calibrates them on its holdout frames: ``mtshare.infer.load_suite_engine``);
else, when the video's dataset has labelled *train* sequences (other than the video's own),
calibrated on up to three of them, 32 frames each (``mtshare.stream.calibrate_stream`` at
half the tolerance, as suites calibrate task thresholds; never on the measured frames); else none (τ = 0: every changed row is recomputed, the outputs are exact). The
result names its source.
"""
from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Subset

from mtshare import operating_point as op
from mtshare.data import DataError, build_dataset, nyud, pascal_context, read_ids, read_image, sequences
from mtshare.infer import prepare_rgb

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
LAYOUT_IMAGE_DIRS = {"JPEGImages": "pascal_context", "images": "nyud"}
SPLIT_PATH = {"pascal_context": pascal_context.split_path, "nyud": nyud.split_path}


def read_frames(path: str | Path, max_frames: int | None = None) -> list[np.ndarray]:
    """The RGB frames (uint8 [H, W, 3]) of a folder of images or a video file."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"{path}: no frames (image files {', '.join(IMAGE_SUFFIXES)}) in this folder")
        frames = [read_image(p, "RGB") for p in files[:max_frames]]
    elif path.is_file():
        import cv2

        cap = cv2.VideoCapture(str(path))
        frames = []
        while cap.isOpened() and (max_frames is None or len(frames) < max_frames):
            ok, bgr = cap.read()
            if not ok:
                break
            frames.append(bgr[..., ::-1].copy())
        cap.release()
        if not frames:
            raise DataError(f"{path}: not a readable video (OpenCV decoded no frame)")
    else:
        raise DataError(f"{path}: no such folder of frames or video file")
    if len({f.shape for f in frames}) > 1:
        raise DataError(f"{path}: frames differ in size")
    return frames


def labelled_sequence(path: str | Path) -> tuple[str, Path, str, list[str]] | None:
    """``(dataset, root, split, frame ids)`` when ``path`` is one sequence's image folder in a
    dataset layout whose split files list its frames; else None."""
    path = Path(path).resolve()
    dataset = LAYOUT_IMAGE_DIRS.get(path.parent.name)
    if dataset is None or not path.is_dir():
        return None
    root = path.parent.parent
    for split in ("val", "train"):
        split_file = SPLIT_PATH[dataset](root, split)
        if split_file.is_file():
            frames = sequences(read_ids(split_file)).get(path.name)
            if frames:
                return dataset, root, split, frames
    return None


def _sequence_items(dataset: str, root: Path, split: str, ids: list[str], tasks: list[str], img_size: int):
    """A sequence's frames and labels, prepared as val items: (images [T, 3, S, S], {task: [T, ...]})."""
    ds = build_dataset(dataset, root, split, tasks, train=False, img_size=img_size)
    index = {i: k for k, i in enumerate(ds.ids)}
    return op.sequence_clips(Subset(ds, [index[i] for i in ids]), tasks)[0]


def meter_options(store: Path) -> dict[str, dict]:
    """Per task, the meter options the suite measured it with (edge: its ODS-F thresholds)."""
    from mtshare import checkpoint as ckpt
    from mtshare.infer import final_stages
    from mtshare.report import load_results

    out = {}
    for task, r in final_stages(load_results(store)).items():
        if r["kind"] != "base":
            optim = ckpt.read_manifest(store / r["stage"] / "model.safetensors")["spec"]["optim"]
            out[task] = op.meter_options(task, optim["edge_thresholds"])
    return out


def temporal_thresholds(engine, store: Path | None, paths: Sequence[Path], labelled, img_size: int, keyframe_every: int,
                        split_layer: int | None, tolerance: float, margin: float = 0.5, calib_frames: int = 32,
                        calib_sequences: int = 3, scale: float | None = None, frames: torch.Tensor | None = None,
                        log: Callable[[str], None] = lambda s: None) -> tuple[dict, str, dict | None]:
    """Set ``engine.temporal_thresholds`` (see the module docstring); returns (thresholds, where
    they come from, the calibration summary or None). ``scale``: instead, τ = κ × each layer's
    typical frame-to-frame change measured on the first two keyframe intervals of ``frames``
    (uncalibrated: no metric is checked; for synthetic benchmarks). ``paths``: the video (or
    the cameras' videos), never calibrated on."""
    from mtshare.stream import calibrate_stream, uncalibrated_thresholds

    if scale is not None:
        sample = frames[:2 * keyframe_every]
        return uncalibrated_thresholds(engine, sample, scale, keyframe_every, split_layer), (f"uncalibrated: κ = {scale:g} × each layer's typical change on the first "
                                            f"{len(sample)} frames (no metric checked)"), None
    if engine.temporal_thresholds:
        st = engine.stream_settings or {}
        same = (st.get("keyframe_every"), st.get("split_layer")) == (keyframe_every, split_layer)
        return engine.temporal_thresholds, ("stored with the suite" + ("" if same else
                                            f" (calibrated for keyframe every {st.get('keyframe_every')}, "
                                            f"{st.get('split_layer')}: not these settings)")), None
    if labelled is not None:
        dataset, root, _, _ = labelled
        split_file = SPLIT_PATH[dataset](root, "train")
        train = sequences(read_ids(split_file)) if split_file.is_file() else {}
        for p in paths:
            train.pop(Path(p).resolve().name, None)
        chosen = list(train.items())[:calib_sequences]
        if chosen:
            data = [_sequence_items(dataset, root, "train", ids[:calib_frames], engine.tasks, img_size)
                    for _, ids in chosen]
            metric = op.clip_metric(dataset, lambda t, c: data[c][1][t], meter_options(store) if store else {})
            log(f"calibrating temporal thresholds on {len(chosen)} train sequences of {root} "
                f"({', '.join(s for s, _ in chosen)}), {calib_frames} frames each")
            # aim at margin x tolerance (as suites calibrate task thresholds): these are other frames
            summary = calibrate_stream(engine, [d[0] for d in data], metric, tolerance * margin,
                                       keyframe_every=keyframe_every, split_layer=split_layer, log=log)
            return engine.temporal_thresholds, (f"calibrated on train sequences {', '.join(s for s, _ in chosen)} "
                                                f"of {root} (tolerance {tolerance}, margin {margin})"), summary
    engine.temporal_thresholds = {}
    return {}, "none: τ = 0 (no stored thresholds and no labelled train sequences to calibrate on)", None


class Video(NamedTuple):
    engine: object  # SharedEngine: the suite's, or a synthetic one
    frames: torch.Tensor  # [T, 3, S, S], prepared
    content: tuple[int, int]  # (h, w) inside the pad
    rgb: list[np.ndarray] | None  # the frames as read (None for a labelled sequence: read by its loader)
    labels: dict[str, torch.Tensor] | None  # {task: [T, ...]} for a labelled sequence
    labelled: tuple | None  # labelled_sequence(path)
    store: Path | None  # the suite's store
    img_size: int
    dataset: str | None  # the suite's dataset (None: a synthetic engine)


def _load(path: Path, workdir: str | Path | None, model: str, img: int, device: str, seed: int = 0,
          suite: Video | None = None) -> Video:
    """``path``'s frames (and labels, for a labelled sequence of the suite's dataset) prepared
    for the suite in ``workdir`` (or a synthetic engine); ``suite``: a video already loaded
    whose engine, store and size this one shares (the other cameras of ``bench --video``)."""
    from mtshare.bench import BenchInputError, synthetic_engine

    labelled = labelled_sequence(path)
    if suite is not None:
        engine, store, img, patch = suite.engine, suite.store, suite.img_size, suite.engine.cfg.patch_size
        if store is None or (labelled is not None and labelled[0] != suite.dataset):
            labelled = None
        dataset = suite.dataset
    elif workdir:
        from mtshare.infer import load_suite_engine

        store = Path(workdir) / "store"
        if not (store / "base" / "model.safetensors").is_file():
            raise BenchInputError(f"--workdir: no base checkpoint at {store / 'base' / 'model.safetensors'}")
        engine, manifest = load_suite_engine(store, device=device)
        spec = manifest["spec"]
        img, patch, dataset = spec["dataset"]["img_size"], spec["model"]["patch_size"], spec["dataset"]["name"]
        if labelled is not None and labelled[0] != dataset:
            labelled = None  # another dataset's labels: not this suite's tasks
    else:
        engine = synthetic_engine(model, 16, 5, 0.9, seed=seed, device=device)
        store, patch, dataset = None, 16, None
        labelled = None  # a random model has no metric
    rgb = labels = None
    if labelled is not None:
        _, root, split, ids = labelled  # (its dataset is the suite's: checked above)
        frames, labels = _sequence_items(dataset, root, split, ids, engine.tasks, img)
        content = tuple(frames.shape[-2:])
    else:
        rgb = read_frames(path)
        frames, content = prepare_rgb(rgb, img, patch)
    if frames.shape[0] < 2:
        raise BenchInputError(f"--video: {path} has {frames.shape[0]} frame; a stream needs at least 2")
    return Video(engine, frames, content, rgb, labels, labelled, store, img, dataset)


def stream_settings(engine, keyframe_every: int | None, split_layer: int | None) -> tuple[int, int]:
    """The stream's keyframe interval and split layer: as given, else as the suite stored them,
    else every 8 frames and half the depth."""
    stored = engine.stream_settings or {}
    keyframe_every = keyframe_every or stored.get("keyframe_every") or 8
    if split_layer is None:
        split_layer = stored.get("split_layer")
    return keyframe_every, engine.cfg.depth // 2 if split_layer is None else split_layer


def bench_video(path: str | Path | Sequence[str | Path], workdir: str | Path | None = None, model: str = "vit_small",
                img: int = 224, keyframe_every: int | None = None, split_layer: int | None = None,
                tolerance: float = 0.01, device: str = "cpu", threads: int | None = None,
                temporal_scale: float | None = None, passes: int = 5, log: Callable[[str], None] | None = None) -> dict:
    """Per frame, side by side in one process: N independent dense models, the engine frame by
    frame, and the temporal stream (the ``bench --video --format json`` object).

    Several paths are several cameras: frame ``t`` of every camera goes through as one batch
    (one ``push`` of ``[cameras, 3, S, S]``, as a multi-camera rig runs it), cut to the shortest
    video; times are per step (all cameras), FLOPs per image, metrics pooled over all frames."""
    from mtshare import flops
    from mtshare.bench import BenchInputError

    log = log or (lambda s: None)
    if keyframe_every is not None and keyframe_every < 1:
        raise BenchInputError(f"--keyframe-every: must be >= 1, got {keyframe_every}")
    if passes < 1:
        raise BenchInputError(f"--repeats: must be >= 1, got {passes}")
    if threads:
        torch.set_num_threads(threads)
    paths = [Path(p) for p in ([path] if isinstance(path, (str, Path)) else path)]
    if not paths:
        raise BenchInputError("--video: no path given")
    video = _load(paths[0], workdir, model, img, device)
    cameras = [video] + [_load(p, workdir, model, img, device, suite=video) for p in paths[1:]]
    n_frames = min(len(c.frames) for c in cameras)
    if any(len(c.frames) != n_frames for c in cameras):
        log(f"cameras of {', '.join(str(len(c.frames)) for c in cameras)} frames: streaming the first {n_frames} of each")
    frames = torch.stack([c.frames[:n_frames] for c in cameras], dim=1)  # [T, cameras, 3, S, S]
    labels = None
    if all(c.labels is not None for c in cameras):  # [T · cameras, ...], frame-major like the outputs
        labels = {t: torch.stack([c.labels[t][:n_frames] for c in cameras], dim=1).flatten(0, 1) for t in video.labels}
    elif any(c.labels is not None for c in cameras):
        log("some cameras have no labels: no metric")
    engine = video.engine
    depth = engine.cfg.depth
    if split_layer is not None and not 0 <= split_layer <= depth:
        raise BenchInputError(f"--split-layer: must be in [0, {depth}], got {split_layer}")
    keyframe_every, split_layer = stream_settings(engine, keyframe_every, split_layer)
    names = engine.tasks
    if temporal_scale is not None and temporal_scale <= 0:
        raise BenchInputError(f"--temporal-scale: must be > 0, got {temporal_scale}")
    _, source, calibration = temporal_thresholds(engine, video.store, paths, video.labelled, video.img_size,
                                                 keyframe_every, split_layer, tolerance, scale=temporal_scale,
                                                 frames=frames, log=log)
    frames = frames.to(device)
    size = frames.shape[-1]
    log(f"{len(frames)} frames {size}x{size}" + (f" x {len(cameras)} cameras" if len(cameras) > 1 else "")
        + f", {len(names)} tasks; temporal τ: {source}")
    dense = {t: engine.dense_model(t) for t in names}
    dense_flops = sum(flops.dense_flops(dense[t], size) for t in names)

    # Pass 1 (untimed): outputs and FLOPs, every frame.
    engine.collect_stats = True
    stream = engine.stream(keyframe_every, split_layer, collect_stats=True)
    engine_flops, stream_flops, rows = [], [], {t: [] for t in names}
    outs = {"engine": {t: [] for t in names}, "stream": {t: [] for t in names}}
    with torch.inference_mode():
        for f, frame in enumerate(frames):
            for kind, out in (("engine", engine(frame)), ("stream", stream.push(frame))):
                for t in names:
                    outs[kind][t].append(out[t].cpu())
            engine_flops.append(sum(s.executed_flops for s in engine.last_stats.values()))
            stream_flops.append(sum(stream.last_flops.values()))
            if f % keyframe_every:
                for t in names:
                    if stream.last_rows.get(t) is not None:
                        rows[t].append(stream.last_rows[t])
    metrics = None
    if labels is not None:
        dataset = video.labelled[0]
        metrics = {}
        options = meter_options(video.store)
        for t in names:
            e, s = (op.pooled_value(t, dataset, outs[kind][t], labels[t], options.get(t)) for kind in ("engine", "stream"))
            # None where the frames hold nothing to score (e.g. human parts without a person)
            e, s = (v if math.isfinite(v) else None for v in (e, s))
            metrics[t] = {"engine": e, "stream": s, "rel_change": (s - e) / abs(e) if e and s is not None else None}
    err = {t: float((torch.cat(outs["stream"][t]) - torch.cat(outs["engine"][t])).norm()
                    / torch.cat(outs["engine"][t]).norm().clamp_min(1e-30)) for t in names}
    del outs

    # Pass 2 (timed): ``passes`` times over the video, the stream reset at each start; per frame,
    # the three in turn (order alternating), stats off. A pass's figures are its per-frame means;
    # the reported ones are the medians over passes (the ratio: of each pass's own ratio, so a
    # slow minute on a shared machine weighs on both sides of it).
    engine.collect_stats = False
    stream = engine.stream(keyframe_every, split_layer)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    runs = {"independent": lambda x: [dense[t](x) for t in names], "engine": engine, "stream": stream.push}
    per_pass = {"independent": [], "engine": [], "stream": []}
    with torch.inference_mode():
        for t in names:  # warm-up (not the stream: its state is the video's)
            dense[t](frames[0])
        engine(frames[0])
        for p in range(passes):
            stream.reset()
            times = {k: [] for k in per_pass}
            for f, frame in enumerate(frames):
                order = ("independent", "engine", "stream") if (f + p) % 2 == 0 else ("stream", "engine", "independent")
                for kind in order:
                    t0 = time.perf_counter()
                    runs[kind](frame)
                    sync()
                    times[kind].append((time.perf_counter() - t0) * 1e3)
            for k, v in times.items():
                per_pass[k].append(statistics.fmean(v))
            log(f"pass {p + 1}/{passes}: stream / engine time {per_pass['stream'][-1] / per_pass['engine'][-1]:.3f}")
    ms = {k: statistics.median(v) for k, v in per_pass.items()}
    pass_ratios = [s / e for s, e in zip(per_pass["stream"], per_pass["engine"])]
    eng_f, str_f = statistics.fmean(engine_flops), statistics.fmean(stream_flops)
    return {
        "config": {"video": str(paths[0]) if len(paths) == 1 else [str(p) for p in paths], "cameras": len(paths),
                   "frames": len(frames), "img": size,
                   "source": str(workdir) if workdir else "synthetic (random weights, 90 % sparse random deltas)",
                   "model": f"{engine.cfg.embed_dim}d/{depth}L" if workdir else model, "patch": engine.cfg.patch_size,
                   "tasks": len(names), "task_names": names, "keyframe_every": keyframe_every,
                   "split_layer": split_layer, "device": device, "threads": torch.get_num_threads(), "passes": passes,
                   "temporal_thresholds": source, "labelled": labels is not None, "content": list(video.content)},
        "independent_ms": ms["independent"], "engine_ms": ms["engine"], "stream_ms": ms["stream"],
        "time_ratio": ms["engine"] / ms["independent"],
        "stream_time_ratio": statistics.median(pass_ratios),
        "stream_time_ratio_passes": pass_ratios,
        "flops": {"independent": dense_flops, "engine": eng_f, "stream": str_f},
        "flops_ratio": eng_f / dense_flops,
        "stream_flops_ratio": str_f / eng_f,
        "stream_flops_ratio_non_keyframes": (statistics.fmean([s for f, s in enumerate(stream_flops) if f % keyframe_every])
                                             / statistics.fmean([e for f, e in enumerate(engine_flops) if f % keyframe_every]))
        if keyframe_every > 1 else None,
        "rows_recomputed": {t: (statistics.fmean(v) if v else None) for t, v in rows.items()},
        "stream_output_rel_err": err,
        "metrics": metrics,
        "calibration": None if calibration is None else {"scale": calibration["scale"],
                                                         "metric_ref": calibration["metric_ref"],
                                                         "metric": calibration["metric"]},
    }


def split_text(split_layer: int | dict[str, int]) -> str:
    """"split layer 2", or per task "split layers: edge 4, sal 0"."""
    if isinstance(split_layer, dict):
        return "split layers: " + ", ".join(f"{t} {v}" for t, v in split_layer.items())
    return f"split layer {split_layer}"


def format_video_table(r: dict) -> str:
    c = r["config"]
    gf = 1e9
    lines = [
        f"bench --video {' '.join(c['video']) if c['cameras'] > 1 else c['video']}: {c['frames']} frames "
        f"{c['img']}x{c['img']}" + (f" x {c['cameras']} cameras (one batch per frame)" if c['cameras'] > 1 else "")
        + f", {c['tasks']} tasks, "
        f"{c['source']}; keyframe every {c['keyframe_every']}, {split_text(c['split_layer'])}, "
        f"{c['device']} {c['threads']} threads",
        f"temporal thresholds: {c['temporal_thresholds']}"
        + ("" if r["calibration"] is None else "; κ " + ", ".join(f"{t} {k:.3g}" for t, k in r["calibration"]["scale"].items())),
        "",
        f"{'per frame':28s}{'ms':>10s}{'GFLOPs':>10s}   (ms: median over {c['passes']} passes of the per-frame mean"
        + (f", all {c['cameras']} cameras; GFLOPs: per image)" if c["cameras"] > 1 else ")"),
        f"{'independent (' + str(c['tasks']) + ' dense)':28s}{r['independent_ms']:10.2f}{r['flops']['independent'] / gf:10.3f}",
        f"{'engine, frame by frame':28s}{r['engine_ms']:10.2f}{r['flops']['engine'] / gf:10.3f}",
        f"{'stream':28s}{r['stream_ms']:10.2f}{r['flops']['stream'] / gf:10.3f}",
        "",
        f"stream / engine: FLOPs {r['stream_flops_ratio']:.3f}, time {r['stream_time_ratio']:.3f}"
        + (f" (passes {min(r['stream_time_ratio_passes']):.3f}-{max(r['stream_time_ratio_passes']):.3f})"
           if len(r["stream_time_ratio_passes"]) > 1 else "")
        + (f" (FLOPs on non-keyframes {r['stream_flops_ratio_non_keyframes']:.3f})"
           if r["stream_flops_ratio_non_keyframes"] is not None else "")
        + f" | engine / independent: FLOPs {r['flops_ratio']:.3f}, time {r['time_ratio']:.3f}",
        "",
        f"{'task':14s}{'rows recomputed':>16s}{'out rel err':>12s}" + (f"{'engine':>10s}{'stream':>10s}{'change':>9s}"
                                                                      if r["metrics"] else ""),
    ]
    for t in c["task_names"]:
        rows = r["rows_recomputed"][t]
        line = f"{t:14s}{'-' if rows is None else f'{rows:.3f}':>16s}{r['stream_output_rel_err'][t]:12.4f}"
        if r["metrics"]:
            m = r["metrics"][t]
            change = "-" if m["rel_change"] is None else f"{100 * m['rel_change']:+.2f}%"
            line += "".join("         -" if v is None else f"{v:10.4f}" for v in (m["engine"], m["stream"])) + f"{change:>9s}"
        lines.append(line)
    return "\n".join(lines)


@torch.no_grad()
def infer_video(workdir: str | Path, path: str | Path, out_dir: str | Path, keyframe_every: int | None = None,
                split_layer: int | None = None, tolerance: float = 0.01, fps: float = 8.0,
                log: Callable[[str], None] | None = None) -> Path:
    """Every task of a trained suite on a video through the stream: ``<out>/frames/<n>.png``
    (input + one picture per task) and ``<out>/animation.gif`` of the panels. Returns the GIF."""
    from PIL import Image

    from mtshare.visualize import colorize, save_panel, to_prediction

    log = log or (lambda s: None)
    path, out_dir = Path(path), Path(out_dir)
    video = _load(path, workdir, "", 0, "cpu")
    engine, frames, (ch, cw) = video.engine, video.frames, video.content
    keyframe_every, split_layer = stream_settings(engine, keyframe_every, split_layer)
    _, source, _ = temporal_thresholds(engine, video.store, [path], video.labelled, video.img_size, keyframe_every,
                                       split_layer, tolerance, log=log)
    log(f"{len(frames)} frames; temporal τ: {source}")
    stream = engine.stream(keyframe_every, split_layer)
    panels = []
    for f, frame in enumerate(frames):
        outputs = stream.push(frame)
        if video.rgb is not None:
            rgb = video.rgb[f]
        else:  # a labelled sequence was read through its loader: undo the normalisation for display
            from mtshare.data.transforms import IMAGENET_MEAN, IMAGENET_STD

            pixels = frame[:, :ch, :cw].permute(1, 2, 0).numpy() * IMAGENET_STD + IMAGENET_MEAN
            rgb = np.clip(pixels * 255, 0, 255).round().astype(np.uint8)
        pictures = {}
        for task, out in outputs.items():
            out = F.interpolate(out[:, :, :ch, :cw], size=rgb.shape[:2], mode="bilinear", align_corners=False)[0]
            pictures[task] = colorize(task, to_prediction(task, out))
        panel = out_dir / "frames" / f"{f:06d}.png"
        save_panel(panel, rgb, pictures)
        panels.append(panel)
    gif = out_dir / "animation.gif"
    images = [Image.open(p).convert("RGB") for p in panels]
    images[0].save(gif, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    (out_dir / "stream.json").write_text(json.dumps({"frames": len(panels), "keyframe_every": keyframe_every,
                                                     "split_layer": stream.split_layer,
                                                     "temporal_thresholds": source}, indent=1))
    return gif
