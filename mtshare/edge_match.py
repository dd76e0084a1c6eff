"""ODS-F's boundary matching (the BSDS C matcher), per image and threshold, in this process or
in a pool of processes. numpy only: the pool's processes do not import torch."""
from __future__ import annotations

import numpy as np

MATCH_SEED = 1  # the BSDS matcher's random seed, set before every match

_SEEDED_MATCHER = None


def seeded_correspond_pixels():
    """``pyEdgeEval._lib.correspond_pixels``, made deterministic.

    The BSDS matcher draws its sparse graph of outlier edges from one C++ global generator,
    ``Random::rand``, which it seeds from the clock when the library loads; its Python API
    has no seed. So the same two maps could match a few pixels differently from call to call,
    and an edge metric moved by about ±0.3 % from run to run (the demo's ODS-F), which the
    operating-point calibrations then bisected on. The generator's methods are exported
    symbols of the extension, so we reseed it (``Random::reseed(MATCH_SEED)``, through ctypes)
    before every match: a match is a function of its two maps. Where the symbols are missing
    (another build), the matcher stays clock-seeded and a warning says so."""
    global _SEEDED_MATCHER
    if _SEEDED_MATCHER is None:
        import ctypes
        import sys
        import warnings

        from pyEdgeEval._lib import correspond_pixels

        try:
            lib = ctypes.CDLL(sys.modules["pyEdgeEval._lib.correspond_pixels"].__file__)
            generator = ctypes.addressof(ctypes.c_char.in_dll(lib, "_ZN6Random4randE"))  # Random::rand
            reseed = lib._ZN6Random6reseedEm  # Random::reseed(u_int64_t), `this` first (Itanium C++ ABI)
            reseed.argtypes, reseed.restype = [ctypes.c_void_p, ctypes.c_uint64], None
        except (OSError, AttributeError, ValueError, KeyError) as e:
            warnings.warn(f"pyEdgeEval: cannot seed the BSDS matcher ({e}); edge F-measures may vary by a few "
                          f"matched pixels from run to run", RuntimeWarning, stacklevel=2)
            _SEEDED_MATCHER = correspond_pixels
        else:
            def seeded(img0, img1, **kwargs):
                reseed(generator, MATCH_SEED)
                return correspond_pixels(img0, img1, **kwargs)
            _SEEDED_MATCHER = seeded
    return _SEEDED_MATCHER


_MATCH_PROCESSES = 1
_POOL = None


def set_num_processes(n: int) -> None:
    """How many processes :class:`ODSFMeter` may match edge maps in (like ``torch.set_num_threads``:
    a stage worker gives it the CPUs it holds). 1: in this process. The figures do not depend on
    it: every (image, threshold) match is a function of its two maps."""
    global _MATCH_PROCESSES, _POOL
    n = max(1, int(n))
    if n != _MATCH_PROCESSES and _POOL is not None:
        _POOL.shutdown()
        _POOL = None
    _MATCH_PROCESSES = n


def _pool():
    global _POOL
    if _POOL is None:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        # spawn: forking a process that runs torch / gloo threads is not safe
        _POOL = ProcessPoolExecutor(_MATCH_PROCESSES, mp_context=mp.get_context("spawn"))
    return _POOL


def _match_thresholds(prob: np.ndarray, gt: np.ndarray, thresholds: np.ndarray, max_dist: float,
                      thin: bool) -> np.ndarray:
    """Rows (matched predicted, predicted, matched GT) per threshold of one image's map."""
    from pyEdgeEval.preprocess import binary_thin  # the C extension: only where edges are evaluated

    correspond_pixels = seeded_correspond_pixels()
    n_gt = int(gt.sum())
    rows = np.zeros((len(thresholds), 3), dtype=np.int64)
    last_raw_count, last_row = -1, None
    for i, t in enumerate(thresholds):
        binary = prob >= t
        raw_count = int(binary.sum())
        # Thresholds rise, so maps are nested: an equal pixel count means the same map.
        if raw_count == last_raw_count:
            rows[i] = last_row
            continue
        if thin and raw_count:
            binary = binary_thin(binary)
        n_pred = int(binary.sum())
        matched_pred = matched_gt = 0
        if n_pred and n_gt:
            match_pred, match_gt, _, _ = correspond_pixels(binary, gt, max_dist=max_dist)
            matched_pred, matched_gt = int((match_pred > 0).sum()), int((match_gt > 0).sum())
        rows[i] = (matched_pred, n_pred, matched_gt)
        last_raw_count, last_row = raw_count, rows[i]
    return rows


def _match_images(probs: np.ndarray, gts: np.ndarray, thresholds: np.ndarray, max_dist: float,
                  thin: bool) -> list[tuple[int, np.ndarray]]:
    """``(GT edge pixels, rows per threshold)`` of each image. With several processes the
    (image, threshold chunk) pieces run in the pool: low thresholds cost most (more predicted
    pixels), so each image's thresholds are cut into a few chunks per process."""
    if _MATCH_PROCESSES == 1 or not len(probs):
        return [(int(g.sum()), _match_thresholds(p, g, thresholds, max_dist, thin)) for p, g in zip(probs, gts)]
    n_chunks = min(len(thresholds), max(1, -(-4 * _MATCH_PROCESSES // len(probs))))
    cuts = np.array_split(np.arange(len(thresholds)), n_chunks)
    pieces = [(p, g, thresholds[c], max_dist, thin) for p, g in zip(probs, gts) for c in cuts]
    done = list(_pool().map(_match_thresholds, *zip(*pieces)))
    return [(int(g.sum()), np.concatenate(done[i * n_chunks:(i + 1) * n_chunks])) for i, g in enumerate(gts)]
