"""A small EfficientNet for 28x28 inputs (Tan & Le, 2019), with its real parts.

- MBConv blocks: 1x1 expansion, depthwise kxk convolution, squeeze-and-excitation,
  1x1 linear projection, identity shortcut when shapes match;
- SiLU activations;
- stochastic depth (per-sample drop of a residual branch), rate rising linearly
  over the blocks up to `drop_path`;
- compound scaling: `width_mult` scales every channel count (rounded to a
  multiple of 8), `depth_mult` scales every stage's repeat count (rounded up).

The stage table is EfficientNet-B0's first five stages with its stride-2 stem
and strides placed for 28x28 inputs: 28 -> 14 (stem) -> 7 -> 4. The defaults
(width 0.5, depth 0.5) keep a training step cheap on a 2-core CPU.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from models.layers import classifier, conv_bn_act
from models.registry import register_model

# expand ratio, output channels, repeats, stride, kernel
STAGES = (
    (1, 16, 1, 1, 3),
    (6, 24, 2, 2, 3),
    (6, 40, 2, 2, 5),
    (6, 80, 3, 1, 3),
    (6, 112, 3, 1, 5),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 320


def round_channels(channels: float, divisor: int = 8) -> int:
    """Round to a multiple of `divisor`, never more than 10 % below the input (as in EfficientNet)."""
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * channels else rounded


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, reduced, 1),
            nn.SiLU(inplace=True),
            nn.Conv2d(reduced, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, x):
        return x * self.gate(x)


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero the residual branch of whole samples with probability `rate`."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty(x.shape[0], 1, 1, 1).bernoulli_(keep)
    return x * mask / keep


class MBConv(nn.Module):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        expand: int,
        kernel: int,
        stride: int,
        se_ratio: float,
        drop_path_rate: float,
    ):
        super().__init__()
        hidden = in_channels * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(conv_bn_act(in_channels, hidden, 1, act=nn.SiLU))
        layers.append(conv_bn_act(hidden, hidden, kernel, stride, groups=hidden, act=nn.SiLU))
        if se_ratio > 0:
            layers.append(SqueezeExcite(hidden, max(1, int(in_channels * se_ratio))))
        layers.append(conv_bn_act(hidden, out_channels, 1, act=None))
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and in_channels == out_channels
        self.drop_path_rate = drop_path_rate

    def forward(self, x):
        out = self.block(x)
        if self.residual:
            out = x + drop_path(out, self.drop_path_rate, self.training)
        return out


@register_model("efficientnet", order=3, cost=2)
class EfficientNet(nn.Module):
    """MBConv stages scaled by width and depth multipliers, a 1x1 head conv, pooling."""

    TITLE = "EfficientNet"
    # bf16 autocast on CPU: 1,126-1,159 img/s against 1,947-2,093 in fp32 (training, batch 128,
    # 2 threads, AMD EPYC with AVX512_BF16; depthwise convolutions), so `auto` stays fp32
    CPU_BF16 = False
    SEARCH_SPACE = {
        "width_mult": ("categorical", (0.25, 0.5, 0.75)),
        "depth_mult": ("categorical", (0.25, 0.5, 0.75)),
        "dropout": ("float", 0.0, 0.4),
        "drop_path": ("float", 0.0, 0.2),
    }

    def __init__(
        self,
        num_classes: int = 6,
        in_channels: int = 1,
        width_mult: float = 0.5,
        depth_mult: float = 0.5,
        se_ratio: float = 0.25,
        dropout: float = 0.2,
        drop_path: float = 0.0,
    ):
        super().__init__()
        stem = round_channels(STEM_CHANNELS * width_mult)
        self.stem = conv_bn_act(in_channels, stem, 3, 2, act=nn.SiLU)
        plan = []
        channels = stem
        for expand, out, repeats, stride, kernel in STAGES:
            out = round_channels(out * width_mult)
            for index in range(math.ceil(repeats * depth_mult)):
                plan.append((channels, out, expand, kernel, stride if index == 0 else 1))
                channels = out
        blocks = [
            MBConv(*spec, se_ratio=se_ratio, drop_path_rate=drop_path * i / max(len(plan) - 1, 1))
            for i, spec in enumerate(plan)
        ]
        self.blocks = nn.Sequential(*blocks)
        head = round_channels(HEAD_CHANNELS * width_mult)
        self.head_conv = conv_bn_act(channels, head, 1, act=nn.SiLU)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = classifier(head, num_classes, dropout)

    def forward(self, x):
        return self.head(self.pool(self.head_conv(self.blocks(self.stem(x)))))
