"""Writes one benchmark's section into docs/BENCHMARKS.md, leaving the other sections alone."""

from __future__ import annotations

import re
from pathlib import Path

HEADER = (
    "# Benchmarks\n\n"
    "Speed is measured here, never asserted in tests: every figure is a ratio against peers\n"
    "measured in the same run on the same machine. Regenerate a section with the command it\n"
    "shows.\n"
)


def write_section(path: Path, name: str, markdown: str) -> None:
    text = path.read_text() if path.exists() else HEADER
    begin, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
