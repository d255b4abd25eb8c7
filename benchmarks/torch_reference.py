"""PyTorch twins of vertjax's U-Net and losses, for side-by-side timing only.

`UNet` mirrors `vertjax.models.UNet` layer for layer (same parameter count,
same padding to a multiple of 2**depth and crop, GroupNorm with up to 8
groups and epsilon 1e-6 as in flax, nearest x2 + 3x3 conv or a 2x2
transposed conv up, channels capped at `max_features`, 1x1 linear output);
`loss` mirrors `vertjax.losses` on [B, H, W, K] tensors with K minor, the
layout vertjax uses, so both sides do the same work, or on PyTorch's own
[B, K, H, W]; it is written so that torch.compile fuses it. Nothing in vertjax imports this module: torch is an optional
benchmark dependency (`pip install .[bench]`).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

HOT_THRESHOLD = 0.5
HOT_WEIGHT = 10.0
EMPTY_WEIGHT = 5.0
BESIDE_WEIGHT = 0.0


def _norm(norm: str, channels: int) -> nn.Module:
    if norm == "group":
        return nn.GroupNorm(math.gcd(channels, 8), channels, eps=1e-6)
    if norm == "layer":
        return _ChannelLayerNorm(channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {norm!r}: expected one of group, layer, none")


class _ChannelLayerNorm(nn.Module):
    """LayerNorm over channels of an NCHW tensor (flax nn.LayerNorm on NHWC)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvBlock(nn.Sequential):
    """Two (3x3 conv, norm, ReLU) layers; no conv bias in front of a norm."""

    def __init__(self, in_channels: int, features: int, norm: str):
        layers: list[nn.Module] = []
        for i in range(2):
            layers += [
                nn.Conv2d(
                    in_channels if i == 0 else features, features, 3, padding=1, bias=norm == "none"
                ),
                _norm(norm, features),
                nn.ReLU(inplace=True),
            ]
        super().__init__(*layers)


class UNet(nn.Module):
    """U-Net: images [B, 1, H, W] -> heatmaps [B, K, H, W] (NCHW; use channels_last)."""

    def __init__(
        self,
        num_outputs: int = 13,
        features: int = 16,
        depth: int = 4,
        norm: str = "group",
        upsample: str = "resize",
        max_features: int | None = None,
    ):
        super().__init__()
        if upsample not in ("resize", "transpose"):
            raise ValueError(f"unknown upsample {upsample!r}: expected one of resize, transpose")
        self.depth = depth
        self.upsample = upsample
        widths = [features * 2**level for level in range(depth + 1)]
        if max_features:
            widths = [min(width, max_features) for width in widths]
        self.down = nn.ModuleList()
        channels = 1
        for level in range(depth):
            self.down.append(ConvBlock(channels, widths[level], norm))
            channels = widths[level]
        self.bottleneck = ConvBlock(channels, widths[depth], norm)
        channels = widths[depth]
        self.up = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        for level in reversed(range(depth)):
            if upsample == "transpose":
                self.up.append(nn.ConvTranspose2d(channels, widths[level], 2, stride=2))
            else:
                self.up.append(nn.Conv2d(channels, widths[level], 3, padding=1))
            self.up_blocks.append(ConvBlock(2 * widths[level], widths[level], norm))
            channels = widths[level]
        self.head = nn.Conv2d(channels, num_outputs, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        multiple = 2**self.depth
        x = F.pad(images, (0, -width % multiple, 0, -height % multiple))
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.bottleneck(x)
        for up, block, skip in zip(self.up, self.up_blocks, reversed(skips), strict=True):
            if self.upsample == "resize":
                x = F.interpolate(x, scale_factor=2, mode="nearest")
            x = block(torch.cat([up(x), skip], dim=1))
        return self.head(x)[..., :height, :width]


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def base_weight(labeled: torch.Tensor, name: str) -> torch.Tensor:
    """[B, K] float32 weight of the non-hot pixels (rules 2, 3 and else).

    Float arithmetic and Python-scalar constants throughout, so that
    torch.compile traces it into the loss kernels without a graph break.
    """
    flags = labeled.to(torch.float32)
    if name in ("mse", "l1"):
        return torch.ones_like(flags)
    padded = F.pad(flags, (1, 1))  # layers outside 0..K-1 are unlabelled
    beside = torch.maximum(padded[:, :-2], padded[:, 2:])
    return torch.where(flags > 0, 1.0, torch.where(beside > 0, BESIDE_WEIGHT, EMPTY_WEIGHT))


def loss(
    name: str,
    predictions: torch.Tensor,
    targets: torch.Tensor,
    labeled: torch.Tensor,
    layer_axis: int = 3,
) -> torch.Tensor:
    """Per-example loss [B]; the vertjax losses in torch ops.

    predictions and targets are [B, H, W, K] (`layer_axis=3`, vertjax's
    layout) or [B, K, H, W] (`layer_axis=1`, PyTorch's NCHW); labeled is
    [B, K] bool. One expression per rule, no data-dependent Python, so
    that inductor fuses the value into one reduction and the gradient into
    one elementwise kernel (benchmarks.loss_step checks for graph breaks).
    """
    error = targets - predictions
    if name == "mse":
        return error.square().mean(dim=(1, 2, 3))
    base = base_weight(labeled, name)
    base = base[:, :, None, None] if layer_axis == 1 else base[:, None, None, :]
    tested = targets.amax(dim=layer_axis, keepdim=True) if name == "l3" else targets
    weight = torch.where(tested >= HOT_THRESHOLD, HOT_WEIGHT, base)
    return (weight * error.square()).mean(dim=(1, 2, 3))
