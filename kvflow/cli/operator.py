"""`kvflow operator`: run the Kubernetes operator, or print its CRDs and the objects a CR becomes.

kvflow operator run [--namespace NS]... [--api-server URL]   reconcile KvflowDeployments
kvflow operator crds                                         the CustomResourceDefinitions (YAML)
kvflow operator render CR.yaml [--plain]                     the objects a KvflowDeployment becomes
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvflow operator", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)
    run = sub.add_parser("run", help="reconcile KvflowDeployments (needs the `operator` extra)")
    run.add_argument("--namespace", action="append", default=[],
                     help="watch this namespace (repeatable; default: all)")
    run.add_argument("--api-server", default="",
                     help="API server URL, e.g. http://127.0.0.1:8001 from `kubectl proxy` "
                     "(default: the pod's service account)")
    run.add_argument("--identity", default=socket.gethostname(), help="name in the leader Lease")
    run.add_argument("--lease-namespace", default="kvflow-system")
    run.add_argument("--lease-name", default="kvflow-operator")
    sub.add_parser("crds", help="print the CRDs")
    render = sub.add_parser("render", help="print the objects a KvflowDeployment file becomes")
    render.add_argument("file", help="a KvflowDeployment YAML file")
    render.add_argument("--plain", action="store_true",
                        help="plain manifests: no owner references, no KvflowPools")
    return parser


def _render(ns: argparse.Namespace) -> int:
    from kvflow.operator.manifests import load_yaml, to_yaml
    from kvflow.operator.reconcile import desired_state
    from kvflow.operator.spec import SpecError, parse_resource

    try:
        docs = load_yaml(Path(ns.file).read_text())
        if not docs:
            raise SpecError("the file holds no document")
        resource = parse_resource(docs[0])
    except (OSError, SpecError) as exc:
        print(f"kvflow operator render: {ns.file}: {exc}", file=sys.stderr)
        return 2
    desired = desired_state(resource, owned=not ns.plain)
    print(to_yaml([*desired.objects, *desired.seeds]), end="")
    return 0


def _run(ns: argparse.Namespace) -> int:
    try:
        from kvflow.operator.handlers import run_operator
    except ImportError as exc:
        print(f"kvflow operator run needs the operator extra (pip install 'kvflow[operator]'): {exc}",
              file=sys.stderr)
        return 2
    from kvflow.runtime.kube import KubeConfig, KubeConfigError
    from kvflow.runtime.logs import setup_logging

    try:
        config = KubeConfig(ns.api_server) if ns.api_server else KubeConfig.in_cluster()
    except KubeConfigError as exc:
        print(f"kvflow operator run: {exc}", file=sys.stderr)
        return 2
    setup_logging()
    identity = os.path.expandvars(ns.identity)
    return asyncio.run(run_operator(config, namespaces=tuple(ns.namespace), identity=identity,
                                    lease_namespace=ns.lease_namespace, lease_name=ns.lease_name))


def main(argv: list[str]) -> int:
    ns = build_parser().parse_args(argv)
    if ns.action == "crds":
        from kvflow.operator.crd import crds
        from kvflow.operator.manifests import to_yaml

        print(to_yaml(crds()), end="")
        return 0
    if ns.action == "render":
        return _render(ns)
    return _run(ns)
