"""A small ResNet for 8x8 single-channel images (scikit-learn digits)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from qat.models.registry import register


@dataclass
class CNNConfig:
    """Shape of :class:`DigitsResNet`; ``widths`` has one entry per stage."""

    in_channels: int = 1
    num_classes: int = 10
    widths: list[int] = field(default_factory=lambda: [32, 64])
    blocks_per_stage: int = 1

    def __post_init__(self) -> None:
        self.widths = list(self.widths)
        for key in ("in_channels", "num_classes", "blocks_per_stage"):
            if getattr(self, key) < 1:
                raise ValueError(f"CNNConfig.{key} must be >= 1, got {getattr(self, key)}")
        if not self.widths or any(w < 1 for w in self.widths):
            raise ValueError(
                f"CNNConfig.widths must be a non-empty list of ints >= 1, got {self.widths}"
            )


class BasicBlock(nn.Module):
    """Two Conv-BN(-ReLU) layers plus a residual add; stride 2 halves the resolution."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class DigitsResNet(nn.Module):
    """Stem Conv-BN-ReLU, residual stages (each after the first halves H and W), pool, linear."""

    def __init__(self, config: CNNConfig | None = None) -> None:
        super().__init__()
        self.config = config or CNNConfig()
        c = self.config
        self.conv1 = nn.Conv2d(c.in_channels, c.widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c.widths[0])
        self.relu1 = nn.ReLU()
        blocks: list[nn.Module] = []
        in_ch = c.widths[0]
        for stage, width in enumerate(c.widths):
            for i in range(c.blocks_per_stage):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(in_ch, width, stride))
                in_ch = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(in_ch, c.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))  # (B, C0, 8, 8)
        x = self.blocks(x)  # (B, C_last, 8 / 2^(stages-1), ...)
        return self.head(self.flatten(self.pool(x)))  # (B, num_classes)


@register("cnn")
def build_cnn(
    in_channels: int = 1,
    num_classes: int = 10,
    widths: list[int] | None = None,
    blocks_per_stage: int = 1,
) -> DigitsResNet:
    """Build :class:`DigitsResNet`; default widths ``[32, 64]``."""
    config = CNNConfig(in_channels, num_classes, list(widths or [32, 64]), blocks_per_stage)
    return DigitsResNet(config)
