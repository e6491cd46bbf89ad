"""Preprocessing: polarity, normalization and training-time augmentation, each a named entry.

The order is fixed: polarity (on [0, 1] images) -> normalization -> augmentation.
Polarity and normalization are deterministic per image and are applied once to
every set (training, validation, evaluation). Augmentation is random and is
applied only to training batches, per sample (each image draws its own parameters),
on whatever device the batch lives on: `affine` as one batched warp (`BatchAffine`), the
others with kornia.

| option          | choices                                                              |
|-----------------|----------------------------------------------------------------------|
| `polarity`      | `keep`, `to_black` (invert white-background images; background rule of data_tools) |
| `normalization` | `none`, `half` (mean 0.5, std 0.5), `dataset` (training split's mean/std), `per_image` |
| `augmentation`  | `none`, `crop` (random resized crop, min area `crop_scale`), `affine` (rotation, shear, scale, translation scaled by `affine_strength`) |
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import kornia.augmentation as K
import torch
import torch.nn.functional as F
from torch import nn

from data_tools import invert, is_white_background


def _keep(images: torch.Tensor) -> torch.Tensor:
    return images


def _to_black(images: torch.Tensor) -> torch.Tensor:
    white = is_white_background(images).view(-1, 1, 1, 1)
    return torch.where(white, invert(images), images)


POLARITIES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "keep": _keep,
    "to_black": _to_black,
}


def _per_image(images: torch.Tensor) -> torch.Tensor:
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    std = images.std(dim=(1, 2, 3), keepdim=True)
    return (images - mean) / (std + 1e-6)


# name -> (fit on training images -> (mean, std) or None, per-image rule or None)
NORMALIZATIONS: dict[str, Callable[[torch.Tensor], tuple[float, float] | None]] = {
    "none": lambda images: (0.0, 1.0),
    "half": lambda images: (0.5, 0.5),
    "dataset": lambda images: (float(images.mean()), float(images.std())),
    "per_image": lambda images: None,
}


def _crop(prep: Preprocessing) -> nn.Module:
    return K.RandomResizedCrop((28, 28), scale=(prep.crop_scale, 1.0), ratio=(0.9, 1.1), p=1.0)


class BatchAffine(nn.Module):
    """Random affine warps of a whole batch: one parameter draw, one `affine_grid` and one
    `grid_sample` (a few dozen kernel launches where kornia's `RandomAffine` takes about 130).

    Each image gets its own rotation in (-degrees, degrees), translation in (-translate,
    translate) of its size per axis, isotropic scale in `scale` and x-shear in (-shear,
    shear) degrees, composed and resampled as kornia's `RandomAffine` composes and resamples
    them (rotation and scale about the centre, translation, x-shear first; bilinear, border
    padding, `align_corners=False`): the test compares both the parameter distributions and
    the warped images with kornia's.
    """

    def __init__(
        self, degrees: float, translate: float, scale: tuple[float, float], shear: float
    ) -> None:
        super().__init__()
        self.degrees, self.translate, self.scale, self.shear = degrees, translate, scale, shear

    def sample(self, batch: int, height: int, width: int, device) -> dict[str, torch.Tensor]:
        """Per-image parameters: angle and x-shear in degrees, translations in pixels, scale."""
        u = torch.rand(batch, 5, device=device)
        low, high = self.scale
        shift = (2 * u[:, 1:3] - 1) * self.translate  # per axis, times the size in pixels:
        # Python numbers, never a tensor built on the host (a copy that syncs on CUDA)
        return {
            "angle": (2 * u[:, 0] - 1) * self.degrees,
            "translations": torch.stack((shift[:, 0] * width, shift[:, 1] * height), dim=1),
            "scale": low + (high - low) * u[:, 3],
            "shear_x": (2 * u[:, 4] - 1) * self.shear,
        }

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = images.shape
        params = self.sample(batch, height, width, images.device)
        return warp(images, affine_matrices(params, height, width))


def affine_matrices(params: dict[str, torch.Tensor], height: int, width: int) -> torch.Tensor:
    """(B, 3, 3) pixel-coordinate matrices, source to destination: x-shear about the centre,
    then rotation (clockwise for a positive angle, as displayed) and scale about the centre,
    then translation; kornia's `get_affine_matrix2d` with its `RandomAffine` centre."""
    angle = params["angle"] * (math.pi / 180)
    shear = torch.tan(params["shear_x"] * (math.pi / 180))
    scale, (tx, ty) = params["scale"], params["translations"].unbind(1)
    cx, cy = width / 2 - 0.5, height / 2 - 0.5
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    # [cos -sin; sin cos] (the clockwise rotation in y-down pixels) times [1 -shear; 0 1]
    a, b = cos, -cos * shear - sin
    c, d = sin, -sin * shear + cos
    e = cx + tx - a * cx - b * cy
    f = cy + ty - c * cx - d * cy
    zero, one = torch.zeros_like(a), torch.ones_like(a)
    return torch.stack([a, b, e, c, d, f, zero, zero, one], dim=1).view(-1, 3, 3)


def warp(images: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """Resample each image through its source-to-destination pixel matrix (bilinear, border).

    The grid wants destination-to-source in [-1, 1] coordinates of pixel centres
    (`align_corners=False`): the affine inverse in closed form, rescaled, no batched solve.
    """
    _, _, height, width = images.shape
    a, b, e = matrices[:, 0].unbind(1)
    c, d, f = matrices[:, 1].unbind(1)
    det = a * d - b * c
    ia, ib, ic, id_ = d / det, -b / det, -c / det, a / det
    ie, if_ = -(ia * e + ib * f), -(ic * e + id_ * f)
    sx, sy = 2 / width, 2 / height  # pixel -> unit: u = s * p + o
    ox, oy = 1 / width - 1, 1 / height - 1
    theta = torch.stack(
        [
            ia,
            ib * sx / sy,
            sx * (ie - ia * ox / sx - ib * oy / sy) + ox,
            ic * sy / sx,
            id_,
            sy * (if_ - ic * ox / sx - id_ * oy / sy) + oy,
        ],
        dim=1,
    ).view(-1, 2, 3)
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, "bilinear", "border", align_corners=False)


def _affine(prep: Preprocessing) -> nn.Module:
    s = prep.affine_strength
    return BatchAffine(
        degrees=15 * s, translate=0.1 * s, scale=(1 - 0.1 * s, 1 + 0.1 * s), shear=10 * s
    )


def _kornia_affine(prep: Preprocessing) -> nn.Module:
    """kornia's `RandomAffine` with `_affine`'s ranges: the reference `BatchAffine` matches."""
    s = prep.affine_strength
    return K.RandomAffine(
        degrees=15 * s,
        translate=(0.1 * s, 0.1 * s),
        scale=(1 - 0.1 * s, 1 + 0.1 * s),
        shear=10 * s,
        padding_mode="border",  # the image's own background, black or white
        p=1.0,
    )


def _affine_elastic(prep: Preprocessing) -> nn.Module:
    """The affine warp, then a smooth random displacement field (about 1.2 pixels on average
    at strength 1: Gaussian-blurred noise, sigma 4 pixels), as for handwriting."""
    s = prep.affine_strength
    elastic = K.RandomElasticTransform(
        kernel_size=(17, 17),
        sigma=(4.0, 4.0),
        alpha=(2.0 * s, 2.0 * s),
        padding_mode="border",
        p=1.0,
    )
    return nn.Sequential(_affine(prep), elastic)


AUGMENTATIONS: dict[str, Callable[[Preprocessing], nn.Module] | None] = {
    "none": None,
    "crop": _crop,
    "affine": _affine,
    "affine_elastic": _affine_elastic,
}
# what a search chooses among; the others are levers measured by hand (`--set augmentation=...`)
SEARCHED_AUGMENTATIONS = ("none", "crop", "affine")


@dataclass(frozen=True)
class Preprocessing:
    """A complete, serialisable description of how images are prepared.

    No defaults here: a run's choices come from its `TrainConfig` (experiments.core.settings),
    a checkpoint's from the checkpoint.
    """

    polarity: str
    normalization: str
    augmentation: str
    crop_scale: float
    affine_strength: float
    mean: float = 0.5  # resolved by fit() for the chosen normalization
    std: float = 0.5

    def __post_init__(self) -> None:
        for field, registry in (
            ("polarity", POLARITIES),
            ("normalization", NORMALIZATIONS),
            ("augmentation", AUGMENTATIONS),
        ):
            value = getattr(self, field)
            if value not in registry:
                raise ValueError(
                    f"unknown {field} {value!r}; expected one of: {', '.join(registry)}"
                )
        if not 0.05 <= self.crop_scale <= 1.0:
            raise ValueError(f"crop_scale must be in [0.05, 1], got {self.crop_scale}")

    def fit(self, train_images: torch.Tensor) -> Preprocessing:
        """Resolve the normalization statistics from the training images (after polarity)."""
        stats = NORMALIZATIONS[self.normalization](POLARITIES[self.polarity](train_images))
        if stats is None:
            return self
        mean, std = stats
        return replace(self, mean=mean, std=max(std, 1e-6))

    def transform(self, images: torch.Tensor) -> torch.Tensor:
        """The deterministic part, for every set: polarity, then normalization."""
        images = POLARITIES[self.polarity](images)
        if self.normalization == "per_image":
            return _per_image(images)
        return (images - self.mean) / self.std

    def augmenter(self) -> nn.Module | None:
        """The random part, for training batches only (None when there is none)."""
        build = AUGMENTATIONS[self.augmentation]
        return build(self) if build else None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> Preprocessing:
        return cls(**values)
