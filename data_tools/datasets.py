"""The datasets of the study: the three raw folders and the sets derived from them by rule.

| name   | what                                              | images |
|--------|---------------------------------------------------|--------|
| TRAIN  | raw folder: one script, white on black            | 36,000 |
| TEST   | raw folder: half TRAIN-like, half a second script | 6,000  |
| TEST2  | raw folder: only the second script                | 6,000  |
| TRAIN2 | TRAIN plus every TRAIN image inverted (1 - x)      | 72,000 |
| TRAIN3 | the white-background images of TEST               | 3,000  |
| TRAIN_TEST | TRAIN and TEST together (Task 2 only)         | 42,000 |
| SELECT2 | Task 2's selection split: a seeded, stratified 20 % of TEST's white half | 600 |

SELECT2 is the one validation set of every Task 2 step: each of them trains on
its set minus these images (`Dataset.without`), so validation accuracy means
the same thing in every Task 2 row and can rank candidates across steps.

The background rule (`is_white_background`) is the one place that decides
black versus white: the mean of the outermost ring of pixels is above 0.5.
On these data that ring's mean is ~0 for black backgrounds and exactly 1.0
for white ones, so the threshold sits far from both.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data_tools.cache import load_cached, load_cached_many
from data_tools.reader import DatasetError, RawDataset

NUM_CLASSES = 6
RAW_SPLITS = ("TRAIN", "TEST", "TEST2")
WHITE_BORDER_THRESHOLD = 0.5
SELECTION = "SELECT2"  # Task 2's selection split (validation of every Task 2 step)
SELECTION_FRACTION = 0.2
SELECTION_SEED = 0


def border_mean(images: torch.Tensor) -> torch.Tensor:
    """Mean of the outermost one-pixel ring of each image (`N x 1 x H x W` or `N x H x W`)."""
    x = images.reshape(images.shape[0], images.shape[-2], images.shape[-1])
    ring_sum = x[:, 0, :].sum(1) + x[:, -1, :].sum(1) + x[:, 1:-1, 0].sum(1) + x[:, 1:-1, -1].sum(1)
    count = 2 * x.shape[-1] + 2 * (x.shape[-2] - 2)
    return ring_sum / count


def is_white_background(images: torch.Tensor) -> torch.Tensor:
    """The background rule: True where an image has a white background."""
    return border_mean(images) > WHITE_BORDER_THRESHOLD


def invert(images: torch.Tensor) -> torch.Tensor:
    return 1.0 - images


@dataclass
class Dataset:
    """A labelled image set held in memory."""

    name: str
    images: torch.Tensor  # N x 1 x 28 x 28, float32 in [0, 1]
    labels: torch.Tensor  # N, int64 in 0..5 (folder "1" is label 0)
    files: tuple[str, ...]  # source file of each image (derived ones are prefixed)
    fingerprint: str  # sha256 of the source images and labels, and the derivation
    # images that are versions of one source image share a group (TRAIN2: an image and its
    # inversion): a validation split keeps a group on one side. None: every image its own
    groups: torch.Tensor | None = None

    @property
    def white(self) -> torch.Tensor:
        return is_white_background(self.images)

    def __len__(self) -> int:
        return len(self.labels)

    def without(self, other: Dataset) -> Dataset:
        """This set minus every image that is also in `other` (compared by content), so no
        image of a held-out set is trained on, whichever files it came from."""
        held = {bytes(image.numpy().tobytes()) for image in other.images}
        keep = torch.tensor(
            [image.numpy().tobytes() not in held for image in self.images], dtype=torch.bool
        )
        kept = self.subset(keep, f"{self.name}-{other.name}")
        kept.fingerprint = f"{self.fingerprint}|without|{other.fingerprint}"
        return kept

    def subset(self, mask_or_index: torch.Tensor, name: str) -> Dataset:
        index = mask_or_index
        if index.dtype == torch.bool:
            index = index.nonzero().flatten()
        files = tuple(self.files[i] for i in index.tolist())
        groups = None if self.groups is None else self.groups[index]
        return Dataset(
            name,
            self.images[index],
            self.labels[index],
            files,
            f"{self.fingerprint}|{name}",
            groups,
        )


def _as_dataset(name: str, raw: RawDataset, digest: str) -> Dataset:
    images = torch.from_numpy(np.ascontiguousarray(raw.images)).unsqueeze(1)
    labels = torch.from_numpy(np.ascontiguousarray(raw.labels))
    return Dataset(name, images, labels, raw.files, digest)


def load_dataset(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Dataset:
    """Load one dataset folder: images `N x 1 x 28 x 28` float32 and labels `0..5`, stable order."""
    raw, digest = load_cached(path, cache_dir, NUM_CLASSES)
    return _as_dataset(Path(path).name, raw, digest)


def _train2(train: Dataset) -> Dataset:
    images = torch.cat([train.images, invert(train.images)])
    labels = torch.cat([train.labels, train.labels])
    files = train.files + tuple(f"inverted:{f}" for f in train.files)
    source = torch.arange(len(train))
    groups = torch.cat([source, source])  # an image and its inversion: one group
    return Dataset("TRAIN2", images, labels, files, f"{train.fingerprint}|TRAIN2", groups)


def _train3(test: Dataset) -> Dataset:
    return test.subset(test.white, "TRAIN3")


def _selection(test: Dataset) -> Dataset:
    """A stratified SELECTION_FRACTION of TEST's white half, fixed by SELECTION_SEED."""
    white = test.white.nonzero().flatten()
    generator = np.random.default_rng(SELECTION_SEED)
    labels = test.labels[white].numpy()
    chosen = []
    for label in np.unique(labels):  # per class: the same fraction of each
        members = white.numpy()[labels == label]
        count = round(len(members) * SELECTION_FRACTION)
        chosen.extend(generator.choice(members, size=count, replace=False).tolist())
    selection = test.subset(torch.tensor(sorted(chosen), dtype=torch.long), SELECTION)
    recipe = f"{SELECTION}(white,fraction={SELECTION_FRACTION},seed={SELECTION_SEED})"
    selection.fingerprint = f"{test.fingerprint}|{recipe}"
    return selection


