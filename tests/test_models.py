"""Every registered model: shapes, gradients everywhere, clear errors."""

from __future__ import annotations

import pytest
import torch

from models import MODELS, create_model, hyperparameters
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
