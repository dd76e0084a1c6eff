"""mtshare command line: ``python -m launcher <verb>``.

Each verb parses its arguments and calls one function. Exit codes: 0 success; 2 bad input
(config, paths, data) with one line on stderr naming the field or file; 1 failure while running.
"""
from __future__ import annotations

import argparse
import sys

from launcher import commands


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m launcher",
        description="mtshare: multi-task dense prediction with computation sharing (train, run, report, infer, bench).",
    )
    sub = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    data = sub.add_parser("data", help="synthesise or check a dataset in the real on-disk layout")
    dsub = data.add_subparsers(dest="data_verb", metavar="ACTION", required=True)
    s = dsub.add_parser("synth", help="write a synthetic dataset in the PASCAL-Context or NYUD-v2 layout")
    s.add_argument("--layout", required=True, choices=["pascal_context", "nyud"])
    s.add_argument("--out", required=True, help="output root directory")
    s.add_argument("--n", type=int, default=32, help="number of images (default 32)")
    s.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--sequences", type=int, help="write this many frame sequences (video) instead of still images")
    s.add_argument("--frames", type=int, default=16, help="frames per sequence (default 16)")
    s.add_argument("--camera", choices=["moving", "static"], default="moving",
                   help="sequences: camera motion (objects move either way; default moving)")
    c = dsub.add_parser("check", help="verify a dataset layout: splits, files, label ranges")
    c.add_argument("--dataset", required=True, choices=["pascal_context", "nyud"])
    c.add_argument("--root", required=True)

    r = sub.add_parser("run", help="run a suite (base, then sub-task pipelines in parallel) on local Ray or --address")
    r.add_argument("config")
    r.add_argument("--workdir", help="default ./runs/<suite name>")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.base.iters=50 (repeatable)")
    r.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    r.add_argument("--executor", choices=["ray", "inprocess"], default="ray",
                   help="ray (default) or inprocess: every stage in this process, no Ray/DeepSpeed")
    r.add_argument("--no-progress", action="store_true", help="plain log lines instead of the live table")

    sm = sub.add_parser("submit", help="submit a suite as a Ray Job to a running cluster and return")
    sm.add_argument("config")
    sm.add_argument("--address", required=True, help="Ray dashboard address, e.g. http://127.0.0.1:8265")
    sm.add_argument("--workdir")
    sm.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    sw = sub.add_parser("sweep", help="sparsity sweep on Ray Tune (one trial per sub-task x target); "
                        "`sweep pick` assembles the chosen operating points into a suite")
    sw.add_argument("config", help="suite config (YAML), or `pick`")
    sw.add_argument("--targets", default="0.8,0.9,0.95,0.98",
                    help="step1 target weight sparsities (default 0.8,0.9,0.95,0.98)")
    sw.add_argument("--row-densities", help="second axis: step3 train_row_density values (1 = off), e.g. 1,0.5")
    sw.add_argument("--tasks", help="sub-tasks to sweep (default: the config's tasks)")
    sw.add_argument("--workdir", help="default ./runs/<suite name>; `pick`: the sweep directory")
    sw.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    sw.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    sw.add_argument("--no-progress", action="store_true", help="plain log lines instead of the live table")
    sw.add_argument("--tolerance", type=float, default=0.01,
                    help="`pick`: relative metric loss allowed vs the task's reference (default 0.01)")
    sw.add_argument("--out", help="`pick`: the suite directory to write")

    for verb, text in (("status", "the stage table of a suite (from its state file)"),
                       ("resume", "finish a suite: verify finished stages, re-run failed or corrupt ones"),
                       ("report", "metrics / sparsity / FLOPs / Δm table (+ plots)")):
        v = sub.add_parser(verb, help=text)
        v.add_argument("--workdir", help="run directory (default: the only one under ./runs)")
        if verb in ("status", "report"):
            v.add_argument("--format", choices=["table", "json"], default="table")
        if verb == "report":
            v.add_argument("--tolerance", type=float, default=0.01,
                           help="a sweep: relative metric loss allowed for its chosen operating points")
        if verb == "resume":
            v.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                           help="fix the saved config first (not its tasks/steps); changed finished stages re-run")
            v.add_argument("--address", help="Ray cluster address (default: local Ray)")
            v.add_argument("--executor", choices=["ray", "inprocess"], default="ray")
            v.add_argument("--no-progress", action="store_true")

    i = sub.add_parser("infer", help="run every task of a trained suite on images; write PNG panels and .npy")
    i.add_argument("--workdir", required=True)
    src = i.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", nargs="+")
    src.add_argument("--video", help="a folder of frames or a video file: per-frame panels + animation.gif, "
                                     "through the temporal stream")
    i.add_argument("--out", required=True)
    i.add_argument("--keyframe-every", type=int, help="--video: a full frame every K frames (default: the suite's "
                                                       "stream setting, else 8)")
    i.add_argument("--split-layer", type=int, help="--video: sub-tasks use their own temporal caches from this "
                                                   "block on (default: the suite's, else half the depth)")

    b = sub.add_parser("bench", help="shared-inference benchmark: N dense models vs the shared engine")
    b.add_argument("--model", default="vit_small", choices=["vit_debug", "vit_tiny", "vit_small", "vit_base"])
    b.add_argument("--img", type=int, default=224)
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--tasks", type=int, default=5)
    b.add_argument("--sparsity", type=float, default=0.9)
    b.add_argument("--delta-gates", choices=["element", "column"], default="element",
                   help="synthetic deltas: zeros at random entries, or whole zero input columns (column gates)")
    b.add_argument("--workdir")
    b.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    b.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's default)")
    b.add_argument("--repeats", type=int, help="timed repeats (default: as many as fit in about 20 s; "
                                               "--video: 5 passes over the video)")
    b.add_argument("--format", choices=["table", "json"], default="table")
    b.add_argument("--video", nargs="+", help="a folder of frames or a video file: N dense models vs the engine frame "
                                              "by frame vs the temporal stream, per frame; several: one camera each, "
                                              "streamed together as one batch per frame")
    b.add_argument("--keyframe-every", type=int, help="--video: a full frame every K frames (default: the suite's "
                                                       "stream setting, else 8)")
    b.add_argument("--split-layer", type=int, help="--video: sub-tasks use their own temporal caches from this block "
                                                   "on (default: the suite's, else half the depth)")
    b.add_argument("--tolerance", type=float, default=0.01,
                   help="--video: relative metric loss allowed when calibrating temporal thresholds (default 0.01)")
    b.add_argument("--temporal-scale", type=float,
                   help="--video: uncalibrated temporal τ = this × each layer's typical frame-to-frame change "
                        "(synthetic benchmarks; no metric is checked)")

    u = sub.add_parser("ui", help="serve the MLflow UI of a run on 127.0.0.1")
    u.add_argument("--workdir")
    u.add_argument("--port", type=int, default=5000)
    u.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; see README before exposing)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return commands.dispatch(args) or 0
    except commands.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