def _train_test(train: Dataset, test: Dataset) -> Dataset:
    images = torch.cat([train.images, test.images])
    labels = torch.cat([train.labels, test.labels])
    files = tuple(f"TRAIN/{f}" for f in train.files) + tuple(f"TEST/{f}" for f in test.files)
    return Dataset(
        "TRAIN_TEST", images, labels, files, f"{train.fingerprint}|{test.fingerprint}|TRAIN_TEST"
    )


# why a derived split can come out empty, for the one-line error that says so
NO_WHITE_HALF = (
    f"TEST has no white-background image (border-ring mean above {WHITE_BORDER_THRESHOLD}), "
    "and every Task 2 step trains on TEST's white half and validates on part of it"
)
EMPTY_BECAUSE = {
    "TRAIN2": "TRAIN has no image",
    "TRAIN3": NO_WHITE_HALF,
    "TRAIN_TEST": "TRAIN and TEST have no image",
    SELECTION: f"TEST's white half has too few images per class for a {SELECTION_FRACTION:.0%} "
    "selection split, which every Task 2 step validates on",
}


def _empty_because(name: str, sources: Sequence[Dataset]) -> str:
    if name in ("TRAIN3", SELECTION) and not bool(sources[0].white.any()):
        return NO_WHITE_HALF
    return EMPTY_BECAUSE[name]


# derived name -> (raw sources, rule)
DERIVED: dict[str, tuple[tuple[str, ...], Callable[..., Dataset]]] = {
    "TRAIN2": (("TRAIN",), _train2),
    "TRAIN3": (("TEST",), _train3),
    "TRAIN_TEST": (("TRAIN", "TEST"), _train_test),
    SELECTION: (("TEST",), _selection),
}
SPLITS = RAW_SPLITS + tuple(DERIVED)


def _sources(name: str) -> tuple[str, ...]:
    """The raw folders a split is made from."""
    if name in RAW_SPLITS:
        return (name,)
    if name in DERIVED:
        return DERIVED[name][0]
    raise DatasetError(name, f"unknown dataset; expected one of {', '.join(SPLITS)}")


def load_splits(
    names: Sequence[str], data_dir: str | os.PathLike, cache_dir: str | os.PathLike | None = None
) -> dict[str, Dataset]:
    """Load raw or derived splits by name, in the order asked.

    Every raw folder they need is read and checked before any cache entry is
    written: if one is bad (say TEST2), nothing is cached, not even TRAIN.
    """
    sources = list(dict.fromkeys(source for name in names for source in _sources(name)))
    loaded = load_cached_many([Path(data_dir) / s for s in sources], cache_dir, NUM_CLASSES)
    raw = {s: _as_dataset(s, *pair) for s, pair in zip(sources, loaded, strict=True)}
    splits: dict[str, Dataset] = {}
    for name in names:
        if name in RAW_SPLITS:
            splits[name] = raw[name]
        else:
            sources_of, rule = DERIVED[name]
            inputs = [raw[source] for source in sources_of]
            splits[name] = rule(*inputs)
            if len(splits[name]) == 0:
                folder = Path(data_dir) / sources_of[0] if len(sources_of) == 1 else data_dir
                why = _empty_because(name, inputs)
                raise DatasetError(folder, f"{name} would be empty: {why}")
    return splits


def load_split(
    name: str, data_dir: str | os.PathLike, cache_dir: str | os.PathLike | None = None
) -> Dataset:
    """Load a raw or derived split by name from the datasets folder."""
    return load_splits([name], data_dir, cache_dir)[name]


@contextlib.contextmanager
def new_folder(out: str | os.PathLike) -> Iterator[Path]:
    """A folder `out` (new or empty) built under a temporary name beside it: the caller fills
    the yielded folder, which becomes `out` at the end; a failure leaves nothing behind."""
    out = Path(out).resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DatasetError(out, "output folder exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        yield tmp
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_folder(dataset: Dataset, out: str | os.PathLike) -> Path:
    """Write a dataset in the original layout (`<label 1..6>/<name>.npy`, float32 `(1, 28, 28)`),
    as a `new_folder`: `out` must not exist or be an empty folder."""
    with new_folder(out) as tmp:
        for label in range(1, NUM_CLASSES + 1):
            (tmp / str(label)).mkdir()
        arrays = dataset.images.numpy().astype(np.float32)
        for index, (image, label) in enumerate(zip(arrays, dataset.labels.tolist(), strict=True)):
            stem = Path(dataset.files[index].replace("inverted:", "inv_")).stem
            np.save(tmp / str(label + 1) / f"{stem}_{index}.npy", image, allow_pickle=False)
    return Path(out).resolve()
