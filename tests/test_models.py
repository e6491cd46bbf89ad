"""Every registered model: shapes, gradients everywhere, clear errors."""

from __future__ import annotations

from contextlib import contextmanager
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from models import MODELS, create_model, feature_layer, hyperparameters, search_space, title
from models.efficientnet import MBConv, SqueezeExcite


@pytest.mark.parametrize("name", list(MODELS))
def test_forward_backward_reaches_every_parameter(name):
    torch.manual_seed(0)
    kwargs = {"drop_path": 0.2} if name == "efficientnet" else {}
    model = create_model(name, **kwargs)
    model.train()
    logits = model(torch.randn(8, 1, 28, 28))
    assert logits.shape == (8, 6)
    logits.logsumexp(1).mean().backward()
    missing = [
        n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)
    ]
    assert not missing, f"parameters without gradient: {missing}"


@pytest.mark.parametrize("name", list(MODELS))
def test_every_knob_is_accepted(name):
    knobs = hyperparameters(name)
    assert knobs and "num_classes" not in knobs
    model = create_model(name, **knobs)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 6)


def test_unknown_model_and_hyperparameter_fail_clearly():
    with pytest.raises(ValueError, match="unknown model 'alexnet'.*vgg"):
        create_model("alexnet")
    with pytest.raises(ValueError, match="unknown hyperparameter.*colour.*expected: width"):
        create_model("vgg", colour=3)


def test_efficientnet_is_real():
    model = create_model("efficientnet", width_mult=1.0, depth_mult=1.0)
    blocks = [m for m in model.modules() if isinstance(m, MBConv)]
    assert len(blocks) >= 8
    assert any(isinstance(m, SqueezeExcite) for m in model.modules())
    assert any(isinstance(m, torch.nn.SiLU) for m in model.modules())
    depthwise = [
        m
        for m in model.modules()
        if isinstance(m, torch.nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels
    ]
    assert len(depthwise) == len(blocks)
    wide = create_model("efficientnet", width_mult=1.0, depth_mult=2.0)
    narrow = create_model("efficientnet", width_mult=0.5, depth_mult=1.0)
    assert sum(isinstance(m, MBConv) for m in wide.modules()) > len(blocks)
    assert sum(p.numel() for p in narrow.parameters()) < sum(p.numel() for p in model.parameters())


def test_hybrid_head_exists_before_forward():
    model = create_model("hybrid")
    names = {n for n, _ in model.named_parameters()}
    assert any(n.startswith("head.") for n in names)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    head = model.head[-1].weight.detach().clone()
    model(torch.randn(4, 1, 28, 28)).sum().backward()
    optimizer.step()
    assert not torch.equal(head, model.head[-1].weight)


@pytest.mark.parametrize("name", list(MODELS))
def test_registry_contract_head_and_feature_layer(name):
    """`head` ends in the logits' linear layer, and `forward` ends in it (freezing, features)."""
    torch.manual_seed(0)
    model = create_model(name).eval()
    layer = feature_layer(model)
    assert layer.out_features == 6
    captured = []
    layer.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0]))
    logits = model(torch.randn(3, 1, 28, 28))
    assert captured and captured[-1].shape == (3, layer.in_features)
    assert torch.allclose(layer(captured[-1]), logits)  # nothing runs after the feature layer
    assert any(n.startswith("head.") for n, _ in model.named_parameters())


@pytest.mark.parametrize("name", list(MODELS))
def test_search_knobs_are_declared_beside_the_model(name):
    space = search_space(name)
    assert set(space) <= set(hyperparameters(name))
    defaults = hyperparameters(name)
    for knob, (kind, *spec) in space.items():
        if kind == "categorical":
            assert all(type(choice) is type(defaults[knob]) for choice in spec[0])
        else:
            low, high = spec
            assert low <= high and isinstance(low, int if kind == "int" else float)
    assert title(name)


