"""The project speaks as a user's guide: no development-timeline wording anywhere, a short
README whose first screen says what, how and with what result, numbers that come from reports/."""

from __future__ import annotations

import ast
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


# How a report or a page was made, rather than what it says: a former state of the project, an
# unfinished one, a machine on loan, a tree with changes no commit holds.
MAKING = {
    "a former state": r"\b(previous(ly)?|earlier)\b",
    "an unfinished state": r"\bnot( \w+)? yet\b",
    "a machine on loan": r"\blent\b",
    "a tree no commit holds": r"\buncommitted\b",
}
# 7-40 hex digits, at least one digit and one letter (so that words such as "decade" pass)
HEX = r"(?<![\w/.-])(?=[0-9a-f]*[0-9])(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}(?![\w/-])"
# where an identifier of that shape is not a commit hash in prose:
NOT_PROSE = (
    r"```.*?```",  # fenced code blocks
    r"`[^`\n]*`",  # inline code
    r"(?m)^\|.*$",  # table rows: data, each cell a field
    r"(?m)^(Generated on|Measured on|Measured at commit) .*$",  # a report's provenance header
    r"(?m)^[A-Z][^:\n]{0,40}\bcommit\b[^:\n]{0,40}: .*$",  # a provenance field line
    r"\bruns? [0-9a-f]{7,32}(, [0-9a-f]{7,32})*",  # MLflow run ids
    r"\bfingerprints? [0-9a-f]{7,40}",  # data fingerprints
)
# The report writers whose string literals become report text (their docstrings are not).
REPORT_WRITERS = ("experiments/bench/*.py", "experiments/search/fidelity.py")


def _prose_files() -> list[Path]:
    """README, docs/ and reports/: what a user reads as the project's statements. CHANGELOG.md
    is left out of MAKING on purpose: its subject is how the project changed over time."""
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return files + sorted((ROOT / "reports").glob("*.md"))


def _literals(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every string literal of a module except its docstrings."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
        if id(node) not in docstrings
    ]


def _making_findings(name: str, numbered_lines) -> list[str]:
    return [
        f"{name}:{number}: {what}: {line.strip()[:90]}"
        for number, line in numbered_lines
        for what, pattern in MAKING.items()
        if re.search(pattern, line, re.IGNORECASE)
    ]


def _hashes_in_prose(text: str) -> list[str]:
    for pattern in NOT_PROSE:
        text = re.sub(pattern, " ", text, flags=re.DOTALL if "```" in pattern else 0)
    return re.findall(HEX, text)


def test_no_report_or_page_narrates_how_it_was_made():
    found = []
    for path in _prose_files():
        lines = enumerate(path.read_text().splitlines(), 1)
        found += _making_findings(str(path.relative_to(ROOT)), lines)
    for pattern in REPORT_WRITERS:
        for path in sorted(ROOT.glob(pattern)):
            found += _making_findings(str(path.relative_to(ROOT)), _literals(path))
    assert found == []


def test_no_commit_hash_in_prose():
    found = {
        str(path.relative_to(ROOT)): hashes
        for path in [*_prose_files(), ROOT / "CHANGELOG.md"]
        if (hashes := _hashes_in_prose(path.read_text()))
    }
    assert found == {}


def test_the_making_and_hash_checks_can_fail():
    for sample in (
        "Not timed yet.",
        "the previous default",
        "an earlier run",
        "on a lent GPU",
        "code 45d1615b4ca2 with uncommitted changes",
    ):
        assert _making_findings("sample", [(1, sample)]), sample
    assert _hashes_in_prose("run by commit 9aa5cf4 (A) and by this tree") == ["9aa5cf4"]
    assert _hashes_in_prose("fixed in 45d1615b4ca2, see above") == ["45d1615b4ca2"]
    for allowed in (
        "Generated on 2026-12-04 from the store mlruns/mlflow.db, code 45d1615b4ca2.",
        "Baseline commit (A): 9aa5cf4.",
        "| A: 9aa5cf4 | 88 |",
        "the answer (run d3904faf9dc9, 2eece79f0056)",
        "TEST (fingerprint de6e79aa8a45ea59)",
        "`BENCH_BASELINE=9aa5cf4`",
        "a decade of defaced accede",
    ):
        assert _hashes_in_prose(allowed) == [], allowed


# A decimal with 3-4 places, as accuracies, AUROCs and coverages are written.
RUN_NUMBER = r"(?<![\w.])[01]\.\d{3,4}(?!\d)"
NOT_RUN_RESULTS = {  # numbers in README.md and docs/ that no run measured, each with its reason
    "0.0017": "one image of SELECT2's 600 (1 / 600), the resolution of a SELECT2 accuracy",
    "0.995": "a setting, not a result: the EMA decay a by-hand measurement used",
}


def _numbers(text: str) -> set[str]:
    return set(re.findall(RUN_NUMBER, text))


def test_every_accuracy_in_the_docs_is_a_reports_number():
    """A run's number in README.md or docs/ is written there by a command (like the results
    table) or, in prose, replaced by a pointer to the report that holds it: either way it is
    found in reports/."""
    reports = set()
    for path in sorted((ROOT / "reports").rglob("*")):
        if path.suffix in (".md", ".csv"):
            reports |= _numbers(path.read_text())
    found = [
        f"{path.relative_to(ROOT)}:{number}: {value}: {line.strip()[:90]}"
        for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
        for number, line in enumerate(path.read_text().splitlines(), 1)
        for value in sorted(_numbers(line))
        if value not in reports and value not in NOT_RUN_RESULTS
    ]
    assert found == []


def test_the_number_check_can_fail():
    assert _numbers("TEST2 0.9890, all of TEST 0.538; 1.000 and 0.12; 10.5000; v0.9.0") == {
        "0.9890",
        "0.538",
        "1.000",
    }


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
