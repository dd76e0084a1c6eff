"""Vision Transformer encoder for dense prediction (timm blocks).

The backbone of "Efficient Computation Sharing for Multi-Task Visual Scene Understanding"
(ICCV 2023): a plain ViT (MAE-style) with one learnable global token, no final norm and a
fixed 2-D sin-cos position embedding computed for whatever grid the input gives, so one
model serves 512x512 PASCAL-Context, 416x416 NYUD-v2 and 64x64 synthetic scenes.

Anatomy follows timm's ``vision_transformer.py``: config -> encoder -> weight loading
(``checkpoint_filter_fn``: explicit, strict key mapping) -> named flavors.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache, partial
from pathlib import Path

import torch
import torch.nn as nn
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block


@dataclass(frozen=True)
class ViTConfig:
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    patch_size: int = 16

    def to_dict(self) -> dict:
        return asdict(self)


# Named flavors. `vit_debug` is the tiny model that drives tests and the demo.
FLAVORS: dict[str, dict] = {
    "vit_debug": dict(embed_dim=64, depth=4, num_heads=2),
    # twice as wide: still trains on 2 CPU cores, and wide enough that a linear's time follows
    # its rows (video-stream benchmarks, docs/benchmarks.md)
    "vit_mini": dict(embed_dim=128, depth=4, num_heads=2),
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16),
}


def vit_config(flavor: str, patch_size: int = 16) -> ViTConfig:
    if flavor not in FLAVORS:
        raise ValueError(f"unknown model flavor '{flavor}' (known: {', '.join(FLAVORS)})")
    return ViTConfig(patch_size=patch_size, **FLAVORS[flavor])


@lru_cache(maxsize=16)
def _sincos_pos_embed(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos embedding, [grid_h*grid_w, dim] (float64 then cast by caller)."""
    assert dim % 4 == 0, "embed_dim must be divisible by 4 for 2-D sin-cos"
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))
    ys, xs = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64), indexing="ij"
    )
    out_w = xs.reshape(-1, 1) * omega[None]
    out_h = ys.reshape(-1, 1) * omega[None]
    # MAE order: first half encodes the width coordinate, second half the height.
    return torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)


