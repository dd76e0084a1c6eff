"""One stage in this process, from and to a local store directory (the library-level entry
point for notebooks and tests), and the synthetic dataset on first use. A whole suite runs
through ``cluster`` — distributed, or in this process with ``launcher run --executor
inprocess`` — so there is one driver and one in-process path.

Stage outputs live under ``<store>/<stage name>/`` (``model.safetensors``, ``result.json``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from mtshare.config import SuiteConfig
from mtshare.data import synthesize, synthesize_sequences
from mtshare.stages import StageSpec
from mtshare.train import Trainer


def ensure_dataset(cfg: SuiteConfig) -> None:
    """Generate the synthetic dataset on first use when the config asks for it."""
    root = Path(cfg.dataset.root)
    s = cfg.dataset.synthesize
    if s is not None and not root.exists():
        if s.sequences:
            synthesize_sequences(cfg.dataset.name, root, sequences=s.sequences, frames=s.frames, size=s.size,
                                 seed=s.seed, camera=s.camera)
        else:
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
