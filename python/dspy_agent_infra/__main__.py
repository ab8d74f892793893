"""`python -m dspy_agent_infra ...` is the `dspy-agent` command."""

import sys

from ._cli import main

sys.exit(main())
