"""The README's Python examples type-check with `mypy --strict` against the stubs, and the generated
references match the code."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from helpers import ROOT


def test_readme_examples_pass_mypy_strict(tmp_path: Path) -> None:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    assert len(blocks) >= 2
    files = []
    for i, block in enumerate(blocks):
        path = tmp_path / f"readme_example_{i}.py"
        path.write_text(block)
        files.append(str(path))
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", *files],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_generated_references_are_current() -> None:
    """docs/CLI.md holds every command of the command tree, each flag with a help line."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_docs.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    cli = (ROOT / "docs" / "CLI.md").read_text()
    for command in (
        "import", "export kubernetes", "token", "dashboard", "version", "config init",
        "config show", "config validate", "tasks prune", "tasks submit",
    ):  # fmt: skip
        assert f"## `dspy-agent {command}`" in cli, command


# A duration as the docs write one: "250ms", "30s", "7d", "1h30m".
DURATION = re.compile(
    r"(?<![\w.$/-])\d+(?:\.\d+)?(?:ms|[smhdw])(?:\d+(?:\.\d+)?(?:ms|[smhdw]))*(?![\w.])"
)


def test_every_duration_the_docs_show_parses(tmp_path: Path) -> None:
    """Durations of the docs, the `config init` template and every `--help` (docs/CLI.md, kept
    current by the test above) are all accepted where a duration is read."""
    from test_cli import DSPY_AGENT

    from dspy_agent_infra import AgentInfra

    init = subprocess.run(
        [DSPY_AGENT, "config", "init"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert init.returncode == 0, init.stderr
    texts = [(tmp_path / "dspy-agent.toml").read_text(), (ROOT / "README.md").read_text()]
    texts += [p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))]
    found = {d for text in texts for d in DURATION.findall(text)}
    assert {"7d", "30s", "250ms", "10m"} <= found, found
    for duration in sorted(found):
        # A duration without limits of its own: how long a service has to stop.
        AgentInfra.start(
            services=["redis"], config={"services": {"redis": {"stop_timeout": duration}}}
        )
    # The template's commented lines are the defaults: uncommented, they still load (all but
    # the token, whose "..." stands for one of the user's own).
    template = (tmp_path / "dspy-agent.toml").read_text()
    setting = re.compile(r"# (\[[a-z_.]+\]|(?!token )[a-z_]+ = )")
    uncommented = "\n".join(
        line[2:] if setting.match(line) else line for line in template.splitlines()
    )
    (tmp_path / "dspy-agent.toml").write_text(uncommented)
    check = subprocess.run(
        [DSPY_AGENT, "config", "validate"], cwd=tmp_path, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_every_toml_block_of_the_docs_validates(tmp_path: Path) -> None:
    """Each `toml` block of README.md and docs/ is a whole dspy-agent.toml that
    `config validate` accepts as it is written."""
    from test_cli import DSPY_AGENT

    blocks = [
        (doc.name, i, block)
        for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
        for i, block in enumerate(re.findall(r"```toml\n(.*?)```", doc.read_text(), re.DOTALL))
    ]
    assert len(blocks) >= 4
    for name, i, block in blocks:
        folder = tmp_path / f"{name}-{i}"
        folder.mkdir()
        (folder / "dspy-agent.toml").write_text(block)
        check = subprocess.run(
            [DSPY_AGENT, "config", "validate"], cwd=folder, capture_output=True, text=True
        )
        assert check.returncode == 0, (name, i, check.stderr)


def test_every_command_line_of_the_docs_is_one_the_cli_takes() -> None:
    """Each `dspy-agent ...` line of a shell block in README.md and docs/ is accepted as
    written by the command line's parser (`--help` appended, so that nothing runs: clap still
    refuses an unknown flag or a stray argument). The blocks' other lines set up machines
    (`docker swarm`, `kubectl`, `podman`) and run in the Swarm, Podman and export tests."""
    import shlex

    from test_cli import DSPY_AGENT

    lines = [
        (doc.name, line)
        for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
        for block in re.findall(r"```(?:bash|sh)\n(.*?)```", doc.read_text(), re.DOTALL)
        for line in block.splitlines()
        if line.strip().startswith("dspy-agent ")
    ]
    assert len(lines) >= 15, lines
    for name, line in lines:
        words = shlex.split(line, comments=True)
        check = subprocess.run(
            [DSPY_AGENT, *words[1:], "--help"], capture_output=True, text=True, timeout=30
        )
        assert check.returncode == 0, (name, line, check.stderr)


def test_every_shell_block_of_the_docs_runs_somewhere_or_says_why_not() -> None:
    """A shell block of README.md or docs/ is either only `dspy-agent` command lines (checked
    above), or says right before it, in an HTML comment, which test runs it (`runs in ...`) or
    what it needs that a test machine lacks (`needs ...`); the files it names exist."""
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text()
        for match in re.finditer(r"(?:^|\n)([^\n]*)\n```(?:bash|sh)\n(.*?)```", text, re.DOTALL):
            before, block = match.group(1), match.group(2)
            commands = [
                line for line in block.splitlines() if line.strip() and not line.startswith("#")
            ]
            if all(line.startswith("dspy-agent ") for line in commands):
                continue
            said = re.fullmatch(r"<!-- (runs in|needs) (.+) -->", before.strip())
            assert said, f"{doc.name}: a shell block that no test runs says nothing:\n{block}"
            for path in re.findall(r"(?:tests|scripts)/[\w/]+\.(?:py|sh)|\.ci/run", said[2]):
                assert (ROOT / path).exists(), (doc.name, path)
