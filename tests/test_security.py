"""Security rules that code review alone would let slip: no pickle of user files, safe YAML,
names that cannot escape the storage root, loopback-only defaults for the servers we start."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SOURCES = sorted(p for pkg in ("mtshare", "cluster", "launcher") for p in (REPO / pkg).rglob("*.py"))


def _code_lines():
    for path in SOURCES:
        for no, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if code.strip():
                yield path.relative_to(REPO), no, code


@pytest.mark.parametrize("pattern, why", [
    (r"\bimport pickle\b|\bpickle\.load|\bcloudpickle\.load|\bdill\.load", "pickle of files"),
    (r"\byaml\.(unsafe_)?load\(|yaml\.full_load|Loader=yaml\.(Unsafe|Full)?Loader", "YAML without safe_load"),
    (r"allow_pickle\s*=\s*True", "numpy pickles"),
    (r"(?<![.\w])(eval|exec)\(", "eval/exec"),
    (r"[\"']0\.0\.0\.0[\"']", "binding every interface by default"),
])
def test_sources_avoid_unsafe_calls(pattern, why):
    hits = [f"{p}:{n}" for p, n, code in _code_lines() if re.search(pattern, code)]
    assert not hits, f"{why}: {hits}"


def test_every_torch_load_is_weights_only():
    calls = [(p, n, code) for p, n, code in _code_lines() if "torch.load(" in code]
    assert calls, "expected the resume-state / .pth readers"
    assert all("weights_only=True" in code for _, _, code in calls), calls


class _Payload:
    """A pickle that would create a file when unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_weight_files_carrying_code_are_refused(tmp_path):
    from mtshare.checkpoint import CheckpointError, load_train_state
    from mtshare.models.vit import ViTEncoder, load_pretrained, vit_config

    marker = tmp_path / "owned"
    evil = tmp_path / "evil.pth"
    torch.save({"patch_embed.proj.weight": _Payload(marker)}, evil)
    with pytest.raises(CheckpointError, match="evil.pth"):
        load_train_state(evil)
    encoder = ViTEncoder(vit_config("vit_debug", patch_size=8))
    with pytest.raises(Exception):
        load_pretrained(encoder, str(evil))
    assert not marker.exists()


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden", "x" * 65, "name with space", ""])
def test_unsafe_suite_names_are_refused(name, tiny_suite):
    from mtshare.config import ConfigError, validate_suite

    with pytest.raises(ConfigError, match="name"):
        validate_suite(tiny_suite(name))


@pytest.mark.parametrize("key", ["../x", "a/../../x", "../../etc/passwd"])
def test_storage_keys_cannot_leave_the_root(key, tmp_path):
    from cluster.storage import StorageError, open_storage

    storage = open_storage(str(tmp_path / "root"))
    with pytest.raises(StorageError, match="escapes"):
        storage.write_bytes(key, b"x")
    assert not any(tmp_path.rglob("x")) and not (tmp_path / "etc").exists()


def test_servers_default_to_loopback():
    from launcher.__main__ import _parser

    assert _parser().parse_args(["ui"]).host == "127.0.0.1"
    import inspect

    from cluster.ui import serve_ui

    assert inspect.signature(serve_ui).parameters["host"].default == "127.0.0.1"
