"""The type stub (djinn/_djinn.pyi) matches the extension: mypy's stubtest, when mypy is here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def test_stub_matches_extension():
    pytest.importorskip("mypy", reason="mypy is not installed (pip install mypy to check the stub)")
    here = Path(__file__).resolve().parent
    r = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "djinn._djinn", "--allowlist", str(here / "stubtest_allowlist.txt")],
        cwd=here.parent,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr
