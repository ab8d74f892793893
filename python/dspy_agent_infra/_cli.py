"""The `dspy-agent` command: a thin entry point into the Rust command line."""

from __future__ import annotations

import os
import signal
import sys

from ._native import cli


def main(argv: list[str] | None = None) -> int:
    """Runs `dspy-agent` with `argv` (default: this process's arguments); returns the exit code."""
    # A command line stops on Ctrl-C and ends quietly when its output pipe closes (`| head`),
    # as other Unix tools do; the daemon and the watchdog it launches ignore SIGPIPE again.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    args = sys.argv[1:] if argv is None else argv
    package_root = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    return cli(["dspy-agent", *args], sys.executable, package_root)


if __name__ == "__main__":
    sys.exit(main())