def test_a_broken_contract_or_space_is_a_clear_error(monkeypatch):
    class NoHead(torch.nn.Module):
        SEARCH_SPACE = {"colour": ("categorical", (1, 2))}

        def __init__(self, num_classes=6, in_channels=1, width=4):
            super().__init__()
            self.body = torch.nn.Linear(784, num_classes)

    monkeypatch.setitem(MODELS, "nohead", NoHead)
    with pytest.raises(TypeError, match="breaks the registry contract"):
        feature_layer(create_model("nohead"))
    with pytest.raises(ValueError, match="SEARCH_SPACE names 'colour'"):
        search_space("nohead")


@contextmanager
def _counting_fast_path():
    """Count the calls of the batched-matmul depthwise gradient inside the block."""
    from models import layers

    calls: list[int] = []
    original = layers._SmallMapDepthwise.apply
    with mock.patch.object(
        layers._SmallMapDepthwise, "apply", lambda *a: calls.append(1) or original(*a)
    ):
        yield calls


def _depthwise_grads(conv, x, grad, fast: bool):
    from models.layers import small_map_depthwise

    with small_map_depthwise(fast):
        out = conv(x)
        return (out, *torch.autograd.grad(out, (x, conv.weight), grad))


@settings(max_examples=40, deadline=None, database=None)
@given(
    channels=st.integers(1, 12),
    height=st.integers(1, 7),
    width=st.integers(1, 7),
    kernel=st.sampled_from([1, 3, 5]),
    stride=st.integers(1, 2),
    batch=st.integers(1, 3),
    channels_last=st.booleans(),
)
def test_small_map_depthwise_gradient_equals_conv2d(
    channels, height, width, kernel, stride, batch, channels_last
):
    """The batched-matmul weight gradient equals conv2d's (float summation order aside), on
    random maps up to 7x7 (the size and kernel limits lifted), kernels 1/3/5, strides 1/2 and both
    layouts; forward and input gradient are conv2d's own."""
    from models import layers

    torch.manual_seed(0)
    conv = layers.DepthwiseConv2d(channels, kernel, stride)
    x = torch.randn(batch, channels, height, width)
    if channels_last:
        conv = conv.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    grad = torch.randn_like(conv(x))
    with (
        mock.patch.object(layers, "SMALL_MAP_PIXELS", 10**6),
        mock.patch.object(layers, "SMALL_MAP_MIN_KERNEL", 1),
        _counting_fast_path() as calls,
    ):
        out, grad_x, grad_w = _depthwise_grads(conv, x, grad, fast=True)
        assert calls  # the batched-matmul gradient really ran
        ref_out, ref_x, ref_w = _depthwise_grads(conv, x, grad, fast=False)
    assert torch.equal(out, ref_out)
    assert torch.equal(grad_x, ref_x)
    torch.testing.assert_close(grad_w, ref_w, rtol=1e-5, atol=1e-5)


def test_small_map_depthwise_is_used_only_where_it_applies():
    """The fast weight gradient runs for fp32 CPU training on small maps only: not on larger
    maps, without gradients, for a frozen weight, in float64, under autocast or switched off;
    its state dict loads into nn.Conv2d and back, strictly."""
    from models import layers
    from models.efficientnet import EfficientNet

    conv = layers.DepthwiseConv2d(4, 5)
    plain = torch.nn.Conv2d(4, 4, 5, padding=2, groups=4, bias=False)
    plain.load_state_dict(conv.state_dict(), strict=True)
    conv.load_state_dict(plain.state_dict(), strict=True)
    small = torch.randn(2, 4, 4, 4)
    with _counting_fast_path() as calls:
        conv(small)
        assert len(calls) == 1
        conv(torch.randn(2, 4, 7, 7))  # 49 pixels: oneDNN
        layers.DepthwiseConv2d(4, 3)(small)  # a 3x3 kernel: oneDNN is faster there
        with torch.no_grad():
            conv(small)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            conv(small)
        with layers.small_map_depthwise(False):
            conv(small)
        conv.double()(small.double())
        conv.float().weight.requires_grad_(False)
        conv(small)
        assert len(calls) == 1
    # EfficientNet's depthwise convolutions are these; its 1x1 and stem convolutions are not
    kinds = {type(m) for m in EfficientNet().modules() if isinstance(m, torch.nn.Conv2d)}
    assert kinds == {layers.DepthwiseConv2d, torch.nn.Conv2d}
