"""Serving under misuse: `predict --out` never replaces a store, a device or a FIFO; a
registered model's files are checked against the digests recorded at promotion before
MLflow reads them; a tampered `predictions.npz` is predicted again, never trusted."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from data_tools import load_split
from experiments.cli import main
from experiments.core import config
from experiments.search.driver import run_step
from experiments.search.space import Budget
from experiments.serving import integrity, registry
from experiments.training import predictions
from experiments.training.checkpoint import load_checkpoint
from experiments.training.inference import ProbabilityCache, ensemble_accuracy, probabilities

TINY = dict(trials=1, epochs=1, train_subset=0, final_epochs=1, warmup_epochs=0)


def _one_image_folder(tmp_path: Path) -> Path:
    images = tmp_path / "in"
    images.mkdir()
    np.save(images / "a.npy", np.full((28, 28), 0.5, np.float32))
    return images


def _refused_out(out: Path, inputs: Path, capsys) -> str:
    capsys.readouterr()
    assert main(["predict", str(inputs), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --out {out}: ")
    return err[0]


def test_predict_out_refuses_fifos_devices_folders_and_store_files(tmp_path, capsys, monkeypatch):
    from experiments.tracking import store

    inputs = _one_image_folder(tmp_path)
    store.init()
    database = config.mlruns_dir() / "mlflow.db"
    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)
    before = database.read_bytes()
    assert "FIFO" in _refused_out(fifo, inputs, capsys)
    assert "character device" in _refused_out(Path("/dev/null"), inputs, capsys)
    assert "folder" in _refused_out(tmp_path, inputs, capsys)
    assert "store" in _refused_out(database, inputs, capsys)
    assert "store" in _refused_out(config.mlruns_dir() / "new.csv", inputs, capsys)
    link = tmp_path / "link.csv"  # a symlink is judged by what it points at
    link.symlink_to(database)
    assert "store" in _refused_out(link, inputs, capsys)
    assert database.read_bytes() == before and fifo.is_fifo()

    elsewhere = tmp_path / "elsewhere"  # a journal and a database outside the store folder
    elsewhere.mkdir()
    journal = elsewhere / "study.journal"
    journal.write_text("{}\n")
    monkeypatch.setenv("OPTUNA_STORAGE", str(journal))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{elsewhere / 'other.db'}")
    for target in (journal, elsewhere / "study.journal.lock", elsewhere / "other.db"):
        assert "part of the store" in _refused_out(target, inputs, capsys)
    assert journal.read_text() == "{}\n"
    assert [p.name for p in elsewhere.iterdir()] == ["study.journal"]


@pytest.fixture
def task2_answer(study_data):
    return run_step("task2-step3", "vgg", Budget(**TINY))


def _single_candidates(monkeypatch):
    real = registry.task2_candidates
    monkeypatch.setattr(
        registry,
        "task2_candidates",
        lambda: [c for c in real() if len(c.runs) == 1 and not c.tta],
    )


def _registered_folder(name: str, version: str) -> Path:
    """The store's own folder of a registered version's files."""
    import mlflow

    source = MlflowClient().get_model_version(name, version).source
    model_id = source.removeprefix("models:/")
    location = mlflow.get_logged_model(model_id).artifact_location
    return Path(location.removeprefix("file://"))


PLANTED = "from pathlib import Path\nPath({marker!r}).write_text('ran')\n"


def test_a_registered_models_files_are_checked_before_mlflow_reads_them(
    task2_answer, study_data, tmp_path, capsys, monkeypatch
):
    import yaml

    _single_candidates(monkeypatch)
    _, version, _ = registry.promote(2)
    client = MlflowClient()
    digests = json.loads(client.get_model_version("glyph-task2", version).tags["file_sha256"])
    assert "MLmodel" in digests and "data/model/checkpoint.pt" in digests
    folder = _registered_folder("glyph-task2", version)
    stored = integrity.file_digests(folder)  # MLflow adds its registered_model_meta on download
    assert stored == {k: v for k, v in digests.items() if k != "registered_model_meta"}

    inputs = _one_image_folder(tmp_path)
    uri = "models:/glyph-task2@champion"
    assert main(["predict", str(inputs), "--model", uri, "--out", str(tmp_path / "ok.csv")]) == 0

    from experiments.serving import serve as serving

    marker = tmp_path / "ran.txt"
    mlmodel = folder / "MLmodel"
    original = mlmodel.read_text()
    spec = yaml.safe_load(original)
    spec["flavors"]["python_function"]["loader_module"] = "evil_loader"
    tampered = {  # what an attacker with write access to the store's files might do
        "changed MLmodel": {"MLmodel": yaml.safe_dump(spec)},
        "planted module": {"evil_loader.py": PLANTED.format(marker=str(marker))},
        "changed weights": {"data/model/checkpoint.pt": "not the weights"},
    }
    popen = []

    class Started:  # what `serve` starts, recorded instead of run
        def __init__(self, command, env):
            popen.append((command, env))

        def wait(self, timeout=None):
            return 0

    monkeypatch.setattr(serving, "start_server", Started)
    for case, files in tampered.items():
        saved = {name: (folder / name).read_bytes() for name in files if (folder / name).exists()}
        for name, text in files.items():
            (folder / name).write_text(text)
        out = tmp_path / f"{case}.csv"
        capsys.readouterr()
        assert main(["predict", str(inputs), "--model", uri, "--out", str(out)]) == 2, case
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"error: --model {uri}: ") and "make promote" in err[-1], case
        assert "not among the files" in err[-1] or "differs from its digest" in err[-1], case
        with pytest.raises(ValueError, match="make promote"):
            serving.serve(uri, "127.0.0.1", 5999)
        assert not out.exists() and not marker.exists() and popen == [], case
        for name in files:
            (folder / name).unlink()
        for name, data in saved.items():
            (folder / name).write_bytes(data)
    assert mlmodel.read_text() == original

    client.delete_model_version_tag("glyph-task2", version, "file_sha256")
    capsys.readouterr()
    assert main(["predict", str(inputs), "--model", uri, "--out", str(tmp_path / "n.csv")]) == 2
    assert "no valid record" in capsys.readouterr().err.strip().splitlines()[-1]
    _, again, created = registry.promote(2)  # a version without digests is registered anew
    assert created and again != version
    assert serving.serve(uri, "127.0.0.1", 5999) == 0  # checked, then handed to MLflow
    ((command, env),) = popen
    at = command.index("models")
    assert command[at : at + 3] == ["models", "serve", "-m"] and command[at + 3] != uri
    expected = ["--host", "127.0.0.1", "--port", "5999", "--env-manager", "local"]
    assert command[at + 4 :] == expected
    assert env["MLFLOW_TRACKING_URI"] == config.tracking_uri()


DIGEST_TAG = "sha256.predictions.npz"  # the run tag that holds the file's digest


def _tamper(run_id: str, entries: dict[str, np.ndarray], tmp_path: Path, digest: bool) -> None:
    """Replace the run's predictions.npz; with `digest`, its logged digest too."""
    folder = tmp_path / f"tampered-{len(list(tmp_path.glob('tampered-*')))}"
    folder.mkdir()
    path = folder / predictions.ARTIFACT
    np.savez(path, **entries)
    client = MlflowClient()
    client.log_artifact(run_id, str(path))
    if digest:
        client.set_tag(run_id, DIGEST_TAG, hashlib.sha256(path.read_bytes()).hexdigest())


