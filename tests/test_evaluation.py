"""Sharded evaluation (``mtshare.evaluation.Ranks``): shares that cover a split, and meters,
gathers and τ fits over two real gloo processes equal to one process on the whole split."""
from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mtshare.evaluation import Ranks


def _ranks(rank: int, world: int) -> Ranks:
    r = Ranks.single()
    r.rank, r.world_size = rank, world
    return r


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shares_are_contiguous_disjoint_and_cover_the_split(world):
    for n in range(0, 11):
        shares = [_ranks(r, world).share(n) for r in range(world)]
        assert [i for s in shares for i in s] == list(range(n))  # in order, each index once
        sizes = _ranks(0, world).sizes(n)
        assert sizes == [len(s) for s in shares] and max(sizes) - min(sizes) <= 1


def _data(n: int = 7):
    g = torch.Generator().manual_seed(0)
    seg_pred, seg_gt = torch.randn(n, 5, 12, 12, generator=g), torch.randint(0, 5, (n, 12, 12), generator=g)
    seg_gt[:, :2] = 255
    edge_pred = torch.randn(n, 1, 24, 24, generator=g) * 3
    edge_gt = (torch.rand(n, 24, 24, generator=g) > 0.9).long()
    rows = torch.rand(n * 10, generator=g)
    return seg_pred, seg_gt, edge_pred, edge_gt, rows


def _figures(ranks: Ranks) -> dict:
    from mtshare.engine import _tau_for_density
    from mtshare.metrics import MIoUMeter, ODSFMeter

    seg_pred, seg_gt, edge_pred, edge_gt, rows = _data()
    share = ranks.share(seg_pred.shape[0])
    miou, odsf = MIoUMeter(5), ODSFMeter(n_thresholds=9)
    miou.update(seg_pred[share.start:share.stop], seg_gt[share.start:share.stop])
    odsf.update(edge_pred[share.start:share.stop], edge_gt[share.start:share.stop])
    local_rows = rows.view(-1, 10)[share.start:share.stop].reshape(-1, 1)  # one magnitude per token row
    return {"miou": ranks.merge(miou).compute(), "odsf": ranks.merge(odsf).compute(),
            "rows": ranks.gather(local_rows.flatten()).tolist(),
            "tau": _tau_for_density(local_rows, 0.3, "token", ranks),
            "count": ranks.sum_floats(len(share))[0], "objects": ranks.gather_objects(ranks.rank),
            "broadcast": ranks.broadcast_object(f"from {ranks.rank}")}


def _worker(rank: int, world: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        figures = _figures(Ranks())
        if rank == 0:
            with open(out, "w") as f:
                json.dump(figures, f)
        dist.barrier()  # neither rank tears its connections down while the other still uses them
    finally:
        dist.destroy_process_group()


def test_two_processes_pool_meters_and_fit_tau_as_one_process(tmp_path):
    out = tmp_path / "figures.json"
    mp.spawn(_worker, args=(2, str(tmp_path / "rendezvous"), str(out)), nprocs=2, join=True)
    pooled = json.loads(out.read_text())
    one = _figures(Ranks.single())
    assert pooled["miou"] == one["miou"] and pooled["odsf"] == one["odsf"]
    assert pooled["rows"] == one["rows"]  # gathered in the split's order
    assert pooled["tau"] == one["tau"]
    assert pooled["count"] == 7 and pooled["objects"] == [0, 1] and pooled["broadcast"] == "from 0"


def test_status_shows_a_stage_evaluation_phase():
    from rich.console import Console

    from cluster.progress import phase_note, render_state

    stage = {"name": "edge/step3", "status": "running", "attempts": 1, "iteration": 10, "iters": 10,
             "phase": {"phase": "val_at_tau", "done": 96, "total": 1277, "ranks": 4}}
    assert phase_note(stage) == "val_at_tau 96/1277 images (rank 0 of 4)"
    assert phase_note({**stage, "phase": {"phase": "calibrate", "done": 4, "total": 11, "ranks": 4}}) == "calibrate 4/11"
    assert phase_note({**stage, "phase": None}) == ""
    console = Console(width=200, record=True)
    console.print(render_state({"suite": "s", "state": "running", "stages": [stage]}, live=False))
    assert "val_at_tau 96/1277 images (rank 0 of 4)" in console.export_text()
    console = Console(width=200, record=True)
    console.print(render_state({"suite": "s", "state": "done", "stages": [{**stage, "status": "done"}]}, live=False))
    assert "val_at_tau" not in console.export_text()  # a finished stage shows no phase
