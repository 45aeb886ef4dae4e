"""deploy/ is current, its manifests are valid, `kvflow operator` works, and the core never imports kopf."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kvflow.operator.manifests import load_yaml, operator_install, stale_files
from kvflow.operator.reconcile import desired_state
from kvflow.testing.k8s import EXAMPLES, ROOT, example_resource, validate


def kvflow(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvflow.cli.main", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)


def test_generated_deploy_files_are_current() -> None:
    stale = [str(p.relative_to(ROOT)) for p in stale_files(ROOT)]
    assert stale == [], "run: python scripts/gen_deploy.py --write"


@pytest.mark.parametrize("path", sorted((ROOT / "deploy").rglob("*.yaml")),
                         ids=lambda p: str(p.relative_to(ROOT / "deploy")))
def test_every_deploy_file_validates(path) -> None:
    for obj in load_yaml(path.read_text()):
        validate(obj)


def test_operator_install_validates_and_elects_a_leader() -> None:
    objs = operator_install()
    for obj in objs:
        validate(obj)
    dep = objs[-1]
    assert dep["spec"]["replicas"] == 2
    assert "--identity" in dep["spec"]["template"]["spec"]["containers"][0]["command"]


def test_cli_render_matches_the_pure_function() -> None:
    out = kvflow("operator", "render", str(EXAMPLES / "aggregated.yaml"))
    assert out.returncode == 0, out.stderr
    desired = desired_state(example_resource("aggregated", uid="", generation=1))
    assert load_yaml(out.stdout) == [*desired.objects, *desired.seeds]


def test_cli_crds_and_clear_errors(tmp_path) -> None:
    crds = kvflow("operator", "crds")
    assert crds.returncode == 0 and [d["kind"] for d in load_yaml(crds.stdout)] == [
        "CustomResourceDefinition"] * 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: kvflow.dev/v1alpha1\nkind: KvflowDeployment\nmetadata: {name: x}\n"
                   "spec: {image: i, model: {path: p}, pools: [{role: prefill}]}\n")
    out = kvflow("operator", "render", str(bad))
    assert out.returncode == 2 and "decode" in out.stderr and len(out.stderr.splitlines()) == 1
    out = kvflow("operator", "run")
    assert out.returncode == 2 and "--api-server" in out.stderr and "Traceback" not in out.stderr


def test_core_does_not_import_kopf_or_aiohttp() -> None:
    code = ("import sys, kvflow.cli.main, kvflow.runtime, kvflow.frontend, kvflow.router, "
            "kvflow.operator.reconcile, kvflow.operator.manifests, kvflow.planner.kubernetes; "
            "bad = [m for m in ('kopf', 'aiohttp', 'kubernetes') if m in sys.modules]; "
            "sys.exit(f'imported {bad}' if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr + out.stdout
