"""Write (or check) the generated files under deploy/: CRDs, operator install, plain manifests.

`python scripts/gen_deploy.py --write` rewrites them from kvflow/operator and
deploy/examples; without --write it lists stale files and exits 1 if any.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvflow.operator.manifests import generated_files, stale_files  # noqa: E402


def main() -> int:
    if "--write" in sys.argv[1:]:
        for path, text in generated_files(ROOT).items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}")
        return 0
    stale = stale_files(ROOT)
    for path in stale:
        print(f"stale: {path.relative_to(ROOT)} (run python scripts/gen_deploy.py --write)")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
