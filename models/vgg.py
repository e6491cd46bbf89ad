"""VGG-like network: stages of 3x3 conv-BN-ReLU layers, each followed by 2x2 max pooling."""

from __future__ import annotations

from torch import nn

from models.layers import classifier, conv_bn_act
from models.registry import register_model


def vgg_stages(in_channels: int, width: int, depth: int, stages: int) -> tuple[nn.Sequential, int]:
    """`stages` VGG stages (channels width, 2*width, ...), each `depth` convs and a 2x2 max pool."""
    layers: list[nn.Module] = []
    channels = in_channels
    for stage in range(stages):
        out = width * 2**stage
        for _ in range(depth):
            layers.append(conv_bn_act(channels, out))
            channels = out
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers), channels


@register_model("vgg", order=1, cost=3)
class VGG(nn.Module):
    """28x28 -> 14 -> 7 -> 3 with three stages (32, 64, 128 channels by default); an FC head."""

    TITLE = "VGG"
    # the knobs a search varies, beside the constructor they feed (read by experiments.search.space)
    SEARCH_SPACE = {
        "width": ("categorical", (8, 16, 24, 32)),
        "depth": ("int", 1, 2),
        "hidden": ("categorical", (64, 128, 256)),
        "dropout": ("float", 0.0, 0.5),
    }

    def __init__(
        self,
        num_classes: int = 6,
        in_channels: int = 1,
        width: int = 32,
        depth: int = 2,
        hidden: int = 256,
        dropout: float = 0.3,
    ):
        super().__init__()
        self.features, channels = vgg_stages(in_channels, width, depth, stages=3)
        self.head = classifier(channels * 3 * 3, num_classes, dropout, hidden=hidden)

    def forward(self, x):
        return self.head(self.features(x))
