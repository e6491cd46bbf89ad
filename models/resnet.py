"""ResNet-like network: a 3x3 stem, three stages of basic blocks, global average pooling."""

from __future__ import annotations

from torch import nn

from models.layers import BasicBlock, classifier, conv_bn_act
from models.registry import register_model


def residual_stages(
    in_channels: int, width: int, blocks: int, stages: int
) -> tuple[nn.Sequential, int]:
    """Stages of `blocks` basic blocks; channels double and resolution halves from stage 2 on."""
    layers: list[nn.Module] = []
    channels = in_channels
    for stage in range(stages):
        out = width * 2**stage
        for index in range(blocks):
            stride = 2 if stage > 0 and index == 0 else 1
            layers.append(BasicBlock(channels, out, stride))
            channels = out
    return nn.Sequential(*layers), channels


@register_model("resnet", order=2, cost=4)
class ResNet(nn.Module):
    """A 3x3 stem, three stages of basic blocks (28 -> 14 -> 7), global average pooling."""

    TITLE = "ResNet"
    SEARCH_SPACE = {
        "width": ("categorical", (8, 16, 24)),
        "blocks": ("int", 1, 2),
        "dropout": ("float", 0.0, 0.4),
    }

    def __init__(
        self,
        num_classes: int = 6,
        in_channels: int = 1,
        width: int = 16,
        blocks: int = 1,
        dropout: float = 0.2,
    ):
        super().__init__()
        self.stem = conv_bn_act(in_channels, width)
        self.stages, channels = residual_stages(width, width, blocks, stages=3)  # 28 -> 14 -> 7
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = classifier(channels, num_classes, dropout)

    def forward(self, x):
        return self.head(self.pool(self.stages(self.stem(x))))
