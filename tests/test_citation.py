"""The project is citable: CITATION.cff is valid CFF 1.2.0, credits the original study whose
datasets it uses, and states the same license as pyproject.toml and LICENSE."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from cffconvert.cli.create_citation import create_citation

ROOT = Path(__file__).resolve().parents[1]
CITATION = ROOT / "CITATION.cff"
ORIGINAL_STUDY = "https://github.com/stDem/ANN-numpy-array-images"


def _citation() -> dict:
    citation = create_citation(str(CITATION), None)
    citation.validate()  # raises on anything the CFF 1.2.0 schema rejects
    return citation.cffobj


def test_citation_cff_is_valid_cff_1_2_0():
    assert _citation()["cff-version"] == "1.2.0"


def test_cffconvert_validate_accepts_the_citation_file():
    cffconvert = Path(sys.executable).with_name("cffconvert")
    done = subprocess.run(
        [str(cffconvert), "--validate", "-i", str(CITATION)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_validation_can_fail(tmp_path):
    broken = tmp_path / "CITATION.cff"
    broken.write_text(CITATION.read_text().replace("type: data", "type: no-such-type"))
    with pytest.raises(Exception, match="no-such-type"):
        create_citation(str(broken), None).validate()


def test_the_original_study_is_credited_under_references():
    references = _citation().get("references", [])
    credited = [ref for ref in references if ref.get("url", "").rstrip("/") == ORIGINAL_STUDY]
    assert credited, f"no reference with url {ORIGINAL_STUDY}"
    ref = credited[0]
    assert ref["title"] == "ANN-numpy-array-images"
    assert ref["type"] in ("data", "software")
    assert any(a.get("name") == "stDem" or a.get("alias") == "stDem" for a in ref["authors"])


def test_the_readme_credits_the_original_study_too():
    readme = (ROOT / "README.md").read_text()
    assert "github.com/stDem/ANN-numpy-array-images" in readme
    assert "## Citing" in readme and "CITATION.cff" in readme


def test_one_license_everywhere():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert _citation()["license"] == project["license"] == "MIT"
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")


def test_requires_python_matches_the_readme():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    readme = (ROOT / "README.md").read_text()
    assert project["requires-python"] == ">=3.11"
    assert "Python 3.11" in readme
