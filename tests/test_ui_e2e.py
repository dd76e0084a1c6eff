"""Monitoring as a user sees it: `launcher ui` for a finished suite, opened in headless Chromium.

Chromium is driven through chromedriver's W3C WebDriver HTTP API directly (a few JSON
requests; no Selenium dependency). `.ci/run` installs Debian's `chromium` and
`chromium-driver` when missing. The screenshot lands in the test's tmp dir. The README's
picture is the same view of `make demo`'s run:

    python tests/test_ui_e2e.py runs/demo docs/images/mlflow_ui.png
"""
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-quic", "--window-size=1400,900"]

TINY = """\
name: uitiny
dataset: {name: pascal_context, root: "{workdir}/data", img_size: 32, synthesize: {n: 24, size: 32, seed: 0}, holdout: 4}
model: {flavor: vit_debug, patch_size: 8}
tasks: [sal]
steps: [step1, step2]
references: false
train:
  base: {iters: 4, batch_size: 4, eval_every: 4, log_every: 1}
  step1: {iters: 4, batch_size: 4, eval_every: 4, log_every: 1, l0_lambda: 1.0e-4}
  step2: {iters: 4, batch_size: 4, eval_every: 4, log_every: 1}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: dict | None = None, timeout: float = 60) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read() or b"{}")


def wait_http(url: str, seconds: float) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except Exception:
            time.sleep(0.5)
    raise TimeoutError(url)


class Browser:
    """The smallest useful WebDriver client: open a URL, read the page, take a screenshot."""

    def __init__(self, tmp: Path):
        self.port = free_port()
        self.proc = subprocess.Popen([shutil.which("chromedriver"), f"--port={self.port}"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.base = f"http://127.0.0.1:{self.port}"
        wait_http(f"{self.base}/status", 30)
        caps = {"browserName": "chrome", "goog:chromeOptions": {
            "binary": shutil.which("chromium"), "args": CHROME_FLAGS + [f"--user-data-dir={tmp / 'chrome'}"]}}
        self.session = http("POST", f"{self.base}/session", {"capabilities": {"alwaysMatch": caps}})["value"]["sessionId"]

    def get(self, url: str) -> None:
        http("POST", f"{self.base}/session/{self.session}/url", {"url": url})

    def run(self, script: str):
        return http("POST", f"{self.base}/session/{self.session}/execute/sync", {"script": script, "args": []})["value"]

    def text(self) -> str:
        return self.run("return document.body ? document.body.innerText : ''")

    def wait_for(self, needles: list[str], seconds: float = 60) -> str:
        deadline = time.time() + seconds
        text = ""
        while time.time() < deadline:
            text = self.text()
            if all(n in text for n in needles):
                return text
            time.sleep(0.5)
        raise AssertionError(f"page never showed {needles}; it showed: {text[:500]!r}")

    def screenshot(self, path: Path) -> None:
        png = http("GET", f"{self.base}/session/{self.session}/screenshot")["value"]
        path.write_bytes(base64.b64decode(png))

    def close(self) -> None:
        try:
            http("DELETE", f"{self.base}/session/{self.session}", timeout=10)
        finally:
            self.proc.terminate()
            self.proc.wait(timeout=10)


# What a user monitors: the suite's parent run expanded with its nested stage runs, beside the
# charts of their loss (MLflow 3.17's runs page; the assistant panel closed).
MONITOR_VIEW = [
    "const b = Array.from(document.querySelectorAll('button')).find(b => b.getAttribute('aria-label') === 'Close');"
    " if (b) b.click();",
    "document.querySelector('.ag-row button[data-component-id*=runnamecellrenderer]').click();",
    "document.querySelector('input[name=runs-view-mode][value=CHART]').closest('label').click();",
    "const i = Array.from(document.querySelectorAll('input')).find(x => (x.placeholder || '').includes('metric charts'));"
    " Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, 'value').set.call(i, 'loss');"
    " i.dispatchEvent(new Event('input', {bubbles: true}));",
]


def monitor_view(browser: Browser, runs_url: str, suite: str, stage_names: list[str], shot: Path) -> str:
    """Open the runs page in the monitoring view, screenshot it; returns the page's text."""
    browser.get(runs_url)
    browser.wait_for([suite])
    time.sleep(2)
    for step in MONITOR_VIEW:
        browser.run(step)
        time.sleep(1.5)
    text = browser.wait_for([*stage_names, "task_loss"])  # nested runs listed, their loss charted
    browser.screenshot(shot)
    return text


@pytest.fixture(scope="module")
def finished_suite(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ui")
    cfg = tmp / "tiny.yaml"
    cfg.write_text(TINY)
    out = subprocess.run([sys.executable, "-m", "launcher", "run", str(cfg), "--workdir", str(tmp / "wd"),
                          "--executor", "inprocess", "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return tmp / "wd"


def test_mlflow_ui_shows_the_suite_and_its_stage_runs(finished_suite, tmp_path):
    from mlflow import MlflowClient

    assert shutil.which("chromium") and shutil.which("chromedriver"), "run .ci/run (it installs chromium)"
    client = MlflowClient(f"sqlite:///{finished_suite / 'mlflow.db'}")
    exp = client.get_experiment_by_name("uitiny")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    stages = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(stages) == {"base", "sal/step1", "sal/step2"}

    port = free_port()
    ui = subprocess.Popen([sys.executable, "-m", "launcher", "ui", "--workdir", str(finished_suite), "--port", str(port)],
                          cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True)  # its own process group: the MLflow server child dies with it
    browser = None
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 90)
        # bound to loopback only (the default): nothing listens on this port on another address
        assert "127.0.0.1" in ui.stdout.readline()
        import psutil

        bound = {c.laddr.ip for c in psutil.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
        assert bound == {"127.0.0.1"}, bound
        browser = Browser(tmp_path)
        home = f"http://127.0.0.1:{port}/#/experiments/{exp.experiment_id}"
        browser.get(home)
        browser.wait_for(["uitiny"])
        for name, run in stages.items():
            browser.get(f"{home}/runs/{run.info.run_id}")
            browser.wait_for([name, "task_loss"])  # the stage run with its logged metrics
        browser.get(f"{home}/runs/{parent.info.run_id}")
        browser.wait_for(["uitiny", "suite_flops"])
        shot = tmp_path / "mlflow_ui.png"
        monitor_view(browser, f"{home}/runs", "uitiny", sorted(stages), shot)
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    finally:
        if browser:
            browser.close()
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=30)


def main(workdir: str, out: str) -> None:
    """The README's picture: the monitoring view of a finished suite's embedded MLflow store."""
    from mlflow import MlflowClient

    workdir = Path(workdir).resolve()
    suite = json.loads((workdir / "suite.json").read_text())["suite"]
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name(suite)
    names = sorted(r.info.run_name for r in client.search_runs([exp.experiment_id])
                   if "mlflow.parentRunId" in r.data.tags)[:3]
    port = free_port()
    ui = subprocess.Popen([sys.executable, "-m", "launcher", "ui", "--workdir", str(workdir), "--port", str(port)],
                          cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    browser = None
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 90)
        browser = Browser(Path(out).resolve().parent)
        monitor_view(browser, f"http://127.0.0.1:{port}/#/experiments/{exp.experiment_id}/runs", suite, names, Path(out))
    finally:
        if browser:
            browser.close()
        shutil.rmtree(Path(out).resolve().parent / "chrome", ignore_errors=True)
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=30)


if __name__ == "__main__":
    main(*sys.argv[1:3])
