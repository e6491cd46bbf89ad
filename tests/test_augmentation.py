"""The batched affine warp draws kornia's RandomAffine distribution and warps as it does."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import ks_2samp

from experiments.core.preprocess import (
    BatchAffine,
    Preprocessing,
    _affine,
    _kornia_affine,
    affine_matrices,
    warp,
)

PREP = Preprocessing("keep", "none", "affine", 0.85, 1.0)


def _ours(params: dict) -> dict:
    """kornia's parameter dict in BatchAffine's terms (kornia scales x and y alike here)."""
    assert torch.equal(params["scale"][:, 0], params["scale"][:, 1])
    assert torch.equal(params["shear_y"], torch.zeros_like(params["shear_y"]))
    return {
        "angle": params["angle"],
        "translations": params["translations"],
        "scale": params["scale"][:, 0],
        "shear_x": params["shear_x"],
    }


@pytest.mark.parametrize("strength", [0.3, 1.0, 2.0])
def test_matrices_and_warped_images_equal_kornias_for_its_parameters(strength):
    torch.manual_seed(0)
    prep = Preprocessing("keep", "none", "affine", 0.85, strength)
    reference = _kornia_affine(prep)
    images = torch.rand(32, 1, 28, 28)
    params = reference.forward_parameters(images.shape)
    theirs = reference.compute_transformation(images, params, reference.flags)
    ours = affine_matrices(_ours(params), 28, 28)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(
        warp(images, ours), reference(images, params=params), atol=1e-4, rtol=0
    )


def test_parameters_follow_kornias_distribution():
    torch.manual_seed(0)
    draws = 4000
    theirs = _ours(_kornia_affine(PREP).forward_parameters((draws, 1, 28, 28)))
    augment = _affine(PREP)
    assert isinstance(augment, BatchAffine)
    ours = augment.sample(draws, 28, 28, torch.device("cpu"))
    for name in ("angle", "scale", "shear_x"):
        assert ks_2samp(ours[name].numpy(), theirs[name].numpy()).pvalue > 1e-3, name
    for axis in (0, 1):
        a, b = ours["translations"][:, axis], theirs["translations"][:, axis]
        assert ks_2samp(a.numpy(), b.numpy()).pvalue > 1e-3, f"translation {axis}"
        assert a.abs().max() <= 0.1 * 28 and b.abs().max() <= 0.1 * 28


def test_a_wrong_range_is_told_apart_from_kornias():
    """The distribution test can fail: rotations twice as wide are caught."""
    torch.manual_seed(0)
    theirs = _ours(_kornia_affine(PREP).forward_parameters((4000, 1, 28, 28)))
    wide = BatchAffine(degrees=30, translate=0.1, scale=(0.9, 1.1), shear=10)
    ours = wide.sample(4000, 28, 28, torch.device("cpu"))
    assert ks_2samp(ours["angle"].numpy(), theirs["angle"].numpy()).pvalue < 1e-6


def test_each_image_gets_its_own_warp_and_the_background_is_kept():
    torch.manual_seed(0)
    white = torch.ones(16, 1, 28, 28)
    white[:, :, 8:20, 13:15] = 0.0  # a dark stroke on white
    out = _affine(PREP)(white)
    assert out.shape == white.shape
    assert torch.allclose(out[:, :, 0, :], torch.ones(16, 1, 28))  # border padding: still white
    assert not torch.allclose(out[0], out[1])  # not one warp for the whole batch


def test_the_warp_copies_nothing_from_the_host_per_batch(monkeypatch):
    """No tensor is built from host values on the per-step path (on CUDA such a copy is a
    host-device sync every step): the warp runs with `torch.tensor` unavailable."""
    augment = BatchAffine(degrees=30, translate=0.1, scale=(0.9, 1.1), shear=10)
    images = torch.rand(8, 1, 28, 28)

    def host_copy(*args, **kwargs):
        raise AssertionError("torch.tensor called on the per-batch path")

    monkeypatch.setattr(torch, "tensor", host_copy)
    torch.manual_seed(0)
    warped = augment(images)
    assert warped.shape == images.shape and torch.isfinite(warped).all()
