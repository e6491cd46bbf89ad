"""`predict` on new files: the logged accuracy reproduced, strict input, lineage in MLflow."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from conftest import runs_in

from experiments.cli import main
from experiments.search.driver import run_step
from experiments.search.space import Budget

TINY = dict(trials=1, epochs=1, train_subset=0, final_epochs=2, warmup_epochs=0)


@pytest.fixture
def final_run(study_data):
    return run_step("task2-step3", "vgg", Budget(**TINY))


def test_predict_on_a_dataset_folder_reproduces_the_logged_accuracy(
    final_run, study_data, tmp_path, capsys
):
    out = tmp_path / "pred.csv"
    code = main(
        ["predict", str(study_data / "TEST2"), "--model", final_run.final_run_id, "--out", str(out)]
    )
    assert code == 0
    frame = pd.read_csv(out)
    assert len(frame) == 120 and set(frame["predicted"]) <= set(range(1, 7))
    labels = frame["path"].str.extract(r"TEST2/(\d)/")[0].astype(int)
    accuracy = float((frame["predicted"] == labels).mean())
    assert accuracy == pytest.approx(final_run.final_metrics["TEST2_acc"])
    assert f"accuracy {accuracy:.4f} on 120 labelled images" in capsys.readouterr().out
    assert np.allclose(frame[[f"prob_{k}" for k in range(1, 7)]].sum(axis=1), 1, atol=1e-5)


def test_predict_on_loose_files_and_by_step_and_model(final_run, study_data, tmp_path):
    loose = tmp_path / "loose"
    loose.mkdir()
    for i, source in enumerate(sorted((study_data / "TEST2" / "3").glob("*.npy"))[:5]):
        (loose / f"x{i}.npy").write_bytes(source.read_bytes())
    out = tmp_path / "loose.csv"
    assert (
        main(
            [
                "predict",
                str(loose),
                str(loose / "x0.npy"),
                "--model",
                "task2-step3/vgg",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    frame = pd.read_csv(out)
    assert len(frame) == 6 and frame["path"].iloc[-1].endswith("x0.npy")


def test_a_bad_file_is_one_line_and_nothing_is_written(final_run, study_data, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.npy").write_bytes((study_data / "TEST2" / "1" / "img_0.npy").read_bytes())
    (bad / "b.npy").write_bytes(b"\x93NUMPY\x01\x00garbage")
    out = tmp_path / "never.csv"
    code = main(["predict", str(bad), "--model", final_run.final_run_id, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and "b.npy" in err[0]
    assert not out.exists()
    code = main(["predict", str(bad / "a.npy"), "--model", "0" * 32, "--out", str(out)])
    assert code == 2 and "cannot load" in capsys.readouterr().err and not out.exists()


def test_every_run_records_its_datasets_as_mlflow_inputs(final_run):
    run = runs_in("task2-step3", "tags.role = 'final'")[0]
    inputs = {
        (d.dataset.name, next(t.value for t in d.tags if t.key == "mlflow.data.context"))
        for d in run.inputs.dataset_inputs
    }
    assert inputs == {
        ("TRAIN3-SELECT2", "train"),  # TEST's white half minus the Task 2 selection split
        ("SELECT2", "validation"),
        ("TEST2", "evaluation"),
    }
    digests = {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs}
    assert run.data.tags["data.TEST2_fingerprint"].startswith(digests["TEST2"])
    assert run.data.tags["data.SELECT2_fingerprint"].startswith(digests["SELECT2"])


def test_every_experiment_carries_its_step_description(tmp_path):
    from mlflow.tracking import MlflowClient

    from experiments.core.steps import STEPS
    from experiments.tracking import store

    for name in ("task2-step3", "task2-pretrain", "report"):
        experiment_id = store.experiment_id(name)
        experiment = MlflowClient().get_experiment(experiment_id)
        note = experiment.tags["mlflow.note.content"]
        assert note and (name not in STEPS or note.startswith(STEPS[name].description))


PLANTED = """
from pathlib import Path
Path({marker!r}).write_text("ran")
"""

OLD_CODE_MODEL = """
import mlflow
from pathlib import Path
Path({marker!r}).write_text("ran")  # code stored with the model runs on load


