"""Writes docs/API.md from the package's docstrings and docs/CLI.md from the command line's own
help, so both references say what the code does. `--check` fails when either file is stale.

Usage: python scripts/gen_docs.py [--check]
"""

from __future__ import annotations

import argparse
import ast
import inspect
import subprocess
import sys
from pathlib import Path
from typing import Any

import dspy_agent_infra
from dspy_agent_infra import (
    AgentInfra,
    OrchestratorClient,
    ServiceInfo,
    SubmitResponse,
    Task,
    TaskInfo,
    TaskStatus,
    errors,
)

ROOT = Path(__file__).resolve().parents[1]


def doc(obj: Any) -> str:
    text = inspect.getdoc(obj) or ""
    return text.strip()


def signature(obj: Any) -> str:
    """The signature as written, without `self`/`cls` (annotations are strings in the source)."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return ""
    params = [p for p in sig.parameters.values() if p.name not in ("self", "cls")]
    return str(sig.replace(parameters=params)).replace("'", "")


def members(cls: type, constructor: bool) -> list[tuple[str, Any]]:
    """Public members defined on the class itself, in source order; `__init__` when the class
    is built by calling it."""
    return [
        (name, value)
        for name, value in cls.__dict__.items()
        if not name.startswith("_") or (constructor and name == "__init__")
    ]


def describe_class(cls: type, constructor: bool) -> list[str]:
    out = [f"## `{cls.__name__}`", ""]
    if doc(cls):
        out += [doc(cls), ""]
    for name, value in members(cls, constructor):
        if isinstance(value, property) or type(value).__name__ == "getset_descriptor":
            text = " ".join(doc(value).split())
            out.append(f"- **`{name}`** (attribute)" + (f": {text}" if text else ""))
            continue
        if isinstance(value, (classmethod, staticmethod)):
            value = value.__func__
        if not callable(value):
            continue
        sig = signature(value)
        if name == "__init__":
            name = cls.__name__
        asynchronous = inspect.iscoroutinefunction(value) or inspect.isasyncgenfunction(value)
        prefix = "async " if asynchronous else ""
        out.append(f"- **`{prefix}{name}{sig}`**")
        text = doc(value)
        if text:
            out += ["", textwrap_indent(text), ""]
    out.append("")
    return out


def textwrap_indent(text: str) -> str:
    return "\n".join(f"  {line}" if line else "" for line in text.splitlines())


def describe_native(cls: type) -> list[str]:
    """Classes of the compiled core, as their type stubs (``_native.pyi``) document them."""
    tree = ast.parse((ROOT / "python" / "dspy_agent_infra" / "_native.pyi").read_text())
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
    out = [f"## `{cls.__name__}`", ""]
    text = ast.get_docstring(node) or doc(cls)
    if text:
        out += [text, ""]
    for item in node.body:
        if not isinstance(item, ast.FunctionDef) or item.name.startswith("_"):
            continue
        returns = ast.unparse(item.returns) if item.returns else "None"
        text = " ".join((ast.get_docstring(item) or "").split())
        is_property = any(ast.unparse(d) == "property" for d in item.decorator_list)
        if is_property:
            label = f"**`{item.name}`** (`{returns}`)"
        else:
            params = ast.unparse(item.args).removeprefix("self, ").removeprefix("self")
            label = f"**`{item.name}({params}) -> {returns}`**"
        out.append(f"- {label}" + (f": {text}" if text else ""))
    out.append("")
    return out


def api() -> str:
    out = [
        "# Python API",
        "",
        "Generated from the docstrings by `python scripts/gen_docs.py`; do not edit by hand.",
        "",
        doc(dspy_agent_infra),
        "",
    ]
    out += describe_class(AgentInfra, constructor=False)
    out += describe_class(OrchestratorClient, constructor=True)
    for cls in (ServiceInfo, TaskInfo, SubmitResponse, Task):
        out += describe_native(cls)
    out += ["## `TaskStatus`", "", doc(TaskStatus), ""]
    out += ["Members: " + ", ".join(f"`{m.name}`" for m in TaskStatus), ""]
    out += ["## Errors", "", doc(errors), ""]
    for name in errors.__all__:
        cls = getattr(errors, name)
        bases = ", ".join(b.__name__ for b in cls.__bases__)
        out += [f"### `{name}({bases})`", "", doc(cls), ""]
    return "\n".join(out).rstrip() + "\n"


def cli_help(*args: str) -> str:
    command = Path(sys.executable).parent / "dspy-agent"
    return subprocess.run(
        [str(command), *args, "--help"], capture_output=True, text=True, check=True
    ).stdout


def subcommands(help_text: str) -> list[str]:
    """The commands a `--help` lists under "Commands:" (clap's own tree), but `help`."""
    names: list[str] = []
    listing = False
    for line in help_text.splitlines():
        if line == "Commands:":
            listing = True
        elif listing and not line.strip():
            break
        elif listing and line.startswith("  ") and not line.startswith("   "):
            name = line.split()[0]
            if name != "help":
                names.append(name)
    return names


def command_tree(*args: str) -> list[tuple[list[str], str]]:
    """Every command, depth first from `args`, with its help: new commands are found, never
    listed by hand."""
    text = cli_help(*args)
    found = [(list(args), text)]
    for name in subcommands(text):
        found += command_tree(*args, name)
    return found


def undocumented(help_text: str) -> list[str]:
    """The options and arguments of a `--help` printed without a line saying what they do."""
    missing = []
    section = ""
    for line in help_text.splitlines():
        if line in ("Options:", "Arguments:"):
            section = line
        elif not line.strip():
            section = ""
        elif section and line.startswith("  ") and not line.startswith("          "):
            entry = line.strip()
            # clap puts the help two or more spaces after the flag, or on the next lines.
            if "  " not in entry:
                missing.append(entry)
    return missing


def cli() -> str:
    out = [
        "# Command line",
        "",
        "Generated from `dspy-agent --help` by `python scripts/gen_docs.py`: every command of",
        "the command tree, as its own `--help` prints it; do not edit by hand.",
        "Exit codes: 0 done, 1 failed, 2 bad usage or configuration, 3 not running.",
        "",
    ]
    for args, text in command_tree():
        shown = " ".join(["dspy-agent", *args])
        out += [f"## `{shown}`", "", "```text", text.rstrip(), "```", ""]
    return "\n".join(out).rstrip() + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when a file is stale")
    args = parser.parse_args()
    stale = []
    for path, text in ((ROOT / "docs" / "API.md", api()), (ROOT / "docs" / "CLI.md", cli())):
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.write_text(text)
    bare = [
        f"dspy-agent {' '.join(args)}: {entry}"
        for args, text in command_tree()
        for entry in undocumented(text)
    ]
    if stale:
        print(f"stale: {', '.join(stale)}; run python scripts/gen_docs.py", file=sys.stderr)
    if bare:
        print("without a help line (add a /// comment):\n  " + "\n  ".join(bare), file=sys.stderr)
    return 1 if stale or bare else 0


if __name__ == "__main__":
    sys.exit(main())
