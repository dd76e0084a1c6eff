"""Task heads: dense, task-specific, never delta-coded.

Reference head: linear D -> E per token, pixel-unshuffle each token into a 4x4 grid of E/16
channels, two ConvNeXt blocks, a 1x1 conv to the task's channels, bilinear upsampling to the
input size. E = 4*D for semseg/sal/edge and 2*D for parts/normals/depth (3072 / 1536 at ViT-B).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# Head width as a multiple of the encoder width (ViT-B: 4*768 = 3072, 2*768 = 1536).
HEAD_WIDTH_FACTOR = {"semseg": 4, "sal": 4, "edge": 4, "human_parts": 2, "normals": 2, "depth": 2}
UNSHUFFLE = 4  # each token becomes a 4x4 patch of pixels


class ConvNeXtBlock(nn.Module):
    """ConvNeXt block: 7x7 depthwise conv, LayerNorm, 4x MLP with GELU, residual."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)  # NHWC for the LayerNorm and the MLP
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


class DenseHead(nn.Module):
    def __init__(self, embed_dim: int, out_channels: int, width: int):
        super().__init__()
        if width % (UNSHUFFLE * UNSHUFFLE):
            raise ValueError(f"head width {width} must be divisible by {UNSHUFFLE * UNSHUFFLE}")
        self.proj = nn.Linear(embed_dim, width)
        dim = width // (UNSHUFFLE * UNSHUFFLE)
        self.blocks = nn.Sequential(ConvNeXtBlock(dim), ConvNeXtBlock(dim))
        self.out = nn.Conv2d(dim, out_channels, kernel_size=1)

    def forward(self, feats: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        x = self.proj(feats.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # [B, E, h, w]
        x = F.pixel_shuffle(x, UNSHUFFLE)  # [B, E/16, 4h, 4w]
        x = self.out(self.blocks(x))
        return F.interpolate(x, size=out_size, mode="bilinear", align_corners=False)


def build_head(task: str, embed_dim: int, out_channels: int) -> DenseHead:
    return DenseHead(embed_dim, out_channels, HEAD_WIDTH_FACTOR[task] * embed_dim)
