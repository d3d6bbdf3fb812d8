"""The long fuzz run: tests/e2e/test_fuzz.py with many more requests, drawn at random (not the CI corpus).

    .venv/bin/python bench/fuzz_long.py [EXAMPLES]      # default 20,000 HTTP requests (and 1/8 as many frames)

It prints the requests by route and status; a 5xx, a hang, an escaped file or a daemon that no
longer runs a job fails it, with the request that did it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    examples = sys.argv[1] if len(sys.argv) > 1 else "20000"
    env = {**os.environ, "BURLA_FUZZ_EXAMPLES": examples, "BURLA_FUZZ_RANDOM": "1"}
    command = [sys.executable, "-m", "pytest", "tests/e2e/test_fuzz.py", "-q", "-s", "-p", "no:cacheprovider",
               "--timeout", "3600"]  # fmt: skip
    return subprocess.call(command, cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main())
