"""Rooms a newcomer can find: few modules a folder, none too long to see whole."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PACKAGES = ("experiments", "models", "data_tools")
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 60


def _modules() -> list[Path]:
    return [path for package in PACKAGES for path in (ROOT / package).rglob("*.py")]


def test_experiments_holds_few_modules_and_each_subpackage_says_what_lives_there():
    top = sorted(path.name for path in (ROOT / "experiments").glob("*.py"))
    assert len(top) <= 8, top
    subpackages = [path for path in (ROOT / "experiments").iterdir() if path.is_dir()]
    subpackages = [path for path in subpackages if path.name != "__pycache__"]
    assert len(subpackages) >= 6
    for package in subpackages:
        init = package / "__init__.py"
        assert init.exists(), f"{package.name}/ is not a package"
        assert ast.get_docstring(ast.parse(init.read_text())), f"{package.name}/ says nothing"
        assert len(list(package.glob("*.py"))) <= 9, f"{package.name}/ is a crowded room"


def test_no_module_and_no_function_is_too_long_to_see_whole():
    modules = _modules()
    assert any(path.parent.parent.name == "experiments" for path in modules)  # subfolders walked
    long_modules = {
        path.relative_to(ROOT).as_posix(): lines
        for path in modules
        if (lines := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert long_modules == {}
    long_functions = {
        f"{path.relative_to(ROOT).as_posix()}:{node.name}": node.end_lineno - node.lineno + 1
        for path in modules
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    }
    assert long_functions == {}


def test_the_command_line_is_a_package_of_small_command_groups():
    cli = ROOT / "experiments" / "cli"
    assert (cli / "__init__.py").exists() and not (ROOT / "experiments" / "cli.py").exists()
    sizes = {path.name: len(path.read_text().splitlines()) for path in cli.glob("*.py")}
    assert len(sizes) >= 5 and all(lines < 300 for lines in sizes.values()), sizes


def test_no_line_is_packed_past_the_formatter():
    """Line and function limits are met by design, not by lines the formatter may not touch."""
    packed = [
        f"{path.relative_to(ROOT).as_posix()}:{number}"
        for path in _modules()
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if "fmt: " + "skip" in line or "fmt: " + "off" in line
    ]
    assert packed == []
