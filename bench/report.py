"""Writes one benchmark's section into docs/BENCHMARKS.md, leaving the other sections alone."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

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


def in_fresh_process(script: str, *args: str) -> Any:
    """Runs `script` with `args` in a new interpreter, so that no run inherits another's
    threads or memory, and returns the JSON of its last line of output."""
    out = subprocess.run(
        [sys.executable, script, *args], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])
