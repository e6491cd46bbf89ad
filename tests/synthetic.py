"""Tiny synthetic glyph datasets in the real layout, for fast tests.

Class k (0..5) is a bright block at one of six grid positions, with a little
noise: easy to learn, so a few epochs beat chance clearly. `white=True` draws
the "second script": dark strokes on a white background, and a different
shape (a hollow frame instead of a block), so a model trained on one does not
transfer to the other for free.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

POSITIONS = [(4, 4), (4, 16), (16, 4), (16, 16), (10, 10), (4, 10)]


def glyph(label: int, rng: np.random.Generator, white: bool = False) -> np.ndarray:
    image = rng.uniform(0, 0.08, size=(28, 28)).astype(np.float32)
    row, col = POSITIONS[label]
    row += int(rng.integers(-1, 2))
    col += int(rng.integers(-1, 2))
    if white:
        image[row : row + 8, col : col + 8] = 0.9
        image[row + 2 : row + 6, col + 2 : col + 6] = 0.05
        image = 1.0 - image
    else:
        image[row : row + 8, col : col + 8] = rng.uniform(0.8, 1.0)
    return np.clip(image, 0, 1)


def write_dataset(
    root: Path,
    per_class: int = 20,
    white_fraction: float = 0.0,
    seed: int = 0,
    num_classes: int = 6,
) -> Path:
    """Write `root/<1..6>/img_<i>.npy` files of shape (1, 28, 28) float32."""
    rng = np.random.default_rng(seed)
    for label in range(num_classes):
        folder = root / str(label + 1)
        folder.mkdir(parents=True, exist_ok=True)
        n_white = int(round(per_class * white_fraction))
        for i in range(per_class):
            image = glyph(label, rng, white=i < n_white)
            np.save(folder / f"img_{i}.npy", image[None], allow_pickle=False)
    return root


def write_study_data(root: Path, per_class: int = 20) -> Path:
    """TRAIN (black), TEST (half black, half white) and TEST2 (white) folders under `root`."""
    write_dataset(root / "TRAIN", per_class, 0.0, seed=1)
    write_dataset(root / "TEST", per_class, 0.5, seed=2)
    write_dataset(root / "TEST2", per_class, 1.0, seed=3)
    return root


def permute_labels(folder: Path) -> None:
    """Rotate the class folders of a dataset folder: every image's label changes."""
    import shutil

    shutil.move(folder / "1", folder / "tmp")
    for label in range(2, 7):
        shutil.move(folder / str(label), folder / str(label - 1))
    shutil.move(folder / "tmp", folder / "6")
