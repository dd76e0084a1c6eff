"""One function per verb. Bad input raises :class:`UserError` (exit 2, one line on stderr)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mtshare.checkpoint import CheckpointError
from mtshare.config import ConfigError


class UserError(Exception):
    """Bad input: config, paths, data. The message names the field or file."""


NOT_BUILT = "'{verb}' is not built yet in this version of mtshare (see the README's roadmap)"


def dispatch(args: argparse.Namespace) -> int:
    handler = {
        "data": cmd_data, "run": cmd_run, "status": cmd_status, "resume": cmd_resume, "report": cmd_report,
        "submit": cmd_submit, "infer": cmd_infer, "bench": cmd_bench, "ui": cmd_ui, "sweep": cmd_sweep,
    }[args.verb]
    try:
        return handler(args)
    except (ConfigError, CheckpointError) as e:
        raise UserError(str(e)) from None
    except Exception as e:  # DataError lives in mtshare.data; imported lazily (heavy imports)
        from mtshare.data import DataError

        if isinstance(e, DataError):
            raise UserError(str(e)) from None
        raise


def cmd_data(args) -> int:
    from mtshare.data import check_dataset, synthesize, synthesize_sequences

    if args.data_verb == "synth" and args.sequences is not None:
        out = synthesize_sequences(args.layout, args.out, sequences=args.sequences, frames=args.frames,
                                   size=args.size, seed=args.seed, camera=args.camera)
        print(f"wrote {args.sequences} synthetic {args.layout} sequences of {args.frames} frames "
              f"({args.size}x{args.size}, {args.camera} camera) to {out}")
        return 0
    if args.data_verb == "synth":
        if args.n < 2 or args.size < 16:
            raise UserError("data synth: need --n >= 2 and --size >= 16")
        out = synthesize(args.layout, args.out, n=args.n, size=args.size, seed=args.seed)
        print(f"wrote {args.n} synthetic {args.layout} scenes ({args.size}x{args.size}) to {out}")
        return 0
    root = Path(args.root)
    if not root.is_dir():
        raise UserError(f"{root}: dataset root not found")
    print(check_dataset(args.dataset, root))
    return 0


def default_workdir(workdir: str | None) -> Path:
    """``--workdir`` or, when omitted, the only suite under ./runs."""
    if workdir:
        return Path(workdir)
    runs = sorted(p for p in Path("runs").glob("*") if p.is_dir()) if Path("runs").is_dir() else []
    if len(runs) == 1:
        return runs[0]
    if not runs:
        raise UserError("--workdir: no run directory given and none under ./runs")
    raise UserError(f"--workdir: several runs under ./runs ({', '.join(p.name for p in runs)}); name one")


def cmd_run(args) -> int:
    from mtshare.config import load_suite_config

    raw_workdir = args.workdir
    cfg = load_suite_config(args.config, args.overrides, workdir=raw_workdir)
    workdir = Path(raw_workdir or Path("runs") / cfg.name)
    from cluster.run import run_suite

    return run_suite(cfg, workdir, config_path=args.config, overrides=args.overrides, address=args.address,
                     progress=not args.no_progress, executor=args.executor)


def cmd_resume(args) -> int:
    workdir = default_workdir(args.workdir)
    from cluster.sweep import is_sweep

    if is_sweep(workdir):  # the same sweep again: finished trials kept, the rest run
        from cluster.sweep import load_sweep, run_sweep

        if args.overrides or args.executor != "ray":
            raise UserError("resume of a sweep takes no --set or --executor: run `launcher sweep` with the changed "
                            "config into another --workdir")
        cfg, meta = load_sweep(workdir)
        return run_sweep(cfg, workdir, meta["tasks"], meta["targets"], meta["row_densities"], address=args.address,
                         progress=not args.no_progress, config_path=meta.get("config_path"),
                         overrides=meta.get("overrides"))
    from cluster.run import resume_suite

    return resume_suite(workdir, address=args.address, executor=args.executor, progress=not args.no_progress,
                        overrides=args.overrides)


def cmd_status(args) -> int:
    from cluster.progress import show_status
    from cluster.sweep import is_sweep

    workdir = default_workdir(args.workdir)
    if is_sweep(workdir):
        from cluster.sweep_report import sweep_status

        status = sweep_status(workdir)
        if args.format == "json":
            print(json.dumps(status))
        else:
            for t in status["trials"]:
                print(f"{t['trial']:24s} {t['state'] or 'pending':8s} {t['steps_done']}/{t['steps']} steps"
                      + (f"  {t['error']}" if t.get("error") else ""))
        return 0
    return show_status(workdir, fmt=args.format)


def cmd_sweep(args) -> int:
    from cluster.sweep import parse_fractions, run_sweep

    if not 0 < args.tolerance < 1:
        raise UserError(f"--tolerance: must be in (0, 1), got {args.tolerance:g}")
    if args.config == "pick":
        from cluster.sweep_report import pick

        if not args.workdir or not args.out:
            raise UserError("sweep pick: give --workdir SWEEP_DIR and --out SUITE_DIR")
        out = pick(_sweep_dir(Path(args.workdir)), Path(args.out), args.tolerance)
        print(f"picked suite written to {out}; try: python -m launcher report --workdir {out}")
        return 0
    from mtshare.config import load_suite_config

    targets = parse_fractions(args.targets, "--targets", upper_inclusive=False)
    rows = parse_fractions(args.row_densities, "--row-densities", upper_inclusive=True) if args.row_densities else None
    cfg = load_suite_config(args.config, args.overrides, workdir=args.workdir)
    workdir = Path(args.workdir or Path("runs") / cfg.name)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    return run_sweep(cfg, workdir, tasks, targets, rows, address=args.address, progress=not args.no_progress,
                     config_path=args.config, overrides=args.overrides)


def _sweep_dir(workdir: Path) -> Path:
    from cluster.sweep import is_sweep

    if not is_sweep(workdir):
        raise UserError(f"--workdir {workdir}: not a sweep directory (no sweep.json)")
    return workdir


def cmd_report(args) -> int:
    from mtshare.report import build_report, format_report, load_results

    workdir = default_workdir(args.workdir)
    from cluster.sweep import is_sweep

    if is_sweep(workdir):
        return _report_sweep(workdir, args)
    store = _local_store(workdir)
    results = load_results(store)
    if not results:
        raise UserError(f"{workdir}: no finished stages found (looked for result.json under {store})")
    report = build_report(results)
    plots = write_report_plots(workdir, store, results)
    if args.format == "json":
        print(json.dumps(json_safe(report)))
    else:
        print(format_report(report))
        print("plots: " + ", ".join(str(p) for p in plots))
    return 0


def _report_sweep(workdir: Path, args) -> int:
    from cluster.sweep_report import format_sweep, sweep_report, write_sweep_plots

    if not 0 < args.tolerance < 1:
        raise UserError(f"--tolerance: must be in (0, 1), got {args.tolerance:g}")
    report = sweep_report(workdir, args.tolerance)
    plots = write_sweep_plots(workdir, report)
    if args.format == "json":
        print(json.dumps(json_safe({k: report[k] for k in ("tasks", "suite", "sweep")})))
    else:
        print(format_sweep(report))
        print("plots: " + ", ".join(str(p) for p in plots))
    return 0


def json_safe(obj):
    """NaN / inf (undefined metrics) become null: the output stays valid JSON."""
    import math

    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [json_safe(v) for v in obj]
    return obj


def write_report_plots(workdir: Path, store: Path, results: dict) -> list[Path]:
    from mtshare.plots import accuracy_vs_flops, layer_sparsity

    out = workdir / "report"
    out.mkdir(parents=True, exist_ok=True)
    return [accuracy_vs_flops(results, out / "accuracy_vs_flops.png"), layer_sparsity(store, results, out / "layer_sparsity.png")]


def _local_store(workdir: Path) -> Path:
    """The store of a run, read through the suite's storage (S3 or a shared root) into a
    verified local cache when it lives elsewhere (:func:`cluster.workdir.local_store`)."""
    from cluster.workdir import local_store

    return local_store(workdir)


def cmd_submit(args) -> int:
    from cluster.submit import submit_suite
    from mtshare.config import load_suite_config

    cfg = load_suite_config(args.config, args.overrides, workdir=args.workdir)
    return submit_suite(cfg, args)


def cmd_infer(args) -> int:
    from mtshare.infer import infer_images

    workdir = Path(args.workdir)
    if not _local_store(workdir).is_dir():
        raise UserError(f"{workdir}: not a run directory (no store/)")
    if args.video:
        from mtshare.bench import BenchInputError
        from mtshare.video import infer_video

        if args.keyframe_every is not None and args.keyframe_every < 1:
            raise UserError(f"--keyframe-every: must be >= 1, got {args.keyframe_every}")
        try:
            gif = infer_video(workdir, args.video, args.out, args.keyframe_every, args.split_layer,
                              log=lambda s: print(s, file=sys.stderr))
        except BenchInputError as e:
            raise UserError(str(e)) from None
        print(gif)
        return 0
    for img in args.images:
        if not Path(img).is_file():
            raise UserError(f"{img}: image not found")
    panels = infer_images(workdir, args.images, args.out)
    for p in panels:
        print(p)
    return 0


def cmd_bench(args) -> int:
    from mtshare.bench import BenchInputError, format_table, run_bench

    try:
        if args.workdir:
            _local_store(Path(args.workdir))
        if args.threads is not None and args.threads < 1:
            raise BenchInputError(f"--threads: must be >= 1, got {args.threads}")
        if args.repeats is not None and args.repeats < 1:
            raise BenchInputError(f"--repeats: must be >= 1, got {args.repeats}")
        if args.video:
            from mtshare.video import bench_video, format_video_table

            result = bench_video(args.video, args.workdir, args.model, args.img, args.keyframe_every, args.split_layer,
                                 args.tolerance, args.device, args.threads, temporal_scale=args.temporal_scale,
                                 passes=5 if args.repeats is None else args.repeats, log=(lambda s: None) if args.format == "json" else (lambda s: print(s, file=sys.stderr)))
            print(json.dumps(json_safe(result)) if args.format == "json" else format_video_table(result))
            return 0
        result = run_bench(args.model, args.img, args.batch, args.tasks, args.sparsity, args.workdir, args.device,
                           threads=args.threads, repeats=args.repeats, delta_gates=args.delta_gates,
                           log=(lambda s: None) if args.format == "json" else (lambda s: print(s, file=sys.stderr)))
    except BenchInputError as e:
        raise UserError(str(e)) from None
    print(json.dumps(result) if args.format == "json" else format_table(result))
    return 0


def cmd_ui(args) -> int:
    from cluster.ui import serve_ui

    return serve_ui(default_workdir(args.workdir), host=args.host, port=args.port)
