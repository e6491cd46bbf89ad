"""Markdown reports that several commands write, each replacing only its own `## ` sections."""

from __future__ import annotations

import re
from typing import NamedTuple


class Target(NamedTuple):
    """A stated target, what was measured against it, and whether it was met."""

    name: str
    measured: str
    met: bool


def markdown_sections(text: str) -> tuple[str, dict[str, str]]:
    """A markdown file's title block, and its `## ` sections by heading line, in order."""
    head, *parts = re.split(r"(?m)^(?=## )", text)
    return head, {part.splitlines()[0]: part for part in parts}