def test_a_tampered_predictions_file_is_predicted_again_never_trusted(
    task2_answer, study_data, tmp_path, capsys, monkeypatch
):
    run_id = task2_answer.final_run_id
    select2 = load_split("SELECT2", study_data)
    truth = probabilities(load_checkpoint(run_id), select2.images)
    real = ensemble_accuracy([truth], select2.labels)
    wrong = (select2.labels + (1 if real < 1 else 0)) % 6  # the opposite of the real answer
    fake = np.eye(6, dtype=np.float32)[wrong.numpy()]
    key = predictions.key(select2.fingerprint, False)
    fake_accuracy = ensemble_accuracy([torch.from_numpy(fake)], select2.labels)
    assert fake_accuracy != real

    _tamper(run_id, {key: fake}, tmp_path, digest=False)
    _single_candidates(monkeypatch)
    capsys.readouterr()
    champion, version, _ = registry.promote(2)
    err = capsys.readouterr().err
    assert champion.selection_acc == real
    registered = MlflowClient().get_model_version("glyph-task2", version)
    assert registered.tags["selection_acc"] == f"{real:.6f}"
    warnings = [line for line in err.splitlines() if predictions.ARTIFACT in line]
    assert len(warnings) == 1 and "differs from the sha256 digest" in warnings[0]

    for problem, entries in (
        ("dtype", {key: np.array(["1.0"] * len(select2), dtype=str)}),
        ("shape", {key: fake[:, :, None]}),
    ):
        _tamper(run_id, entries, tmp_path, digest=True)  # the digest matches: entries checked
        cache = ProbabilityCache(select2.images, load_checkpoint, select2.fingerprint)
        capsys.readouterr()
        assert cache.accuracy([run_id], False, select2.labels) == real
        assert cache.predicted == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and problem in err[0] and "Traceback" not in err[0]

    assert DIGEST_TAG in MlflowClient().get_run(run_id).data.tags
    MlflowClient().delete_tag(run_id, DIGEST_TAG)
    cache = ProbabilityCache(select2.images, load_checkpoint, select2.fingerprint)
    capsys.readouterr()
    assert cache.accuracy([run_id], False, select2.labels) == real and cache.predicted == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no logged sha256 digest" in err[0]


def test_an_empty_batch_in_any_layout_gives_an_empty_frame():
    """JSON cannot say (0, 1, 28, 28): an empty `inputs` list reaches the model as shape (0,)."""
    from types import SimpleNamespace

    from experiments.serving.pyfunc_model import classify

    member = SimpleNamespace(checkpoint={})
    for empty in ([], np.zeros((0,), np.float64), np.zeros((0, 28, 28), np.float32)):
        frame = classify(member, empty)
        assert len(frame) == 0 and {"predicted", "probability", "prob_6"} <= set(frame.columns)
