"""VGG+ResNet hybrid: two VGG stages (28 -> 7) followed by residual blocks and a pooled head.

Every layer is built in `__init__`, so the optimizer sees all of them (the
reference notebook built its classifier lazily in `forward`, after the
optimizer existed, so that layer never trained).
"""

from __future__ import annotations

from torch import nn

from models.layers import BasicBlock, classifier
from models.registry import register_model
from models.vgg import vgg_stages


@register_model("hybrid", order=4, cost=1)
class Hybrid(nn.Module):
    """Two VGG stages, then residual blocks at 7x7, then a pooled head."""

    TITLE = "VGG+ResNet"
    SEARCH_SPACE = {
        "width": ("categorical", (8, 16, 24)),
        "vgg_depth": ("int", 1, 2),
        "res_blocks": ("int", 1, 2),
        "dropout": ("float", 0.0, 0.5),
    }

    def __init__(
        self,
        num_classes: int = 6,
        in_channels: int = 1,
        width: int = 16,
        vgg_depth: int = 1,
        res_blocks: int = 1,
        dropout: float = 0.3,
    ):
        super().__init__()
        if res_blocks < 1:
            raise ValueError(f"res_blocks must be >= 1, got {res_blocks}")
        self.features, channels = vgg_stages(in_channels, width, vgg_depth, stages=2)
        out = channels * 2
        blocks = [BasicBlock(channels, out)] + [BasicBlock(out, out) for _ in range(res_blocks - 1)]
        self.residual = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = classifier(out, num_classes, dropout)

    def forward(self, x):
        return self.head(self.pool(self.residual(self.features(x))))
