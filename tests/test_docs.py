"""The project speaks as a user's guide: no development-timeline wording anywhere, a short
README whose first screen says what, how and with what result, numbers that come from reports/."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMELINE = {  # wording that narrates how the project was built instead of what it does
    "a work period": r"\bsess" r"ions?\b",  # split so that this file does not name one
    "a work round": r"\b(this|that|next|previous|earlier) rounds?\b|\buntil this\b",
    "an issue": r"\bissues?\b|(?<![\w&])#\d{1,3}\b",
    "the first person": r"(?<![\w/.'`-])I(?=[ ,;:!?]|'[a-z]|$)|\b[Ww]e\b|\b[Oo]ur\b|\b[Mm]y\b",
    "the last few": r"\bthe last (two|three|four|five|few) (runs|rounds|commits|weeks)\b",
}


def _texts() -> list[Path]:
    files = [ROOT / name for name in ("README.md", "CHANGELOG.md", "Makefile", "pyproject.toml")]
    files += [ROOT / ".ci" / "run", *sorted((ROOT / "docs").glob("*.md"))]
    files += sorted((ROOT / "reports").glob("*.md"))
    for package in ("experiments", "models", "data_tools", "tests"):
        files += sorted((ROOT / package).rglob("*.py"))
    return [path for path in files if path.exists() and path != Path(__file__).resolve()]


def test_no_text_narrates_the_development_timeline():
    found = [
        f"{path.relative_to(ROOT)}:{number}: {what}: {line.strip()[:90]}"
        for path in _texts()
        for number, line in enumerate(path.read_text().splitlines(), 1)
        for what, pattern in TIMELINE.items()
        if re.search(pattern, line)
    ]
    assert found == []


def test_the_wording_check_can_fail():
    samples = [
        "Until th" + "is rou" + "nd, I measured it.",
        "fixed in #13",
        "the last three runs",
        "our run",
    ]
    for sample in samples:
        assert any(re.search(pattern, sample) for pattern in TIMELINE.values()), sample


def test_the_readme_is_short_and_its_first_screen_says_what_how_and_the_results():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 260
    first = "\n".join(lines[:60])
    assert "data_tools fetch" in first  # how to get the data
    assert "make reproduce" in first and "make test" in first  # the two commands
    assert re.search(r"\d+ min", first)  # with expected times
    assert "| trained / evaluated" in first  # the results table


def test_the_readme_results_are_the_reports_numbers():
    from experiments.reporting.report import README_END, README_START, headline_table

    text = (ROOT / "README.md").read_text()
    block = text.partition(README_START)[2].partition(README_END)[0].strip()
    if not block:
        pytest.fail("README has no results table between its markers")
    cells = pd.read_csv(ROOT / "reports" / "comparison.csv")
    assert block == headline_table(cells).strip()


def test_update_readme_rewrites_only_the_block_between_the_markers(tmp_path):
    from experiments.reporting.report import README_END, README_START, update_readme

    path = tmp_path / "README.md"
    path.write_text(f"intro\n{README_START}\nold table\n{README_END}\nrest\n")
    assert update_readme(path, "| new |")
    assert path.read_text() == f"intro\n{README_START}\n| new |\n{README_END}\nrest\n"
    plain = tmp_path / "PLAIN.md"
    plain.write_text("no markers\n")
    assert not update_readme(plain, "| new |") and plain.read_text() == "no markers\n"
