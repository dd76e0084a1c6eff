"""The command line: verbs listed, data synth/check exit codes, bad input gives exit 2 + one line."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def launcher(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "launcher", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_help_lists_every_verb_of_the_contract():
    out = launcher("--help")
    assert out.returncode == 0
    for verb in ("data", "run", "submit", "status", "resume", "report", "infer", "bench", "ui"):
        assert verb in out.stdout


@pytest.mark.parametrize("layout", ["pascal_context", "nyud"])
def test_data_synth_then_check_then_a_deleted_file_is_named(tmp_path, layout):
    root = tmp_path / layout
    out = launcher("data", "synth", "--layout", layout, "--out", str(root), "--n", "12", "--size", "32", "--seed", "3")
    assert out.returncode == 0, out.stderr
    out = launcher("data", "check", "--dataset", layout, "--root", str(root))
    assert out.returncode == 0, out.stderr
    assert "train" in out.stdout and "val" in out.stdout
    folders = ["sal_distill", "human_parts"] if layout == "pascal_context" else ["depth"]
    for folder in folders:  # human_parts/<id>.mat: the release has one per image, persons or not
        victim = sorted((root / folder).iterdir())[-1]
        kept = victim.read_bytes()
        victim.unlink()
        out = launcher("data", "check", "--dataset", layout, "--root", str(root))
        assert out.returncode == 2
        assert f"{folder}/{victim.name}" in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1
        victim.write_bytes(kept)


def test_bad_config_exits_2_with_one_line_naming_the_field(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("name: x\ndataset: {name: pascal_context, root: /nonexistent, img_size: 32}\ntasks: [sal, bogus]\n")
    out = launcher("run", str(cfg), "--workdir", str(tmp_path / "wd"))
    assert out.returncode == 2
    assert "bogus" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "wd").exists()  # nothing written for bad input


def test_report_json_on_a_missing_run_is_exit_2(tmp_path):
    out = launcher("report", "--workdir", str(tmp_path / "nothing"), "--format", "json")
    assert out.returncode == 2
    assert "nothing" in out.stderr
