"""Print (or check) docs/metrics.md: every Prometheus metric kvflow exports, from the code.

The catalog is built by instantiating each metrics holder on a fresh registry and reading
its metric families (name, type, help, labels), so the page stays true as metrics change:
`python scripts/metrics_doc.py --write` rewrites it; the test suite fails when it is stale
or when a name breaks the naming rule (kvflow_ prefix, a unit or counted noun last).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DOC = ROOT / "docs" / "metrics.md"

# The last word of every name: a unit, or the noun a counter or gauge counts.
UNITS = ("seconds", "bytes", "tokens", "blocks", "ratio", "requests", "decisions", "migrations",
         "errors", "responses", "connections", "stalls", "failures", "events")


@dataclass(frozen=True)
class MetricDoc:
    name: str  # as exposed (counters end in _total)
    type: str
    labels: tuple[str, ...]
    help: str
    source: str  # module that defines it
    served_by: str


def _wrappers(holder: object) -> list[MetricWrapperBase]:
    return [v for v in vars(holder).values() if isinstance(v, MetricWrapperBase)]


def _holders() -> list[tuple[str, str, object]]:
    """(defining module, processes that serve it, holder) for every metrics holder."""
    from kvflow.engines.worker import LoadGauges
    from kvflow.frontend.metrics import FrontendMetrics
    from kvflow.router.metrics import _families
    from kvflow.runtime.request_plane.metrics import EndpointMetrics

    return [
        ("kvflow/frontend/metrics.py", "frontend", FrontendMetrics()),
        ("kvflow/router/metrics.py", "frontend, router", _families(CollectorRegistry())),
        ("kvflow/runtime/request_plane/metrics.py", "worker, router (status port)",
         EndpointMetrics(CollectorRegistry())),
        ("kvflow/engines/worker.py", "worker (status port)", LoadGauges(CollectorRegistry())),
    ]


def catalog() -> list[MetricDoc]:
    out = []
    for source, served_by, holder in _holders():
        for m in _wrappers(holder):
            name = m._name + ("_total" if m._type == "counter" else "")
            out.append(MetricDoc(name, m._type, tuple(m._labelnames), m._documentation, source,
                                 served_by))
    return sorted(out, key=lambda d: d.name)


def naming_errors(docs: list[MetricDoc]) -> list[str]:
    errors = []
    for d in docs:
        base = d.name.removesuffix("_total") if d.type == "counter" else d.name
        if not base.startswith("kvflow_"):
            errors.append(f"{d.name}: every metric name starts with kvflow_")
        if base.rsplit("_", 1)[-1] not in UNITS:
            errors.append(f"{d.name}: the name must end in a unit or counted noun ({', '.join(UNITS)})")
    return errors


def render() -> str:
    lines = [
        "# Metrics",
        "",
        "Every Prometheus metric kvflow exports. Generated from the code by",
        "`python scripts/metrics_doc.py --write`; a test fails when this page is stale.",
        "",
        "Naming: `kvflow_<part>_<what>_<unit>`; the last word is a unit or the thing counted",
        f"({', '.join(f'`{u}`' for u in UNITS)}); counters end in `_total`. Worker ids in",
        "labels (`worker_id`) are instance ids in hex, as in logs, `/debug/route` and `/fleet`.",
        "The frontend's `/metrics` also carries its runtime's metrics (router, request plane);",
        "workers serve theirs on the status port (`--system-port`).",
        "",
        "| name | type | labels | help | served by | defined in |",
        "|---|---|---|---|---|---|",
    ]
    for d in catalog():
        labels = ", ".join(f"`{label}`" for label in d.labels) or "—"
        lines.append(f"| `{d.name}` | {d.type} | {labels} | {d.help} | {d.served_by} | "
                     f"`{d.source}` |")
    return "\n".join(lines) + "\n"


def main() -> int:
    errors = naming_errors(catalog())
    for e in errors:
        print(e, file=sys.stderr)
    text = render()
    if "--write" in sys.argv:
        DOC.write_text(text)
        return 1 if errors else 0
    if "--check" in sys.argv:
        if DOC.read_text() != text:
            print("docs/metrics.md is stale; run: python scripts/metrics_doc.py --write",
                  file=sys.stderr)
            return 1
        return 1 if errors else 0
    print(text, end="")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
