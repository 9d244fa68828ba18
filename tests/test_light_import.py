"""Importing forwardgrad, and asking the command line for help, load neither matplotlib nor tqdm.

Both are made unimportable in a fresh interpreter: any import of them by forwardgrad then fails.
(torch itself tries tqdm for its hub downloads and carries on without it.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

BLOCK = "import sys\nsys.modules['matplotlib'] = None\nsys.modules['tqdm'] = None\n"


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCK + code],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_import_forwardgrad_loads_neither_matplotlib_nor_tqdm():
    done = run("import forwardgrad, forwardgrad.experiments, forwardgrad.reporting\nprint('ok')")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "ok\n"


def test_help_loads_neither_matplotlib_nor_tqdm():
    code = (
        "from forwardgrad.cli import main\n"
        "for command in ([], ['train'], ['compare'], ['reproduce'], ['plot'], ['bench']):\n"
        "    assert main([*command, '--help']) == 0\n"
    )
    done = run(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("usage: forwardgrad") == 6


def test_the_block_works():
    done = run("import matplotlib")
    assert done.returncode != 0 and "ModuleNotFoundError" in done.stderr
