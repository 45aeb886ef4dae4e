"""Print (or check) the one-line-per-module map in docs/architecture.md.

Each line is a module's path and the first line of its docstring, so the map
stays true as files change: `python scripts/arch_map.py --write` rewrites the
block between the markers; the test suite fails when it is stale.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"
BEGIN, END = "<!-- module-map:begin -->", "<!-- module-map:end -->"


def first_line(path: Path) -> str:
    doc = ast.get_docstring(ast.parse(path.read_text()))
    return doc.strip().splitlines()[0] if doc else "(no docstring)"


def module_map() -> str:
    lines = []
    for path in sorted((ROOT / "kvflow").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if path.name == "__init__.py" and path.stat().st_size == 0:
            continue
        lines.append(f"- `{rel}` — {first_line(path)}")
    return "\n".join(lines)


def render(text: str) -> str:
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return f"{head}{BEGIN}\n{module_map()}\n{END}{tail}"


def main() -> int:
    text = DOC.read_text()
    new = render(text)
    if "--write" in sys.argv:
        DOC.write_text(new)
        return 0
    if new != text:
        print("docs/architecture.md module map is stale: run python scripts/arch_map.py --write")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
