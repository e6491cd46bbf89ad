"""Building blocks shared by the model families."""

from __future__ import annotations

from torch import nn


def conv_bn_act(
    in_channels: int,
    out_channels: int,
    kernel_size: int = 3,
    stride: int = 1,
    groups: int = 1,
    act: type[nn.Module] | None = nn.ReLU,
) -> nn.Sequential:
    """Convolution (no bias), batch norm, optional activation; 'same' padding."""
    layers: list[nn.Module] = [
        nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            groups=groups,
            bias=False,
        ),
        nn.BatchNorm2d(out_channels),
    ]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """The ResNet basic block: two 3x3 convolutions and an identity (or 1x1 projection) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(
            conv_bn_act(in_channels, out_channels, 3, stride),
            conv_bn_act(out_channels, out_channels, 3, 1, act=None),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = conv_bn_act(in_channels, out_channels, 1, stride, act=None)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act(self.body(x) + self.shortcut(x))


def classifier(
    in_features: int, num_classes: int, dropout: float, hidden: int = 0
) -> nn.Sequential:
    """Dropout and a linear layer, with an optional hidden layer before them."""
    layers: list[nn.Module] = [nn.Flatten()]
    if hidden:
        layers += [nn.Linear(in_features, hidden), nn.ReLU(inplace=True)]
        in_features = hidden
    layers += [nn.Dropout(dropout), nn.Linear(in_features, num_classes)]
    return nn.Sequential(*layers)