class ViTEncoder(nn.Module):
    """Plain ViT: patch embed + global token + sin-cos positions + blocks, no final norm.

    ``forward`` returns patch tokens as a map ``[B, D, H/p, W/p]`` (the global token is
    dropped after the last block; it only carries context through attention).
    """

    # Module paths inside each block whose outputs step3 compares against the base.
    ACTIVATION_POINTS = ("norm1", "attn.qkv", "attn.proj", "mlp.fc1", "mlp.act", "mlp.fc2")

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        # dynamic_img_size: any input divisible by the patch size is accepted.
        self.patch_embed = PatchEmbed(
            img_size=None, patch_size=cfg.patch_size, in_chans=3, embed_dim=d, output_fmt="NHWC", dynamic_img_pad=False,
            strict_img_size=False,
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        norm = partial(nn.LayerNorm, eps=1e-6)  # reference: LN eps 1e-6
        self.blocks = nn.ModuleList(
            [Block(d, cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(cfg.depth)]
        )
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.normal_(self.cls_token, std=0.02)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # MAE: treat the conv as a linear
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.cfg.patch_size
        if x.shape[-1] % p or x.shape[-2] % p:
            raise ValueError(f"input size {tuple(x.shape[-2:])} is not divisible by the patch size {p}")
        x = self.patch_embed(x)  # [B, h, w, D]
        b, h, w, d = x.shape
        pos = _sincos_pos_embed(d, h, w).to(dtype=x.dtype, device=x.device)
        x = x.reshape(b, h * w, d) + pos
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)  # global token has no position
        for blk in self.blocks:
            x = blk(x)
        return x[:, 1:].transpose(1, 2).reshape(b, d, h, w)

    def linear_modules(self) -> dict[str, nn.Linear]:
        """The encoder's linear layers (what sharing sparsifies), by module path."""
        return {n: m for n, m in self.named_modules() if isinstance(m, nn.Linear)}


# --- foreign weights -------------------------------------------------------------------

# Keys that MAE / timm ViT checkpoints carry but this encoder does not use, dropped explicitly
# (by prefix). Anything else that does not match is an error.
_DROPPED_PREFIXES = ("norm.", "fc_norm.", "head.", "head_drop.", "pos_embed", "decoder", "mask_token")


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map an MAE / timm / MultiViT ViT state dict to this encoder's key names."""
    if "model" in state_dict and isinstance(state_dict["model"], dict):  # MAE release wraps in {"model": ...}
        state_dict = state_dict["model"]
    out = {}
    for k, v in state_dict.items():
        for prefix in ("module.", "backbone.", "encoder."):  # DDP / MultiViT wrappers
            if k.startswith(prefix):
                k = k[len(prefix):]
        if k.startswith(_DROPPED_PREFIXES):
            continue
        out[k] = v
    return out


def _audit_keys(source: str, got: dict[str, tuple], own: dict[str, tuple], error=ValueError) -> None:
    """Strict key / shape audit of foreign weights (names and shapes only) against the encoder's."""
    missing = sorted(set(own) - set(got))
    unexpected = sorted(set(got) - set(own))
    if missing or unexpected:
        parts = [f"{what} keys {keys[:8]}{'...' if len(keys) > 8 else ''}"
                 for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        raise error(f"model.pretrained: {source}: {', '.join(parts)}")
    bad = [k for k in own if tuple(own[k]) != tuple(got[k])]
    if bad:
        raise error(f"model.pretrained: {source}: shape mismatch for {bad[:8]}")


def _shapes(sd: dict) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def check_pretrained(model_cfg) -> None:
    """Pre-flight check of ``model.pretrained`` (a :class:`mtshare.config.ModelConfig`) without
    loading any weights: a local file's key names and shapes (safetensors header, or a .pth read
    onto the meta device) must match the encoder exactly, as :func:`load_pretrained` will demand
    in the base stage. A timm model name is checked to exist (its download happens in the stage).
    Raises :class:`mtshare.config.ConfigError` naming the field and file."""
    from mtshare.config import HUB_PREFIXES, ConfigError, names_weight_file

    source = getattr(model_cfg, "pretrained", None)
    if not source:
        return
    path = Path(source)
    if not path.exists():
        if names_weight_file(source):
            raise ConfigError(f"model.pretrained: {source}: file not found")
        import timm

        if not (source.startswith(HUB_PREFIXES) or timm.is_model(source)):
            raise ConfigError(f"model.pretrained: '{source}' is neither a file nor a timm model name")
        return
    if not path.is_file():
        raise ConfigError(f"model.pretrained: {source}: not a file")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                got = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        else:
            got = _shapes_nested(torch.load(str(path), map_location="meta", weights_only=True))
    except Exception as e:  # noqa: BLE001 - corrupt header, pickle refused, ...
        raise ConfigError(f"model.pretrained: {source}: not a readable weight file ({type(e).__name__})") from None
    with torch.device("meta"):
        own = _shapes(ViTEncoder(vit_config(model_cfg.flavor, model_cfg.patch_size)).state_dict())
    _audit_keys(source, checkpoint_filter_fn(got), own, error=ConfigError)


def _shapes_nested(sd) -> dict:
    """A loaded .pth as names -> shapes, keeping MAE's ``{"model": {...}}`` wrapper."""
    if not isinstance(sd, dict):
        raise TypeError("not a state dict")
    return {k: (_shapes_nested(v) if isinstance(v, dict) else tuple(v.shape)) for k, v in sd.items()
            if isinstance(v, dict) or hasattr(v, "shape")}


def load_pretrained(encoder: ViTEncoder, source: str) -> None:
    """Load encoder weights strictly from a local file (.safetensors, or .pth read with
    weights_only=True) or a timm model name. Missing or unexpected keys raise ValueError
    naming them: a silently random backbone is never acceptable."""
    path = Path(source)
    if path.exists():
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    else:
        import timm

        try:
            sd = timm.create_model(source, pretrained=True).state_dict()
        except Exception as e:  # no network, unknown name, ...
            raise ValueError(f"model.pretrained: '{source}' is neither a file nor a loadable timm model ({e})") from e
    sd = checkpoint_filter_fn(sd)
    _audit_keys(source, _shapes(sd), _shapes(encoder.state_dict()))
    encoder.load_state_dict(sd, strict=True)
