"""Video streams: share computation across frames as well as across tasks.

``engine.stream(keyframe_every=K, split_layer=l)`` (or ``VideoStream(engine, ...)``) is a
stateful stream over a :class:`~mtshare.engine.SharedEngine`; ``push(frame)`` returns
``{task: output}`` for one frame (or a batch of frames from parallel cameras).

- **Keyframe** (frame 0, K, 2K, …): the engine runs as it does on still images (base in full,
  sub-tasks through their task deltas) and every cache below is filled.
- **Other frames**: every row-wise layer of the encoder (the attention's qkv and proj, the MLP
  ``fc2(GELU(fc1(x)))`` as one unit, and the base's patch embedding) keeps, per task, the
  input rows it last computed and their outputs. A token row whose input moved by at least
  the layer's temporal τ since it was last computed (root mean square over the row) is recomputed and
  its cache entry replaced; the others keep their cached output. The base does this in every
  layer. A sub-task does it with its own merged weight ``W_b + M ⊙ δ`` in the blocks from
  ``split_layer`` on; in the blocks before, it takes its task delta over the base's
  (temporally updated) activations, as on a keyframe. The split layer can differ by task
  (``{task: layer}``): at ``split_layer = depth`` a sub-task runs as the engine does, over the
  base's streamed activations (the plan for a task whose own temporal caches do not pay).

Comparing with the row's *last computed* input rather than the previous frame's means a slow
drift below τ still triggers a recompute once it adds up to τ: each cached input row differs
from the true one by less than τ (RMS), however long ago the keyframe was (error does not
accumulate with time; keyframes reset it all the same). τ = 0 recomputes every row that
changed at all: the outputs are those of the engine run frame by frame.

The heads are gated the same way: their per-token projection, and the per-pixel MLPs of their
ConvNeXt blocks (rows = pixels, after the depthwise conv and norm). Layer norms, GELU,
residuals, the attention (softmax over all tokens), the heads' depthwise convs, output conv and
upsampling run in full on every frame; they are counted in the FLOPs as such.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F

from mtshare.engine import PATCH, SharedEngine, TaskStats, _SubTask
from mtshare.models.heads import UNSHUFFLE

__all__ = ["VideoStream", "calibrate_stream", "compact_split", "split_layers", "uncalibrated_thresholds"]


# One split layer for every sub-task, or one per sub-task (missing: half the depth); None: half the depth.
SplitLayer = int | Mapping[str, int] | None


def split_layers(engine: SharedEngine, split_layer: SplitLayer) -> dict[str, int]:
    """``{sub-task: split layer}`` for ``engine``'s sub-tasks, checked against its depth."""
    depth = engine.cfg.depth
    given = split_layer if isinstance(split_layer, Mapping) else {}
    default = depth // 2 if split_layer is None or isinstance(split_layer, Mapping) else split_layer
    out = {t: int(given.get(t, default)) for t in engine.tasks if t != engine.base_task}
    for t, layer in out.items():
        if not 0 <= layer <= depth:
            raise ValueError(f"split_layer of {t} must be in [0, {depth}], got {layer}")
    return out


def compact_split(layers: Mapping[str, int]) -> int | dict[str, int] | None:
    """``{task: split layer}`` as one number when every sub-task has the same (None: no sub-task)."""
    values = set(layers.values())
    return (values.pop() if len(values) == 1 else dict(layers)) if values else None


def _row_change(x: torch.Tensor, cached: torch.Tensor) -> torch.Tensor:
    """How far each row moved: the root mean square over the row of ``x - cached``.

    RMS, not max-abs: a moving object changes a token's whole row coherently, where sensor noise
    (fresh in every frame) puts its largest entry well above its typical one; the mean over the
    row separates the two. Measured on the vit_mini video demo (same holdout, same tolerance):
    the base recomputed 25 % of its rows between keyframes at -0.65 % mIoU on val, against 85 %
    at -0.08 % with max-abs (docs/benchmarks.md, "Video streams")."""
    return torch.linalg.vector_norm(torch.sub(x, cached), dim=1) / math.sqrt(x.shape[1])


