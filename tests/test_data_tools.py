"""The data layer: strict reading, the cache, derived sets, the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REAL_DATA
from synthetic import write_dataset

from data_tools import DatasetError, is_white_background, load_dataset, load_split
from data_tools.__main__ import main as data_main
from data_tools.cache import load_cached


def test_load_dataset_shapes_labels_and_order(tmp_path):
    root = write_dataset(tmp_path / "DS", per_class=12)
    ds = load_dataset(root)
    assert ds.images.shape == (72, 1, 28, 28)
    assert ds.images.dtype == torch.float32
    assert ds.labels.tolist() == [label for label in range(6) for _ in range(12)]
    # natural order inside a class: img_2 before img_10
    names = [f.split("/")[1] for f in ds.files[:12]]
    assert names == [f"img_{i}.npy" for i in range(12)]
    # identical to numpy's own reader
    reference = np.load(root / "1" / "img_10.npy", allow_pickle=False)[0]
    assert np.array_equal(ds.images[10, 0].numpy(), reference)


def test_accepts_28x28_and_uint8_scaled(tmp_path):
    root = write_dataset(tmp_path / "DS", per_class=2)
    np.save(root / "1" / "img_0.npy", np.full((28, 28), 0.25, np.float32))
    np.save(root / "2" / "img_0.npy", np.full((1, 28, 28), 255, np.uint8))
    np.save(root / "3" / "img_0.npy", np.asfortranarray(np.eye(28, dtype=np.float64)))
    ds = load_dataset(root)
    assert torch.all(ds.images[0] == 0.25)
    assert torch.all(ds.images[2] == 1.0)
    assert torch.equal(ds.images[4, 0], torch.eye(28))


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/pwned-by-npy",))


def _bad_cases(root: Path) -> dict[str, tuple[callable, str]]:
    return {
        "non_integer_folder": (lambda: (root / "cats").mkdir(), "not an integer label"),
        "label_outside": (lambda: (root / "7").mkdir(), "outside the declared classes"),
        "missing_class": (
            lambda: [p.unlink() for p in (root / "6").iterdir()] and (root / "6").rmdir(),
            "missing class folder",
        ),
        "empty_class": (
            lambda: [p.unlink() for p in (root / "6").iterdir()],
            "holds no .npy files",
        ),
        "not_npy_name": (lambda: (root / "1" / "notes.txt").write_text("hi"), "not a .npy file"),
        "bad_magic": (lambda: (root / "1" / "fake.npy").write_bytes(b"PNG...." * 10), "bad magic"),
        "pickled_object": (
            lambda: np.save(
                root / "1" / "evil.npy", np.array([_Evil()], dtype=object), allow_pickle=True
            ),
            "Python objects",
        ),
        "wrong_shape": (
            lambda: np.save(root / "1" / "big.npy", np.zeros((3, 28, 28), np.float32)),
            "shape (3, 28, 28)",
        ),
        "huge_header_shape": (
            lambda: _huge_header(root / "1" / "huge.npy"),
            "shape (100000, 100000)",
        ),
        "truncated": (lambda: _truncate(root / "1" / "img_3.npy"), "truncated"),
        "nan": (
            lambda: np.save(root / "2" / "nan.npy", np.full((1, 28, 28), np.nan, np.float32)),
            "NaN or Inf",
        ),
        "inf": (lambda: np.save(root / "2" / "inf.npy", np.full((28, 28), np.inf)), "NaN or Inf"),
        "float_out_of_range": (
            lambda: np.save(root / "2" / "r.npy", np.full((28, 28), 3.0, np.float32)),
            "expected [0, 1]",
        ),
        "int_out_of_range": (
            lambda: np.save(root / "2" / "i.npy", np.full((28, 28), 300, np.int32)),
            "0..255",
        ),
        "string_dtype": (
            lambda: np.save(root / "2" / "s.npy", np.full((28, 28), "a")),
            "not a real numeric type",
        ),
        "too_large_file": (
            lambda: (root / "2" / "blob.npy").write_bytes(b"\x93NUMPY" + b"0" * 70000),
            "larger than",
        ),
        "symlink_outside": (
            lambda: (root / "3" / "link.npy").symlink_to("/etc/hostname"),
            "outside the dataset folder",
        ),
        "unreadable": (
            lambda: (root / "3" / "gone.npy").symlink_to(root / "3" / "missing.npy"),
            "cannot read file",
        ),
        "folder_in_class": (lambda: (root / "3" / "sub.npy").mkdir(), "unexpected folder"),
    }


def _huge_header(path: Path) -> None:
    header = {"descr": "<f4", "fortran_order": False, "shape": (100000, 100000)}
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, header)
        handle.write(b"\0" * 64)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])


CASES = list(_bad_cases(Path("/nonexistent")))


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_refused_with_a_clear_message_and_nothing_written(tmp_path, case):
    root = write_dataset(tmp_path / "DS", per_class=4)
    make, expected = _bad_cases(root)[case]
    make()
    cache = tmp_path / "cache"
    with pytest.raises(DatasetError) as info:
        load_cached(root, cache)
    assert expected in str(info.value)
    assert str(root) in str(info.value)
    assert not cache.exists() or not any(cache.iterdir()), "nothing may be cached after an error"
    assert not Path("/tmp/pwned-by-npy").exists()


def test_missing_split_folder(tmp_path):
    with pytest.raises(DatasetError, match="dataset folder does not exist"):
        load_split("TEST2", tmp_path)
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_split("TRAIN9", tmp_path)


def test_cli_check_prints_one_error_line_and_exits_2(tmp_path):
    root = write_dataset(tmp_path / "DS", per_class=3)
    np.save(root / "4" / "nan.npy", np.full((28, 28), np.nan, np.float32))
    proc = subprocess.run(
        [sys.executable, "-m", "data_tools", "check", str(root)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {root / '4' / 'nan.npy'}: ")
    assert "Traceback" not in proc.stderr


def test_cli_check_ok(tmp_path, capsys):
    root = write_dataset(tmp_path / "DS", per_class=3, white_fraction=1 / 3)
    assert data_main(["check", str(root)]) == 0
    out = capsys.readouterr().out
    assert "18 images" in out and "12 black, 6 white" in out


def test_prepare_writes_no_cache_when_a_split_is_bad(study_data, tmp_path, capsys):
    (study_data / "TEST2" / "3" / "x.npy").write_bytes(b"garbage")
    assert data_main(["prepare"]) == 2
    cache = tmp_path / "cache"
    entries = [p.name for p in cache.iterdir()] if cache.exists() else []
    assert not any(name.startswith("TEST2") for name in entries)
    assert not any(name.startswith(".") for name in entries), "no temporary leftovers"


def test_cache_warm_hit_and_rebuild_on_same_name_new_content(tmp_path):
    root = write_dataset(tmp_path / "DS", per_class=3)
    cache = tmp_path / "cache"
    first, digest = load_cached(root, cache)
    assert len(list(cache.iterdir())) == 1
    again, digest_again = load_cached(root, cache)
    assert digest_again == digest and np.array_equal(again.images, first.images)

    target = root / "2" / "img_1.npy"
    stat = target.stat()
    np.save(target, np.full((1, 28, 28), 0.5, np.float32))
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same name, size and mtime
    changed, digest_changed = load_cached(root, cache)
    assert digest_changed != digest
    assert np.all(changed.images[4] == 0.5)
    assert len(list(cache.iterdir())) == 1, "the stale entry is removed"


def test_a_cache_entry_written_meanwhile_by_another_process_is_kept(tmp_path, monkeypatch):
    """Parallel jobs on a fresh clone fill the same new cache entry: the one that renames its
    folder second found the first one's in place ("Directory not empty") and failed. It now
    keeps the entry (same name: same folder state) and its own data."""
    import data_tools.cache as cache_module

    root = write_dataset(tmp_path / "DS", per_class=3)
    cache = tmp_path / "cache"
    expected, digest = load_cached(root, cache)
    (entry,) = cache.iterdir()
    real_verify = cache_module._verify_entry

    def missed_then_written(*args, **kwargs):  # this process misses; the other one wins
        raise cache_module._BadEntry("not there yet")

    monkeypatch.setattr(cache_module, "_verify_entry", missed_then_written)
    monkeypatch.setattr(cache_module, "_remove", lambda path: None)  # nothing removed meanwhile
    raw, again = load_cached(root, cache)
    assert again == digest and np.array_equal(raw.images, expected.images)
    assert [p.name for p in cache.iterdir()] == [entry.name], "no temporary folder left"
    monkeypatch.setattr(cache_module, "_verify_entry", real_verify)
    assert load_cached(root, cache)[1] == digest  # the kept entry verifies


def test_processes_filling_a_new_cache_at_once_all_succeed(tmp_path):
    root = write_dataset(tmp_path / "DS", per_class=20)
    code = f"from data_tools.cache import load_cached; load_cached({str(root)!r}, CACHE)"
    for attempt in range(3):
        cache = str(tmp_path / f"cache{attempt}")
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", code.replace("CACHE", repr(cache))], stderr=subprocess.PIPE
            )
            for _ in range(3)
        ]
        errors = [p.communicate(timeout=120)[1].decode() for p in procs]
        failed = [e for p, e in zip(procs, errors, strict=True) if p.returncode]
        assert not failed, failed
        assert len(os.listdir(cache)) == 1


def test_damaged_cache_is_rebuilt(tmp_path):
    root = write_dataset(tmp_path / "DS", per_class=2)
    cache = tmp_path / "cache"
    load_cached(root, cache)
    entry = next(cache.iterdir())
    (entry / "images.npy").write_bytes(b"broken")
    raw, _ = load_cached(root, cache)
    assert raw.images.shape == (12, 28, 28)


def test_background_rule_and_derived_sets(study_data):
    train = load_split("TRAIN", study_data)
    test = load_split("TEST", study_data)
    assert not is_white_background(train.images).any()
    assert int(test.white.sum()) == 60
    train2 = load_split("TRAIN2", study_data)
    assert len(train2) == 2 * len(train)
    assert torch.allclose(train2.images[len(train) :], 1 - train.images)
    assert torch.equal(train2.labels[len(train) :], train.labels)
    assert int(train2.white.sum()) == len(train)
    train3 = load_split("TRAIN3", study_data)
    assert len(train3) == 60 and bool(train3.white.all())


def test_derive_cli_writes_folder_that_loads_back(study_data, tmp_path):
    out = tmp_path / "out" / "TRAIN3"
    assert data_main(["derive", "TRAIN3", "--out", str(out)]) == 0
    back = load_dataset(out)
    original = load_split("TRAIN3", study_data)
    assert torch.equal(back.labels, original.labels)
    assert torch.allclose(back.images, original.images)
    # refuses to overwrite, and never writes into the datasets folder
    assert data_main(["derive", "TRAIN3", "--out", str(out)]) == 2
    assert data_main(["derive", "TRAIN2", "--out", str(study_data / "TRAIN2")]) == 2
    assert not (study_data / "TRAIN2").exists()


def test_analyze_writes_figures_and_summary(study_data, tmp_path):
    out = tmp_path / "reports"
    assert data_main(["analyze", "--out", str(out)]) == 0
    figures = {p.name for p in (out / "figures").iterdir()}
    assert {
        "histogram.png",
        "class_means.png",
        "background_split.png",
        "samples_TEST.png",
    } <= figures
    summary = (out / "data_summary.md").read_text()
    assert "| TEST | 120 |" in summary


@pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"real datasets not found at {REAL_DATA}")
def test_real_data_counts(tmp_path):
    train = load_split("TRAIN", REAL_DATA, tmp_path / "cache")
    test = load_split("TEST", REAL_DATA, tmp_path / "cache")
    test2 = load_split("TEST2", REAL_DATA, tmp_path / "cache")
    assert (len(train), len(test), len(test2)) == (36000, 6000, 6000)
    assert int(train.white.sum()) == 0
    assert int(test.white.sum()) == 3000
    assert int((~test2.white).sum()) == 0
    assert torch.bincount(test.labels).tolist() == [1000] * 6


def test_selection_split_is_a_stratified_seeded_fifth_of_tests_white_half(study_data):
    test = load_split("TEST", study_data)
    selection = load_split("SELECT2", study_data)
    assert len(selection) == 12 and bool(selection.white.all())  # 20 % of 60 white images
    assert torch.bincount(selection.labels, minlength=6).tolist() == [2] * 6
    again = load_split("SELECT2", study_data)
    assert again.files == selection.files and again.fingerprint == selection.fingerprint
    assert set(selection.files) <= {f for f, w in zip(test.files, test.white, strict=True) if w}


def test_without_removes_held_out_images_by_content(study_data):
    selection = load_split("SELECT2", study_data)
    for name, expected in (("TEST", 120 - 12), ("TRAIN3", 60 - 12), ("TRAIN_TEST", 240 - 12)):
        kept = load_split(name, study_data).without(selection)
        assert len(kept) == expected
        held = {image.numpy().tobytes() for image in selection.images}
        assert not any(image.numpy().tobytes() in held for image in kept.images)
        assert kept.fingerprint != load_split(name, study_data).fingerprint


def _published_copy(tmp_path, study_data):
    """A git repository laid out as the published one (TRAIN, TEST, TEST2 at its root)."""
    import shutil
    import subprocess

    repo = tmp_path / "published"
    repo.mkdir()
    for name in ("TRAIN", "TEST", "TEST2"):
        shutil.copytree(study_data / name, repo / name)
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@localhost"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "data"], check=True)
    return repo


def test_fetch_from_a_file_url_then_prepare_reports_other_fingerprints(
    study_data, tmp_path, capsys
):
    repo = _published_copy(tmp_path, study_data)
    raw = tmp_path / "project" / "data" / "raw"
    assert data_main(["fetch", "--out", str(raw), "--source", f"file://{repo}"]) == 0
    assert sorted(p.name for p in raw.iterdir()) == ["TEST", "TEST2", "TRAIN"]
    assert [p.name for p in raw.parent.iterdir()] == ["raw"]  # no scratch left behind
    before = sorted(str(p) for p in raw.rglob("*.npy"))
    capsys.readouterr()
    assert data_main(["fetch", "--out", str(raw), "--source", f"file://{repo}"]) == 2
    err = capsys.readouterr().err
    assert "never overwrites" in err and err.count("\n") == 1
    assert sorted(str(p) for p in raw.rglob("*.npy")) == before
    assert data_main(["--data-dir", str(raw), "prepare"]) == 0
    err = capsys.readouterr().err  # the synthetic sets are not the published ones
    assert all(f"{name}: fingerprint" in err for name in ("TRAIN", "TEST", "TEST2"))
    assert "not be comparable" in err


def test_fetch_that_fails_leaves_nothing_and_a_missing_folder_says_how_to_get_the_data(
    tmp_path, capsys
):
    raw = tmp_path / "data" / "raw"
    assert data_main(["fetch", "--out", str(raw), "--source", f"file://{tmp_path}/none"]) == 2
    err = capsys.readouterr().err
    assert "cannot clone" in err and err.count("\n") == 1
    assert not raw.exists() and list((tmp_path / "data").iterdir()) == []
    assert data_main(["--data-dir", str(raw), "prepare"]) == 2
    err = capsys.readouterr().err
    assert "python -m data_tools fetch" in err and "DATA_DIR" in err and err.count("\n") == 1


def test_the_published_datas_fingerprints_are_the_expected_ones():
    """On the real data (where present), the committed fingerprints are its own."""
    from data_tools import load_split
    from data_tools import paths as config
    from data_tools.fetch import EXPECTED_FINGERPRINTS

    root = config.data_dir()
    if not (root / "TRAIN").is_dir():
        pytest.skip(f"the real datasets are not at {root}")
    for name, expected in EXPECTED_FINGERPRINTS.items():
        assert load_split(name, root, config.cache_dir()).fingerprint == expected
