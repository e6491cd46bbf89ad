"""The MLflow model of a trained classifier: this module is its `loader_module`.

A logged model holds data only: the project's weights-only checkpoints (`data/model/`) and
its MLmodel, which names this module. MLflow imports the module from the installed package
(no code is logged with the model, so none is put on `sys.path` from the store) and calls
`_load_pyfunc`, which loads the checkpoints with `torch.load(weights_only=True)`: an artifact
store can hand back weights, never code to run. `predict` (`serving/predict.py`) also refuses
a model whose MLmodel names other code (models logged as code by older versions).

`predict` takes raw images `(N, 1, 28, 28)` float32 in [0, 1] (in Python also `(N, 28,
28)`; the logged signature, which serving enforces, is the 4-D one); anything else,
NaN or values outside [0, 1] (8-bit images, say) is refused with an error (HTTP 400
when served), and an empty batch gives an empty frame. It returns one row per image:
`predicted` (the class folder name, 1..6), `probability` (of that class) and `prob_1` ..
`prob_6`. An ensemble's model carries
one checkpoint per member (`checkpoint_0.pt`, ...) and `ensemble.json` (`tta`): their
softmax probabilities are averaged, over the one-pixel shifts too with TTA. A checkpoint that
carries a new-script detector (`detector` entry: name and threshold) adds
`detector_score` and `unknown` (True where the detector flags the image).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch


def checked_images(model_input) -> np.ndarray:
    """The input as float32 `(N, 1, 28, 28)`, or an error a client can act on (HTTP 400 when
    served): a real-valued array of that shape or `(N, 28, 28)`, finite, in [0, 1]."""
    from mlflow.exceptions import INVALID_PARAMETER_VALUE, MlflowException

    def refuse(problem: str) -> MlflowException:
        return MlflowException(f"invalid images: {problem}", error_code=INVALID_PARAMETER_VALUE)

    array = np.asarray(model_input)
    if array.dtype.kind not in "fiu":
        raise refuse(f"dtype {array.dtype}, expected real numbers (float32 in [0, 1])")
    if array.size == 0:  # an empty batch in any layout (JSON `[]` arrives with shape (0,))
        return np.zeros((0, 1, 28, 28), np.float32)
    if array.ndim == 3:
        array = array[:, None]
    if array.ndim != 4 or tuple(array.shape[1:]) != (1, 28, 28):
        raise refuse(f"shape {tuple(array.shape)}, expected (N, 1, 28, 28) or (N, 28, 28)")
    array = array.astype(np.float32)
    bad = int((~np.isfinite(array)).sum())
    if bad:
        raise refuse(f"{bad} values are NaN or infinite")
    low, high = float(array.min()), float(array.max())
    if low < 0 or high > 1:
        hint = "; 8-bit images: divide by 255" if high > 1 else ""
        raise refuse(f"values in [{low:g}, {high:g}], expected [0, 1]{hint}")
    return array


def classify(loaded, model_input, tta: bool = False) -> pd.DataFrame:
    """One row per image of `model_input` (raw, in [0, 1]) for a loaded checkpoint, or for an
    ensemble (a list of them: their softmax probabilities averaged), with or without TTA."""
    from experiments.training.inference import probabilities as member_probabilities

    members = list(loaded) if isinstance(loaded, (list, tuple)) else [loaded]
    images = torch.as_tensor(checked_images(model_input))
    if len(images) == 0:
        columns = ["predicted", "probability", *[f"prob_{k}" for k in range(1, 7)]]
        if members[0].checkpoint.get("detector"):
            columns += ["detector_score", "unknown"]
        return pd.DataFrame(columns=columns)
    probabilities = (
        torch.stack([member_probabilities(m, images, tta) for m in members]).mean(0).numpy()
    )
    frame = pd.DataFrame(
        probabilities, columns=[f"prob_{k + 1}" for k in range(probabilities.shape[1])]
    )
    frame.insert(0, "probability", probabilities.max(1))
    frame.insert(0, "predicted", probabilities.argmax(1) + 1)
    detector = members[0].checkpoint.get("detector")
    if detector:  # Task 1: the new-script detector chosen on TRAIN alone, and its threshold
        from experiments.analysis.detectors import score_shipped

        score = score_shipped(detector, members[0], images).numpy()
        frame["detector_score"] = score
        frame["unknown"] = score > float(detector["threshold"])
    return frame


class GlyphClassifier:
    """The served model: the weights-only checkpoints of `data_path` (one, or an ensemble's
    `checkpoint_<i>.pt` and `ensemble.json`), this module's code."""

    def __init__(self, data_path: str | Path):
        import json

        from experiments.training.checkpoint import load_checkpoint

        folder = Path(data_path)
        members = sorted(folder.glob("checkpoint_*.pt"), key=lambda p: int(p.stem[11:]))
        paths = members or [folder / "checkpoint.pt"]
        self.loaded = [load_checkpoint(path) for path in paths]
        spec = folder / "ensemble.json"
        self.tta = bool(json.loads(spec.read_text()).get("tta")) if spec.exists() else False

    def predict(self, model_input, params=None) -> pd.DataFrame:
        return classify(self.loaded, model_input, self.tta)


def _load_pyfunc(data_path: str) -> GlyphClassifier:
    """MLflow's `loader_module` entry point: called with the logged model's data folder."""
    return GlyphClassifier(data_path)