class Old(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input


mlflow.models.set_model(Old())
"""


def _one_image_folder(tmp_path):
    images = tmp_path / "in"
    images.mkdir()
    np.save(images / "a.npy", np.full((28, 28), 0.5, np.float32))
    return images


def test_a_model_logged_as_code_is_refused_unrun_with_how_to_re_promote(tmp_path, capsys):
    import mlflow

    from experiments.tracking import store

    store.init()
    marker = tmp_path / "ran.txt"
    code = tmp_path / "old_model.py"
    code.write_text(OLD_CODE_MODEL.format(marker=str(marker)))
    with mlflow.start_run(experiment_id=store.experiment_id("old")) as run:
        mlflow.pyfunc.log_model(name="model", python_model=str(code))
    marker.unlink(missing_ok=True)  # logging ran it here, on purpose; loading must not
    out = tmp_path / "p.csv"
    args = ["predict", str(_one_image_folder(tmp_path)), "--model", run.info.run_id]
    status = main([*args, "--out", str(out)])
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after MLflow's own log lines
    assert status == 2 and last.startswith("error: ") and "Traceback" not in last
    assert "would run code from the store" in last and "make promote" in last
    assert not marker.exists() and not out.exists()


def test_code_planted_in_the_store_beside_a_model_is_never_run(final_run, tmp_path, capsys):
    """The logged model is data and an MLmodel naming the installed loader: Python files put
    into its folder are not imported, and an MLmodel edited to carry code is refused."""
    import yaml

    from experiments.core import config

    marker = tmp_path / "ran.txt"
    planted = PLANTED.format(marker=str(marker))
    mlmodels = list(config.artifacts_dir().rglob("MLmodel"))
    assert mlmodels
    for mlmodel in mlmodels:
        folder = mlmodel.parent
        for relative in ("code/experiments/__init__.py",
                         "code/experiments/serving/pyfunc_model.py",
                         "data/model/__init__.py", "data/model/sitecustomize.py",
                         "python_model.py", "pyfunc_model.py"):  # fmt: skip
            (folder / relative).parent.mkdir(parents=True, exist_ok=True)
            (folder / relative).write_text(planted)
    out = tmp_path / "p.csv"
    args = ["predict", str(_one_image_folder(tmp_path)), "--model", final_run.final_run_id]
    assert main([*args, "--out", str(out)]) == 0
    assert out.exists() and not marker.exists()
    for mlmodel in mlmodels:  # now the MLmodel itself says "put code/ on sys.path"
        spec = yaml.safe_load(mlmodel.read_text())
        spec["flavors"]["python_function"]["code"] = "code"
        mlmodel.write_text(yaml.safe_dump(spec))
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "q.csv")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "carries code" in last and "make promote" in last
    assert not marker.exists() and not (tmp_path / "q.csv").exists()


def test_predict_out_never_writes_over_or_inside_its_inputs(
    final_run, study_data, tmp_path, capsys
):
    image = study_data / "TEST2" / "1"
    one = sorted(image.glob("*.npy"))[0]
    before = one.read_bytes()
    run_id = final_run.final_run_id
    for paths, out in (
        ([str(one)], one),  # its own input file
        ([str(study_data / "TEST2")], image / "pred.csv"),  # inside a dataset folder
        ([str(one)], tmp_path),  # a folder
        ([str(one)], study_data / "TRAIN" / "2" / "pred.csv"),  # a dataset that is no input
    ):
        capsys.readouterr()
        assert main(["predict", *paths, "--model", run_id, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("error: --out ") and str(out) in err
    assert one.read_bytes() == before and not (image / "pred.csv").exists()
    assert not (study_data / "TRAIN" / "2" / "pred.csv").exists()


def test_predict_out_is_spreadsheet_safe_respects_the_umask_and_names_its_path(
    final_run, study_data, tmp_path, capsys
):
    import os

    folder = tmp_path / "in"
    folder.mkdir()
    np.save(folder / "=cmd.npy", np.zeros((28, 28), np.float32))
    np.save(folder / "plain.npy", np.ones((28, 28), np.float32) * 0.5)
    out = tmp_path / "pred.csv"
    old = os.umask(0o022)
    try:
        assert (
            main(["predict", str(folder), "--model", final_run.final_run_id, "--out", str(out)])
            == 0
        )
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o644
    paths = pd.read_csv(out)["path"].tolist()
    assert not any(str(p).startswith(("=", "+", "-", "@")) for p in paths)
    assert any(str(p).endswith("=cmd.npy") for p in paths)
    blocker = tmp_path / "a-file"  # a file where the output's folder should be: fails as root too
    blocker.write_text("x")
    target = blocker / "pred.csv"
    capsys.readouterr()
    code = main(["predict", str(folder), "--model", final_run.final_run_id, "--out", str(target)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and err.startswith("error: --out ") and str(target) in err
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".tmp") == []


def test_the_served_model_refuses_bad_images_and_answers_an_empty_batch(final_run, study_data):
    import mlflow
    from mlflow.exceptions import MlflowException

    model = mlflow.pyfunc.load_model(f"runs:/{final_run.final_run_id}/model")
    good = np.full((3, 1, 28, 28), 0.5, np.float32)
    assert len(model.predict(good)) == 3
    bad = {
        "NaN or infinite": np.where(np.arange(28) == 3, np.nan, 0.5).astype(np.float32)
        * np.ones((2, 1, 28, 28), np.float32),
        "divide by 255": np.full((2, 1, 28, 28), 200.0, np.float32),  # 8-bit values
        "expected [0, 1]": np.full((2, 1, 28, 28), -0.5, np.float32),
    }
    for problem, images in bad.items():
        with pytest.raises(MlflowException, match=re.escape(problem)) as refused:
            model.predict(images)
        assert refused.value.get_http_status_code() == 400  # what serving answers
    empty = model.predict(np.zeros((0, 1, 28, 28), np.float32))
    assert len(empty) == 0 and {"predicted", "probability", "prob_6"} <= set(empty.columns)
    from experiments.serving.pyfunc_model import checked_images

    assert checked_images(np.zeros((2, 28, 28), np.uint8)).shape == (2, 1, 28, 28)  # (N, 28, 28)
    with pytest.raises(MlflowException, match="shape"):
        checked_images(np.zeros((2, 3, 28, 28), np.float32))
