"""Every registered model: shapes, gradients everywhere, clear errors."""

from __future__ import annotations

import pytest
import torch

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
