"""The MLflow model of a trained classifier, logged as code (MLflow's "models from code").

Nothing in the logged model is a pickle: this file is stored as the model's
code, the project's weights-only checkpoint as its artifact. Loading runs
`load_checkpoint` (`torch.load(weights_only=True)`), so an artifact store can
hand back weights, never code to run.

`predict` takes raw images `(N, 1, 28, 28)` (or `(N, 28, 28)`) float32 in [0, 1]
and returns one row per image: `predicted` (the class folder name, 1..6),
`probability` (of that class) and `prob_1` .. `prob_6`. An ensemble's model carries
one checkpoint per member (`checkpoint_0`, ...) and `ensemble.json` (`tta`): their
softmax probabilities are averaged, over the one-pixel shifts too with TTA. A checkpoint that
carries a new-script detector (`detector` entry: name and threshold) adds
`detector_score` and `unknown` (True where the detector flags the image).
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch


def classify(loaded, model_input, tta: bool = False) -> pd.DataFrame:
    """One row per image of `model_input` (raw, in [0, 1]) for a loaded checkpoint, or for an
    ensemble (a list of them: their softmax probabilities averaged), with or without TTA."""
    from experiments.training.inference import probabilities as member_probabilities

    members = list(loaded) if isinstance(loaded, (list, tuple)) else [loaded]
    images = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
    if images.ndim == 3:
        images = images.unsqueeze(1)
    if images.ndim != 4 or tuple(images.shape[1:]) != (1, 28, 28):
        raise ValueError(f"expected images (N, 1, 28, 28), got {tuple(images.shape)}")
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


class GlyphClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        import json

        from experiments.training.checkpoint import load_checkpoint

        artifacts = context.artifacts  # "checkpoint", or an ensemble's "checkpoint_<i>"
        names = (
            ["checkpoint"]
            if "checkpoint" in artifacts
            else sorted(
                (k for k in artifacts if k.startswith("checkpoint_")), key=lambda k: int(k[11:])
            )
        )
        self.loaded = [load_checkpoint(artifacts[name]) for name in names]
        spec = artifacts.get("ensemble")
        self.tta = bool(json.loads(Path(spec).read_text()).get("tta")) if spec else False

    # An ndarray hint: MLflow validates nothing from it (the logged signature does) and, unlike
    # no hint, does not print its advice on type hints at every load.
    def predict(self, context, model_input: np.ndarray, params=None) -> pd.DataFrame:
        return classify(self.loaded, model_input, self.tta)


if __name__ != "experiments.serving.pyfunc_model":  # run as a model file by MLflow, not imported
    mlflow.models.set_model(GlyphClassifier())
