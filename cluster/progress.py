"""Live stage progress (rich) and the ``status`` table: stage, status, node, attempts, step i/N,
ETA, time, note. ``--no-progress`` prints plain lines instead: one per transition, and a
progress line per running stage at most every ``PLAIN_EVERY_S`` seconds."""
from __future__ import annotations

import time

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

STYLE = {"pending": "dim", "running": "yellow", "done": "green", "failed": "bold red"}
PLAIN_EVERY_S = 15.0


def _short_node(st: dict) -> str:
    node = st.get("node")
    if not node:
        return "-"
    host = st.get("host")
    short = node.split(":")[-1][:8]
    return f"{host}/{short}" if host and not node.startswith("local:") else short


def _clock(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "-"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


def phase_note(st: dict) -> str:
    """A running stage's end-of-stage evaluation phase, e.g. ``calibrate 4/11`` or ``val_at_tau
    96/1277 images (rank 0 of 4)``; "" while it trains."""
    ph = st.get("phase")
    if not ph:
        return ""
    unit = "" if ph["phase"] in ("calibrate", "stream_calibrate") else (" frames" if "stream" in ph["phase"] else " images")
    share = f" (rank 0 of {ph['ranks']})" if unit and (ph.get("ranks") or 1) > 1 else ""
    return f"{ph['phase']} {ph['done']}/{ph['total']}{unit}{share}"


def render_state(state: dict, live: bool = True, etas: dict[str, float] | None = None) -> Group:
    """The stage table of a state dict (``state.json``)."""
    etas = etas or {}
    now = time.time()
    table = Table(title=f"suite {state['suite']}: {state['state']}", title_justify="left", expand=False)
    for col in ("stage", "status", "node", "att", "step", "ETA", "time", "note"):
        table.add_column(col, no_wrap=col != "note", overflow="fold" if col == "note" else "ellipsis",
                         max_width=60 if col == "note" else None)
    for st in state["stages"]:
        started, ended = st.get("started"), st.get("ended")
        elapsed = (ended or now) - started if started and st["status"] in ("running", "done", "failed") else None
        step = f"{st.get('iteration') or 0}/{st.get('iters') or '?'}" if st["status"] != "pending" else f"-/{st.get('iters') or '?'}"
        eta = _clock(etas.get(st["name"])) if st["status"] == "running" else ""
        note = st.get("error") or (phase_note(st) if st["status"] == "running" else "")
        table.add_row(st["name"], Text(st["status"], style=STYLE.get(st["status"], "")), _short_node(st),
                      str(st.get("attempts", 0)), step, eta, _clock(elapsed), note)
    parts: list = [table]
    if state.get("error"):
        parts.append(Text(state["error"], style="red"))
    drv = state.get("driver") or {}
    if not live and state["state"] == "running" and drv.get("heartbeat") and now - drv["heartbeat"] > 120:
        parts.append(Text(f"no update from the driver ({drv.get('host')} pid {drv.get('pid')}) for "
                          f"{_clock(now - drv['heartbeat'])}: it may be gone; `launcher resume` continues the suite",
                          style="yellow"))
    return Group(*parts)


class ProgressView:
    """The driver's ``on_update`` callback: a rich Live table, or plain lines."""

    def __init__(self, live: bool = True, console: Console | None = None):
        self.live_mode = live
        self.console = console or Console()
        self._live: Live | None = None
        self._seen: dict[str, tuple] = {}
        self._rate: dict[str, tuple[int, float]] = {}
        self._plain_at: dict[str, float] = {}
        self._last_render = 0.0

    def note(self, msg: str) -> None:
        self.console.print(msg, highlight=False, markup=False) if self.live_mode else print(msg, flush=True)

    def __enter__(self) -> "ProgressView":
        if self.live_mode:
            self._live = Live(console=self.console, refresh_per_second=2, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)
            self._live = None

    def _etas(self, state: dict) -> dict[str, float]:
        """Per running stage: remaining iterations at the rate seen since it was first observed."""
        now, etas = time.time(), {}
        for st in state["stages"]:
            name, it = st["name"], st.get("iteration") or 0
            if st["status"] != "running":
                self._rate.pop(name, None)
                continue
            it0, t0 = self._rate.setdefault(name, (it, now))
            if it > it0 and now > t0:
                etas[name] = (st["iters"] - it) * (now - t0) / (it - it0)
        return etas

    def update(self, state: dict) -> None:
        etas = self._etas(state)
        if self._live is not None:
            if time.time() - self._last_render > 0.4 or state["state"] in ("done", "failed"):
                self._live.update(render_state(state, live=True, etas=etas))
                self._last_render = time.time()
            return
        self._plain(state, etas)

    def _plain(self, state: dict, etas: dict[str, float]) -> None:
        stamp = time.strftime("%H:%M:%S")
        for st in state["stages"]:
            key = (st["status"], st.get("attempts"), st.get("node"))
            name = st["name"]
            if self._seen.get(name) != key:
                if st["status"] == "running" and not st.get("node"):
                    continue  # launched, workers not up yet: report when they are
                self._seen[name] = key
                if st["status"] == "pending" and not st.get("attempts"):
                    continue
                extra = {
                    "running": f"on {_short_node(st)} (attempt {st.get('attempts', 0)})",
                    "done": f"sha256 {str(st.get('checksum'))[:12]}",
                    "failed": f"{st.get('error')}",
                    "pending": f"{st.get('error') or ''}",
                }[st["status"]]
                print(f"[{stamp}] {name}: {st['status']} {extra}".rstrip(), flush=True)
                self._plain_at[name] = time.time()
            elif st["status"] == "running" and time.time() - self._plain_at.get(name, 0) > PLAIN_EVERY_S:
                self._plain_at[name] = time.time()
                phase = phase_note(st)
                where = phase or f"step {st.get('iteration', 0)}/{st.get('iters')} ETA {_clock(etas.get(name))}"
                print(f"[{stamp}] {name}: {where}", flush=True)


def show_status(workdir, fmt: str = "table") -> int:
    """``launcher status``: the stage table from the state file (during a run and after)."""
    import json
    from pathlib import Path

    from cluster.state import status_view
    from cluster.workdir import read_state

    state = read_state(Path(workdir))
    if fmt == "json":
        print(json.dumps(status_view(state)))
        return 0
    from cluster.progress import render_state

    from rich.console import Console

    Console().print(render_state(state, live=False))
    return 0

