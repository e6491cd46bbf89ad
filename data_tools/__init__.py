"""Read, check, cache, derive and draw the glyph datasets."""

from data_tools.datasets import (
    DERIVED,
    NUM_CLASSES,
    RAW_SPLITS,
    SELECTION,
    SPLITS,
    Dataset,
    border_mean,
    invert,
    is_white_background,
    load_dataset,
    load_split,
    load_splits,
)
from data_tools.reader import DatasetError

__all__ = [
    "DERIVED",
    "NUM_CLASSES",
    "RAW_SPLITS",
    "SELECTION",
    "SPLITS",
    "Dataset",
    "DatasetError",
    "border_mean",
    "invert",
    "is_white_background",
    "load_dataset",
    "load_split",
    "load_splits",
]
