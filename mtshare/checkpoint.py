"""Self-describing, compact checkpoints in safetensors.

Kinds (``manifest["kind"]``):
    ``base``     full encoder + head weights of the frozen base task;
    ``dense``    the same for a dense single-task reference (step0);
    ``subtask``  a sparse delta per encoder tensor (a packed bitmask of the non-zeros + their
                 values, never a dense copy) + the dense task head; the manifest names the
                 sha256 of the base file it belongs to and it refuses to load against another.

Every file carries a JSON manifest in the safetensors metadata (task, stage, config, sparsity,
metrics, ...). Writes are atomic: a temp file in the same directory, fsync, then rename, so a
reader never sees a half-written checkpoint under the final name.

Mid-stage resume state (optimizer moments, RNG, iteration) is a separate ``.pt`` file read
with ``torch.load(weights_only=True)``: no pickle of arbitrary objects.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: wrong base, corrupt, missing keys (names the file)."""


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


TMP_MARK = ".tmp-"  # in the name of a file being written (listings skip it)


def atomic_write(path: str | Path, chunks: Iterable[bytes]) -> None:
    """Create or replace ``path`` with the concatenated ``chunks``, atomically: a temporary name
    in the same directory, fsync, ``os.replace``. On any error the final name keeps its old
    content (or stays absent) and the temporary file is gone. The one local atomic write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, [data])


def _save(path: str | Path, tensors: dict[str, torch.Tensor], manifest: dict) -> str:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    data = st_save(tensors, metadata={"mtshare": json.dumps(manifest, sort_keys=True)})
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def read_manifest(path: str | Path) -> dict:
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads(f.metadata()["mtshare"])
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint not found") from None
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable mtshare checkpoint ({e.__class__.__name__}: {e})") from None


def load_tensors(path: str | Path, expected_sha256: str | None) -> tuple[dict[str, torch.Tensor], dict]:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    data = path.read_bytes()
    if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise CheckpointError(f"{path}: checksum mismatch (expected sha256 {expected_sha256[:12]}…)")
    try:
        from safetensors.torch import load

        tensors = load(data)
        manifest = json.loads(_metadata_from_bytes(data)["mtshare"])
    except Exception as e:
        raise CheckpointError(f"{path}: corrupt checkpoint ({e.__class__.__name__}: {e})") from None
    return tensors, manifest


def _metadata_from_bytes(data: bytes) -> dict:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]).get("__metadata__", {})


def _split(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


# --- dense (base / step0) ---------------------------------------------------------------------

def save_dense(path, encoder_sd: dict, head_sd: dict, manifest: dict, kind: str = "base") -> str:
    """Save full encoder + head weights; returns the file's sha256."""
    assert kind in ("base", "dense")
    tensors = {f"encoder.{k}": v for k, v in encoder_sd.items()}
    tensors.update({f"head.{k}": v for k, v in head_sd.items()})
    return _save(path, tensors, {**manifest, "kind": kind, "format": FORMAT_VERSION})


def load_dense(path, expected_sha256: str | None = None) -> tuple[dict, dict, dict]:
    """Returns (encoder_sd, head_sd, manifest); checks the sha256 when given."""
    tensors, manifest = load_tensors(path, expected_sha256)
    if manifest.get("kind") not in ("base", "dense"):
        raise CheckpointError(f"{path}: expected a base/dense checkpoint, found kind '{manifest.get('kind')}'")
    return _split(tensors, "encoder."), _split(tensors, "head."), manifest


# --- sparse sub-task ----------------------------------------------------------------------------

def pack_sparse(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A tensor as (packed bitmask of its non-zeros, uint8; the non-zero values in order)."""
    flat = t.detach().cpu().reshape(-1)
    nz = flat != 0
    bits = torch.from_numpy(np.packbits(nz.numpy()))
    return bits, flat[nz].clone()


def unpack_sparse(bits: torch.Tensor, values: torch.Tensor, shape: list[int]) -> torch.Tensor:
    numel = int(np.prod(shape)) if shape else 1
    nz = torch.from_numpy(np.unpackbits(bits.numpy(), count=numel).astype(bool))
    if int(nz.sum()) != values.numel():
        raise CheckpointError(f"sparse tensor: bitmask has {int(nz.sum())} ones but {values.numel()} values")
    out = torch.zeros(numel, dtype=values.dtype)
    out[nz] = values
    return out.reshape(shape)


def save_subtask(path, deltas: dict[str, torch.Tensor], head_sd: dict, manifest: dict, base_sha256: str) -> str:
    """Save effective deltas sparsely (bitmask + values) and the dense head; returns sha256."""
    tensors = {}
    shapes = {}
    zeros = total = 0
    for name, d in deltas.items():
        bits, values = pack_sparse(d)
        tensors[f"delta.{name}.bits"] = bits
        tensors[f"delta.{name}.values"] = values
        shapes[name] = list(d.shape)
        zeros += d.numel() - values.numel()
        total += d.numel()
    tensors.update({f"head.{k}": v for k, v in head_sd.items()})
    manifest = {
        **manifest, "kind": "subtask", "format": FORMAT_VERSION, "base_sha256": base_sha256,
        "delta_shapes": shapes, "delta_weight_sparsity": zeros / max(total, 1),
    }
    return _save(path, tensors, manifest)


def load_subtask(path, base_sha256: str, expected_sha256: str | None = None) -> tuple[dict, dict, dict]:
    """Returns (dense deltas by encoder parameter name, head_sd, manifest).

    Refuses a file made against another base (``base_sha256`` is the sha256 of the base file
    the caller holds)."""
    tensors, manifest = load_tensors(path, expected_sha256)
    if manifest.get("kind") != "subtask":
        raise CheckpointError(f"{path}: expected a sub-task checkpoint, found kind '{manifest.get('kind')}'")
    if manifest["base_sha256"] != base_sha256:
        raise CheckpointError(
            f"{path}: made for base sha256 {manifest['base_sha256'][:12]}…, "
            f"but the base given has sha256 {base_sha256[:12]}…"
        )
    deltas = {
        name: unpack_sparse(tensors[f"delta.{name}.bits"], tensors[f"delta.{name}.values"], shape)
        for name, shape in manifest["delta_shapes"].items()
    }
    return deltas, _split(tensors, "head."), manifest


# --- mid-stage resume state ---------------------------------------------------------------------

def save_train_state(path, state: dict[str, Any]) -> None:
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_train_state(path) -> dict[str, Any]:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable resume state ({e.__class__.__name__})") from None


def check_keys(path, got: set[str], expected: set[str], what: str) -> None:
    """Strict key audit: missing or unexpected keys are an error naming them."""
    missing, unexpected = sorted(expected - got), sorted(got - expected)
    if missing or unexpected:
        raise CheckpointError(f"{path}: {what} missing keys {missing[:6]}, unexpected keys {unexpected[:6]}")
