"""Run a whole suite in this process, stage after stage (no Ray): the library-level entry point
for tests and notebooks. ``cluster/`` runs the same stages distributed.

Stage outputs live under ``<store>/<stage name>/`` (``model.safetensors``, ``result.json``);
the store is a local directory here.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from mtshare.config import SuiteConfig
from mtshare.data import synthesize
from mtshare.stages import StageSpec, plan
from mtshare.train import Trainer


def ensure_dataset(cfg: SuiteConfig) -> None:
    """Generate the synthetic dataset on first use when the config asks for it."""
    root = Path(cfg.dataset.root)
    s = cfg.dataset.synthesize
    if s is not None and not root.exists():
        synthesize(cfg.dataset.name, root, n=s.n, size=s.size, seed=s.seed)


def run_stage(spec: StageSpec, store: Path, base_sha256: str | None = None,
              on_log: Callable[[dict, int], None] | None = None, **trainer_kwargs) -> dict:
    """Train one stage from/to a local store directory; returns its result dict."""
    trainer = Trainer(
        spec, out_dir=store / spec.output_dir_key,
        base_path=store / spec.base_key if spec.base_key else None, base_sha256=base_sha256,
        prev_path=store / spec.prev_key if spec.prev_key else None, on_log=on_log, **trainer_kwargs,
    )
    return trainer.train()


def run_suite_inprocess(cfg: SuiteConfig, workdir: str | Path, log: Callable[[str], None] = print) -> dict[str, dict]:
    """Train every stage of the suite in dependency order; returns results by stage name.
    Stages whose ``result.json`` already exists are skipped (a cheap resume)."""
    store = Path(cfg.storage or Path(workdir) / "store")
    ensure_dataset(cfg)
    results: dict[str, dict] = {}
    for spec in plan(cfg):
        done = store / spec.output_dir_key / "result.json"
        if done.exists():
            results[spec.name] = json.loads(done.read_text())
            continue
        log(f"[{spec.name}] training {spec.optim.iters} iterations")
        base_sha = results["base"]["checksum"] if spec.base_key else None
        results[spec.name] = run_stage(spec, store, base_sha256=base_sha)
        r = results[spec.name]
        log(f"[{spec.name}] {r['metric_name']} = {r['metric']:.4f}"
            + (f", delta sparsity {r['delta_weight_sparsity']:.3f}" if r.get("delta_weight_sparsity") is not None else ""))
    return results
