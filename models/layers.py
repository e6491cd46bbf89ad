"""Building blocks shared by the model families."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

# Depthwise convolutions with kernels of at least SMALL_MAP_MIN_KERNEL on maps of at most
# SMALL_MAP_PIXELS pixels take the batched-matmul weight gradient of `DepthwiseConv2d` on CPU.
# oneDNN's weight gradient of a 5x5 depthwise convolution on a 4x4 map took 27-43 ms a call
# (batch 128, 240-336 channels, one thread, AMD EPYC with AVX2 only, torch 2.14) against
# 1.4-2.8 ms as one matmul per channel (15-21x, three runs); for 3x3 kernels on the same maps
# oneDNN was the faster (0.2-0.7 ms, the matmul 0.3-0.4x), and on 7x7 maps the matmul ran at
# 0.4-1.5x, so those keep oneDNN (`make bench`, section "Depthwise weight gradient").
SMALL_MAP_PIXELS = 16
SMALL_MAP_MIN_KERNEL = 5
_small_map_path = True


@contextmanager
def small_map_depthwise(enabled: bool) -> Iterator[None]:
    """Turn the batched-matmul weight gradient of small-map depthwise convolutions on or off
    (the bench measures both ways side by side)."""
    global _small_map_path
    before, _small_map_path = _small_map_path, enabled
    try:
        yield
    finally:
        _small_map_path = before


@functools.lru_cache(maxsize=64)
def _tap_index(height: int, width: int, kernel: int, stride: int, padding: int) -> torch.Tensor:
    """(out pixels, in pixels): the kernel tap (0..k*k-1) linking an output pixel to an input
    pixel of a depthwise convolution, or k*k where none does."""
    out_h = (height + 2 * padding - kernel) // stride + 1
    out_w = (width + 2 * padding - kernel) // stride + 1
    oi = torch.arange(out_h).view(-1, 1, 1, 1) * stride - padding
    oj = torch.arange(out_w).view(1, -1, 1, 1) * stride - padding
    di = torch.arange(height).view(1, 1, -1, 1) - oi  # tap row for each (out, in) pair
    dj = torch.arange(width).view(1, 1, 1, -1) - oj
    inside = (di >= 0) & (di < kernel) & (dj >= 0) & (dj < kernel)
    taps = torch.where(inside, di * kernel + dj, torch.full_like(di, kernel * kernel))
    return taps.reshape(out_h * out_w, height * width)


def depthwise_weight_grad(
    x: torch.Tensor, grad_out: torch.Tensor, shape: torch.Size, stride: int, padding: int
) -> torch.Tensor:
    """The weight gradient (`shape`: channels x 1 x k x k) of a depthwise convolution of `x`
    whose output has gradient `grad_out`: one matmul per channel, folded onto the taps."""
    channels, kernel = shape[0], shape[-1]
    n, _, height, width = x.shape
    taps = _tap_index(height, width, kernel, stride, padding)
    # NCHW-contiguous first: bmm then reads each channel's matrices in place (strided views of
    # a channels-last tensor would be copied batch entry by batch entry)
    xs = x.contiguous().view(n, channels, height * width).transpose(0, 1)  # C, N, HW
    gs = grad_out.contiguous().view(n, channels, -1).permute(1, 2, 0)  # C, H'W', N
    per_pair = torch.bmm(gs, xs)  # C, H'W', HW
    grad_w = per_pair.new_zeros(channels, kernel * kernel + 1)
    grad_w.scatter_add_(1, taps.reshape(1, -1).expand(channels, -1), per_pair.reshape(channels, -1))
    return grad_w[:, :-1].reshape(shape)


class _SmallMapDepthwise(torch.autograd.Function):
    """conv2d's forward and input gradient; the weight gradient as one matmul per channel.

    A depthwise convolution on an H x W map is, per channel, a (H'W' x HW) matrix whose
    entries are kernel taps. Its gradient is sum_n dy_n^T x_n (a batched matmul over
    channels), folded back onto the k x k taps by a scatter-add. Same values as conv2d's
    weight gradient up to float summation order.
    """

    @staticmethod
    def forward(ctx, x, weight, stride: int, padding: int):
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding = stride, padding
        return F.conv2d(x, weight, None, stride, padding, 1, weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        stride, padding = ctx.stride, ctx.padding
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad_out,
                x,
                weight,
                None,
                [stride] * 2,
                [padding] * 2,
                [1, 1],
                False,
                [0, 0],
                weight.shape[0],
                [True, False, False],
            )[0]
        if ctx.needs_input_grad[1]:
            grad_w = depthwise_weight_grad(x, grad_out, weight.shape, stride, padding)
        return grad_x, grad_w, None, None


class DepthwiseConv2d(nn.Conv2d):
    """A depthwise convolution (one filter per channel, no bias) whose weight gradient, when
    training in fp32 on CPU with a kernel of at least `SMALL_MAP_MIN_KERNEL` on a map of at
    most `SMALL_MAP_PIXELS` pixels, is the batched matmul of `_SmallMapDepthwise`; anywhere
    else it is `nn.Conv2d`. Same parameters and
    state dict as `nn.Conv2d(channels, channels, k, stride, k // 2, groups=channels)`."""

    def __init__(self, channels: int, kernel_size: int, stride: int = 1):
        super().__init__(
            channels,
            channels,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            groups=channels,
            bias=False,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            _small_map_path
            and x.device.type == "cpu"
            and x.dtype == torch.float32
            and torch.is_grad_enabled()
            and self.weight.requires_grad
            and not torch.is_autocast_enabled("cpu")
            and x.shape[-2] * x.shape[-1] <= SMALL_MAP_PIXELS
            and self.kernel_size[0] >= SMALL_MAP_MIN_KERNEL
        ):
            return _SmallMapDepthwise.apply(x, self.weight, self.stride[0], self.padding[0])
        return super().forward(x)


def conv_bn_act(
    in_channels: int,
    out_channels: int,
    kernel_size: int = 3,
    stride: int = 1,
    groups: int = 1,
    act: type[nn.Module] | None = nn.ReLU,
) -> nn.Sequential:
    """Convolution (no bias), batch norm, optional activation; 'same' padding. A depthwise
    convolution (groups = in = out channels > 1) is a `DepthwiseConv2d`."""
    depthwise = groups > 1 and in_channels == out_channels == groups
    conv = (
        DepthwiseConv2d(in_channels, kernel_size, stride)
        if depthwise
        else nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            groups=groups,
            bias=False,
        )
    )
    layers: list[nn.Module] = [conv, nn.BatchNorm2d(out_channels)]
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
