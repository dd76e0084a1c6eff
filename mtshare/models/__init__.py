"""Single-task dense-prediction model: ViT encoder + one task head."""
from __future__ import annotations

import torch
import torch.nn as nn

from mtshare.models.delta import DeltaParam, add_deltas, find_deltas
from mtshare.models.heads import DenseHead, build_head
from mtshare.models.vit import FLAVORS, ViTConfig, ViTEncoder, load_pretrained, vit_config

__all__ = [
    "DenseTaskModel", "build_model", "ViTConfig", "ViTEncoder", "FLAVORS", "vit_config",
    "DeltaParam", "add_deltas", "find_deltas", "load_pretrained",
]


class DenseTaskModel(nn.Module):
    """``encoder`` + ``head`` for one task; ``forward(x)`` gives the raw output at input size."""

    def __init__(self, encoder: ViTEncoder, head: DenseHead, task: str):
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.task = task

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x), out_size=x.shape[-2:])

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by role: ``dense`` (encoder without sharing, heads), ``delta``
        (δ of every shared encoder tensor) and ``alpha`` (gate logits). Frozen base weights
        appear in none of them."""
        groups: dict[str, list[nn.Parameter]] = {"dense": [], "delta": [], "alpha": []}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "delta":
                groups["delta"].append(p)
            elif leaf in ("log_alpha", "log_alpha_tensor"):
                groups["alpha"].append(p)
            else:
                groups["dense"].append(p)
        return groups


def build_model(flavor: str, patch_size: int, task: str, out_channels: int) -> DenseTaskModel:
    cfg = vit_config(flavor, patch_size)
    encoder = ViTEncoder(cfg)
    return DenseTaskModel(encoder, build_head(task, cfg.embed_dim, out_channels), task)
