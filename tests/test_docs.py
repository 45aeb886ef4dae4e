"""The architecture page's module map matches the code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_architecture_module_map_is_current() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "arch_map.py")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_readme_starts_with_the_two_commands() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    block = lines[lines.index("```bash") + 1 : lines.index("```bash") + 3]
    assert block[0].startswith("bash scripts/dev.sh serve")
    assert block[1].startswith("bash scripts/dev.sh test")
    assert "scripts/dev.sh test" in (ROOT / ".ci" / "run").read_text()
