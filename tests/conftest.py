"""Shared fixtures: every test's stores and caches live in its own tmp_path."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from synthetic import write_study_data  # noqa: E402

REAL_DATA = (
    Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ann-numpy-array-images"
)


@pytest.fixture(autouse=True)
def isolated_stores(tmp_path, monkeypatch):
    """MLflow, Optuna, the dataset cache and reports all point into tmp_path."""
    monkeypatch.setenv("MLRUNS_DIR", str(tmp_path / "mlruns"))
    monkeypatch.setenv("CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("REPORTS_DIR", str(tmp_path / "reports"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("OPTUNA_STORAGE", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("RESUME_DIR", raising=False)  # long runs' states: under CACHE_DIR
    monkeypatch.delenv("GLYPH_CUDA_GRAPHS", raising=False)
    yield
    if "mlflow" in sys.modules:
        import mlflow

        while mlflow.active_run() is not None:
            mlflow.end_run()


def runs_in(experiment: str, filter_string: str = "") -> list:
    """All MLflow runs of an experiment of the (tmp_path) store, optionally filtered."""
    from mlflow.tracking import MlflowClient

    from experiments.tracking import store

    store.init()
    return MlflowClient().search_runs(
        [store.experiment_id(experiment)], filter_string, max_results=200
    )


@pytest.fixture
def study_data(tmp_path, monkeypatch) -> Path:
    """A tiny TRAIN/TEST/TEST2 folder set, used as DATA_DIR."""
    root = write_study_data(tmp_path / "data", per_class=20)
    monkeypatch.setenv("DATA_DIR", str(root))
    return root