@dataclass
class _RowCache:
    x: torch.Tensor  # [n, d_in] the input rows as last computed
    y: torch.Tensor  # [n, d_out] their outputs


class VideoStream:
    """A stateful video stream over ``engine`` (see the module docstring).

    ``thresholds``: temporal τ by task, then by layer (``patch_embed.proj``,
    ``blocks.<i>.attn.qkv``, ``blocks.<i>.attn.proj``, ``blocks.<i>.mlp``, ``head.proj``,
    ``head.blocks.<k>.mlp``); missing = 0 =
    recompute every row that changed. Defaults to ``engine.temporal_thresholds`` (what a suite
    stores). ``collect_stats``: count the executed FLOPs per frame (``last_flops``)."""

    def __init__(self, engine: SharedEngine, keyframe_every: int = 8, split_layer: SplitLayer = None,
                 thresholds: Mapping[str, Mapping[str, float]] | None = None, tasks: list[str] | None = None,
                 collect_stats: bool = False):
        if keyframe_every < 1:
            raise ValueError(f"keyframe_every must be >= 1, got {keyframe_every}")
        self.engine = engine
        self.keyframe_every = keyframe_every
        self.split_layers = split_layers(engine, split_layer)
        self.tasks = list(tasks) if tasks is not None else engine.tasks
        src = engine.temporal_thresholds if thresholds is None else thresholds
        self.thresholds = {t: {k: float(v) for k, v in src.get(t, {}).items()} for t in engine.tasks}
        self.collect_stats = collect_stats
        self.last_flops: dict[str, float] = {}  # executed FLOPs per image of the last frame, by task
        self.last_rows: dict[str, float | None] = {}  # rows recomputed on temporal layers (FLOPs-weighted)
        self.reset()

    def reset(self) -> None:
        """Forget every cache: the next frame is a keyframe."""
        self._cache: dict[tuple[str, str], _RowCache] = {}
        self._count = 0
        self._shape: tuple | None = None

    @property
    def frames_seen(self) -> int:
        return self._count

    @property
    def split_layer(self) -> int | dict[str, int]:
        """The split layer: one number when every sub-task has the same, else ``{task: layer}``."""
        split = compact_split(self.split_layers)
        return self.engine.cfg.depth // 2 if split is None else split  # (the base alone: nothing to split)

    def _routes(self, i: int, subs: list[_SubTask]) -> tuple[list[_SubTask], list[_SubTask]]:
        """Block ``i``'s sub-tasks as (those on the engine's task-delta path, those on their own
        temporal caches). On a keyframe all take the task-delta path; the own-cache ones then
        fill their caches from its outputs."""
        own = [s for s in subs if i >= self.split_layers[s.name]]
        return (subs if self._key else [s for s in subs if i < self.split_layers[s.name]]), own

    @torch.inference_mode()
    def push(self, frame: torch.Tensor) -> dict[str, torch.Tensor]:
        """One frame ``[3, H, W]`` (or ``[B, 3, H, W]``: B cameras) → ``{task: output}``."""
        eng = self.engine
        tasks, subs, x = eng._inputs(frame if frame.dim() == 4 else frame[None], self.tasks)
        key = self._count % self.keyframe_every == 0 or x.shape != self._shape
        if x.shape != self._shape:
            self.reset()
            self._shape = x.shape
        self._count += 1
        self._key = key
        b, _, H, W = x.shape
        p = eng.cfg.patch_size
        eng._stats = {t: TaskStats() for t in tasks} if self.collect_stats else {}
        eng._batch = b
        self._run: dict[str, list[float]] = {t: [0.0, 0.0] for t in tasks}  # rows run, rows in (weighted)

        # The base's patch embedding as a linear over patches, row-gated like every linear.
        # rows (c, kh, kw) like the conv weight; a reshape, not F.unfold (its im2col cost more than the GEMM)
        patches = x.reshape(b, -1, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b * (H // p) * (W // p), -1)
        w_pe = eng.base[f"{PATCH}.weight"].reshape(eng.cfg.embed_dim, -1)
        hb = self._rows(eng.base_task, PATCH, patches, lambda r: F.linear(r, w_pe, eng.base[f"{PATCH}.bias"]))
        hb, hs = eng._embed(x, subs, hb=hb.reshape(b, -1, eng.cfg.embed_dim))
        for i in range(eng.cfg.depth):
            hb, hs = eng._block(i, hb, hs, subs, linear=lambda *a, i=i: self._linear(i, *a),
                                mlp=lambda *a, i=i: self._mlp(i, *a))
        feats = {eng.base_task: hb, **hs}
        n_tok, h, w = hb.shape[1], H // p, W // p
        out = {}
        for t in tasks:
            out[t] = self._head(t, feats[t][:, 1:].transpose(1, 2).reshape(b, -1, h, w), (H, W))
            if t in eng._stats:  # attention runs in full, as does what the head does not gate
                attn = 4.0 * n_tok * n_tok * eng.cfg.embed_dim * eng.cfg.depth
                eng._stats[t].executed_flops += attn + eng._head_cost(t, h, w, H, W) - self._head_gated_flops(t, h, w)
        if self.collect_stats:
            self.last_flops = {t: eng._stats[t].executed_flops for t in tasks}
            self.last_rows = {t: (r / n if n else None) for t, (r, n) in self._run.items()}
        return out

    def _linear(self, i: int, name: str, x_b: torch.Tensor, xs: dict[str, torch.Tensor],
                subs: list[_SubTask]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        eng = self.engine
        w_b, b_b = eng.base[f"{name}.weight"], eng.base[f"{name}.bias"]
        y_b = self._rows(eng.base_task, name, x_b, lambda r: F.linear(r, w_b, b_b)).reshape(*x_b.shape[:-1], -1)
        shared, own = self._routes(i, subs)
        ys = eng._linear(name, x_b, xs, shared, y_b=y_b)[1] if shared else {}
        for s in own:  # sub-tasks on their own temporal caches (filled from the keyframe's outputs)
            w, bias = eng._merged(name, s.linears[name])
            y = self._rows(s.name, name, xs[s.name], lambda r, w=w, bias=bias: F.linear(r, w, bias),
                           keyframe_out=ys.get(s.name))
            ys[s.name] = y.reshape(*x_b.shape[:-1], -1)
        return y_b, ys

    def _mlp(self, i: int, name: str, x_b: torch.Tensor, xs: dict[str, torch.Tensor],
             subs: list[_SubTask]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The block's MLP ``fc2(GELU(fc1(x)))`` as one row-wise layer (``blocks.<i>.mlp``): a row
        whose input moved by τ runs both linears and the GELU, the others keep their output. One
        gate instead of two, and unchanged rows skip the GELU too. The base's cache keeps fc1's
        output beside the MLP's: sub-tasks that take their task deltas over the base (blocks
        before their split, and keyframes) need both."""
        eng = self.engine
        fc1, fc2 = f"{name}.fc1", f"{name}.fc2"
        hidden, d = eng.base[f"{fc1}.weight"].shape
        row_flops = 2.0 * 2 * d * hidden
        shape = x_b.shape[:-1]

        def unit(w1, b1, w2, b2, keep_hidden=False):
            def fn(r):
                h = F.linear(r, w1, b1)
                y = F.linear(F.gelu(h), w2, b2)
                return torch.cat([h, y], dim=-1) if keep_hidden else y
            return fn

        base = unit(*(eng.base[f"{fc}.{p}"] for fc in (fc1, fc2) for p in ("weight", "bias")), keep_hidden=True)
        out = self._rows(eng.base_task, name, x_b, base, row_flops=row_flops)
        y_b = out[:, hidden:].reshape(*shape, d)
        shared, own = self._routes(i, subs)
        ys: dict[str, torch.Tensor] = {}
        if shared:  # the engine's task-delta path, over the base's fc1 and fc2
            # (contiguous copies: that path writes its sums over them, measured 2x slower on views)
            hb, y_b = out[:, :hidden].reshape(*shape, hidden).contiguous(), y_b.contiguous()
            hs = eng._linear(fc1, x_b, xs, shared, y_b=hb)[1]
            ys = eng._linear(fc2, F.gelu(hb), {t: F.gelu(h) for t, h in hs.items()}, shared, y_b=y_b)[1]
        for s in own:  # its own cache (filled from the keyframe's output)
            fn = unit(*eng._merged(fc1, s.linears[fc1]), *eng._merged(fc2, s.linears[fc2]))
            y = self._rows(s.name, name, xs[s.name], fn, keyframe_out=ys.get(s.name), row_flops=row_flops)
            ys[s.name] = y.reshape(*shape, d)
        return y_b, ys

    def _head(self, task: str, feats: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """``DenseHead.forward`` with its per-token projection and its blocks' per-pixel MLPs
        row-gated like the encoder's layers (the 7x7 depthwise convs, norms, the 1x1 output conv
        and the upsampling run in full)."""
        head = self.engine.heads[task]
        b, d, h, w = feats.shape
        x = self._rows(task, "head.proj", feats.permute(0, 2, 3, 1), head.proj)
        x = F.pixel_shuffle(x.reshape(b, h, w, -1).permute(0, 3, 1, 2), UNSHUFFLE)
        for k, blk in enumerate(head.blocks):
            y = blk.norm(blk.dwconv(x).permute(0, 2, 3, 1))
            dim = y.shape[-1]
            y = self._rows(task, f"head.blocks.{k}.mlp", y, lambda r, blk=blk: blk.pwconv2(blk.act(blk.pwconv1(r))),
                           row_flops=2.0 * 2 * dim * blk.pwconv1.out_features)
            x = x + y.reshape(b, x.shape[2], x.shape[3], dim).permute(0, 3, 1, 2)
        return F.interpolate(head.out(x), size=size, mode="bilinear", align_corners=False)

    def _head_gated_flops(self, task: str, h: int, w: int) -> float:
        """Dense FLOPs per image of what :meth:`_head` gates (counted by rows instead)."""
        head = self.engine.heads[task]
        proj = 2.0 * h * w * head.proj.in_features * head.proj.out_features
        pixels = h * w * UNSHUFFLE * UNSHUFFLE
        mlp = sum(2.0 * 2 * pixels * blk.pwconv1.in_features * blk.pwconv1.out_features for blk in head.blocks)
        return proj + mlp

    def _rows(self, task: str, name: str, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor],
              keyframe_out: torch.Tensor | None = None, row_flops: float | None = None) -> torch.Tensor:
        """``fn(x)`` row by row through the cache of (task, layer): on a keyframe every row is
        computed (or ``keyframe_out`` taken as the result) and cached; on other frames only the
        rows whose input moved by τ or more since they were last computed. ``row_flops``: the
        cost of one row (default: a linear's, 2·d_in·d_out)."""
        x2 = x.reshape(-1, x.shape[-1])
        n, d_in = x2.shape
        cache = self._cache.get((task, name))
        if self._key or cache is None:
            y = fn(x2) if keyframe_out is None else keyframe_out.reshape(n, -1)
            self._cache[(task, name)] = _RowCache(x2.clone(), y.clone())
            self._count_flops(task, n, n, row_flops or 2.0 * d_in * y.shape[-1], counted=keyframe_out is not None)
            return y
        change = _row_change(x2, cache.x)
        tau = self.thresholds.get(task, {}).get(name, 0.0)
        idx = (change >= tau if tau > 0 else change > 0).nonzero().view(-1)
        if idx.numel():
            rows = x2.index_select(0, idx)
            cache.x.index_copy_(0, idx, rows)
            cache.y.index_copy_(0, idx, fn(rows))
        self._count_flops(task, idx.numel(), n, row_flops or 2.0 * d_in * cache.y.shape[-1])
        return cache.y

    def _count_flops(self, task: str, rows: int, n: int, row_flops: float, counted: bool = False) -> None:
        eng = self.engine
        if task not in eng._stats:
            return
        dense = row_flops * n / eng._batch
        if not counted:  # (a keyframe's sub-task rows come from the engine, which counted them)
            eng._stats[task].executed_flops += dense * rows / n
        self._run[task][0] += dense * rows / n
        self._run[task][1] += dense


# --- calibration --------------------------------------------------------------------------------


def _change_scales(engine: SharedEngine, clips: Iterable[torch.Tensor], keyframe_every: int, split_layer: SplitLayer,
                   thresholds: Mapping[str, Mapping[str, float]], tasks: list[str]) -> dict[str, dict[str, float]]:
    """Per task and layer, the median over rows of the RMS change of the layer's input
    between consecutive frames, streamed over ``clips`` (τ = 0 but for ``thresholds``): a row's
    typical change (on a still background mostly sensor noise), the unit in which τ is set."""
    stream = VideoStream(engine, keyframe_every, split_layer, thresholds=thresholds, tasks=tasks)
    changes: dict[tuple[str, str], list[torch.Tensor]] = {}
    rows = stream._rows

    def spy(task, name, x, fn, **kw):
        cache = stream._cache.get((task, name))
        if not stream._key and cache is not None:
            changes.setdefault((task, name), []).append(_row_change(x.reshape(-1, x.shape[-1]), cache.x).float())
        return rows(task, name, x, fn, **kw)

    stream._rows = spy
    for clip in clips:
        stream.reset()
        for frame in clip:
            stream.push(frame)
    out: dict[str, dict[str, float]] = {}
    for (task, name), parts in changes.items():
        out.setdefault(task, {})[name] = float(torch.cat(parts).median())
    return out


def uncalibrated_thresholds(engine: SharedEngine, frames: torch.Tensor, scale: float, keyframe_every: int,
                            split_layer: SplitLayer) -> dict[str, dict[str, float]]:
    """τ = ``scale`` × each layer's typical frame-to-frame change on ``frames`` (no metric is
    checked: synthetic benchmarks); sets and returns ``engine.temporal_thresholds``."""
    changes = _change_scales(engine, [frames], keyframe_every, split_layer, {}, engine.tasks)
    engine.temporal_thresholds = {t: {k: scale * v for k, v in layers.items()} for t, layers in changes.items()}
    return engine.temporal_thresholds


# (task, the clips' indices, the outputs of their frames, clip after clip) -> value, higher = better
MetricFn = Callable[[str, list[int], list[torch.Tensor]], float]


def calibrate_stream(engine: SharedEngine, clips: list[torch.Tensor], metric: MetricFn, tolerance: float = 0.01,
                     *, keyframe_every: int = 8, split_layer: SplitLayer = None, steps: int = 8,
                     scale_range: tuple[float, float] = (0.05, 20.0), tasks: list[str] | None = None,
                     log: Callable[[str], None] | None = None) -> dict:
    """Temporal τ for every task and layer such that each task's metric, streamed over ``clips``
    (frames ``[T, 3, H, W]`` each), stays within ``tolerance`` (relative) of the same stream's
    metric at τ = 0; sets ``engine.temporal_thresholds`` and returns ``{"scale": {task: κ},
    "thresholds", "metric_ref", "metric", "split_layer", "keyframe_every"}``.

    The reference is the stream at τ = 0, not the engine frame by frame: from ``split_layer`` on
    a sub-task recomputes rows with its exact merged weight, where the engine at its operating
    point skips task-delta rows, so the two differ by up to the task calibration's tolerance
    (either way: on a few dozen frames edge ODS-F moved by 1.8 % between them). τ must not pay
    for that difference; ``bench --video`` reports the stream's metric beside the engine's.

    ``metric(task, clip_indices, outputs)``: the task's value (higher = better) over the frames
    of those clips (pool them: a task's meter over the whole set, as the report does).

    One knob κ per task: τ of a layer = κ · (median over its rows of the RMS frame-to-frame
    change of its input on these clips), so κ means the same on every layer (about half the
    rows change by more than κ = 1). A bisection on log κ per task (all tasks in one streamed
    pass per step) keeps the largest feasible κ (the fewest rows recomputed); a task never
    feasible keeps τ = 0. Feasible means on all clips together AND on each clip alone, as in
    :func:`mtshare.operating_point.calibrate_task`: a noisy metric (edge ODS-F on a few dozen
    frames) passes on one set by luck far more often than on each of its parts. The base's τ feeds the sub-tasks (patch
    embedding, blocks before ``split_layer``): a last pass checks the chosen κ together and
    halves those that fail (at most 3 times; then τ = 0 for them).

    ``tasks``: calibrate only these (and stream only their heads); the others keep their
    ``engine.temporal_thresholds`` (a suite calibrates the base first, then each sub-task on
    top of it).
    """
    split_layer = compact_split(split_layers(engine, split_layer))  # checked; one number if all equal
    tasks = list(tasks) if tasks is not None else engine.tasks
    fixed = {t: dict(v) for t, v in engine.temporal_thresholds.items() if t not in tasks}
    parts = [list(range(len(clips)))] + ([[c] for c in range(len(clips))] if len(clips) > 1 else [])
    log = log or (lambda _: None)

    def score(outputs_by_clip) -> dict[str, list[float]]:  # per task: all clips, then each clip alone
        return {t: [metric(t, part, [out[t] for c in part for out in outputs_by_clip[c]]) for part in parts]
                for t in tasks}

    scales = _change_scales(engine, clips, keyframe_every, split_layer, fixed, tasks)

    def run(kappa: dict[str, float]) -> tuple[dict, dict[str, list[float]]]:
        th = {**fixed, **{t: {k: kappa[t] * v for k, v in scales.get(t, {}).items()} for t in tasks if kappa.get(t)}}
        stream = VideoStream(engine, keyframe_every, split_layer, thresholds=th, tasks=tasks)
        outs = []
        for clip in clips:
            stream.reset()
            outs.append([stream.push(frame) for frame in clip])
        return th, score(outs)

    def feasible(t: str, m: dict[str, list[float]]) -> bool:
        return all(math.isfinite(v) and v >= r - tolerance * abs(r) for v, r in zip(m[t], reference[t]))

    _, reference = run({t: 0.0 for t in tasks})
    lo = {t: math.log(scale_range[0]) for t in tasks}
    hi = {t: math.log(scale_range[1]) for t in tasks}
    kappa = {t: 0.0 for t in tasks}
    for step in range(steps):
        mid = {t: (lo[t] + hi[t]) / 2 for t in tasks}
        _, m = run({**kappa, **{t: math.exp(v) for t, v in mid.items()}})
        for t in tasks:
            if feasible(t, m):
                lo[t], kappa[t] = mid[t], math.exp(mid[t])
            else:
                hi[t] = mid[t]
        log(f"stream calibration {step + 1}/{steps}: κ " + ", ".join(f"{t} {k:.3g}" for t, k in kappa.items()))
    for _ in range(3):
        th, m = run(kappa)
        failing = [t for t in tasks if kappa[t] and not feasible(t, m)]
        if not failing:
            break
        for t in failing:
            kappa[t] /= 2
    else:
        for t in [t for t in tasks if kappa[t] and not feasible(t, m)]:
            kappa[t] = 0.0
        th, m = run(kappa)
    engine.temporal_thresholds = th
    return {"scale": kappa, "thresholds": th, "metric_ref": {t: v[0] for t, v in reference.items()},
            "metric": {t: v[0] for t, v in m.items()}, "split_layer": split_layer, "keyframe_every": keyframe_every}
