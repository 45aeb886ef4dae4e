"""The commands in README.md and docs/*.md run as written (a doc test), so the docs stay true.

A fenced block is run when an HTML comment right above it says how:

    <!-- doc-test: run -->            each line must exit 0
    <!-- doc-test: fails expect="…" -->  each line must exit non-zero, printing the text
    <!-- doc-test: serve ready="…" --> one long-running command; started in the background and
                                       waited for until the text appears in any server's output
    <!-- doc-test: probe -->          each line must exit 0 (curl against the servers)

Every page runs in its own temporary directory, with `kvflow` on PATH, the well-known ports
(8000, 2379, 2380, 4222) replaced by free ones (also the default --http-port), and its
servers stopped with SIGINT at the end (each must exit within 20 s). `export K=V` lines
carry over to later blocks. To add a page, write the comments; nothing here changes.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARK = re.compile(r"<!-- doc-test: (\w+)(.*?)-->\s*\n```[^\n]*\n(.*?)```", re.S)
PORTS = (8000, 2379, 2380, 4222)
READY_TIMEOUT_S = 90.0


@dataclass
class Block:
    kind: str
    options: dict[str, str]
    commands: list[str]


def blocks_of(page: Path) -> list[Block]:
    out = []
    for kind, opts, body in MARK.findall(page.read_text()):
        options = dict(re.findall(r'(\w+)="([^"]*)"', opts))
        text = re.sub(r"\\\n\s*", " ", body)  # join continued lines
        commands = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
        out.append(Block(kind, options, commands))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Page:
    """One page's shell state: environment, ports, and the servers it started."""

    cwd: Path
    env: dict[str, str]
    ports: dict[int, int] = field(default_factory=lambda: {p: _free_port() for p in PORTS})
    servers: list[tuple[subprocess.Popen, Path]] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Commands that leave --http-port at its default (8000) get the free port too.
        self.env["KVFLOW_HTTP_PORT"] = str(self.ports[8000])

    def rewrite(self, command: str) -> str:
        for old, new in self.ports.items():
            command = re.sub(rf"(?<![\d.]){old}(?!\d)", str(new), command)
        return command

    def shell(self, command: str, timeout: float = 180.0) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", self.rewrite(command)], cwd=self.cwd, env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def export(self, command: str) -> bool:
        match = re.fullmatch(r"export ((?:\w+=\S+\s*)+)", command)
        if not match:
            return False
        for pair in shlex.split(self.rewrite(match.group(1))):
            key, _, value = pair.partition("=")
            self.env[key] = os.path.expandvars(value)
        return True

    def serve(self, command: str, ready: str) -> None:
        log = self.cwd / f"server-{len(self.servers)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(["bash", "-c", "exec " + self.rewrite(command)], cwd=self.cwd,
                                    env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.servers.append((proc, log))
        deadline = time.monotonic() + READY_TIMEOUT_S
        while ready not in self.output():
            assert proc.poll() is None, f"`{command}` exited {proc.returncode}:\n{self.output()[-3000:]}"
            assert time.monotonic() < deadline, f"{ready!r} not seen:\n{self.output()[-3000:]}"
            time.sleep(0.1)

    def output(self) -> str:
        return "".join(log.read_text(errors="replace") for _, log in self.servers)

    def stop(self) -> list[str]:
        slow = []
        for proc, _ in reversed(self.servers):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                slow.append(" ".join(map(str, proc.args)))
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        return slow


def _env(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "kvflow"
    shim.write_text(f'#!/bin/sh\nexec {sys.executable} -m kvflow.cli.main "$@"\n')
    shim.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVFLOW_")}
    env["PATH"] = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["KVFLOW_DISCOVERY_PATH"] = str(tmp_path / "discovery")
    env["HF_HUB_OFFLINE"] = "1"
    return env


def _run_block(page: Page, block: Block) -> None:
    for command in block.commands:
        if page.export(command):
            continue
        if block.kind == "serve":
            page.serve(command, block.options["ready"])
            continue
        out = page.shell(command)
        if block.kind == "fails":
            assert out.returncode != 0, f"`{command}` should fail"
            assert block.options["expect"] in out.stderr + out.stdout, f"`{command}`:\n{out.stderr[-3000:]}"
            assert "Traceback" not in out.stderr, out.stderr
        else:
            assert out.returncode == 0, f"`{command}` exited {out.returncode}:\n{out.stderr[-3000:]}"


def _pages_with_blocks() -> list[Path]:
    return [p for p in PAGES if blocks_of(p)]


@pytest.mark.parametrize("page_path", _pages_with_blocks(), ids=lambda p: p.name)
def test_documented_commands_run(page_path: Path, tmp_path: Path) -> None:
    if "etcd" in page_path.read_text() and "doc-test: serve" in page_path.read_text():
        from kvflow.testing.servers import ETCD_BINARY, NATS_BINARY, binary_available

        if "nats-server" in page_path.read_text() and not binary_available(NATS_BINARY):
            pytest.skip("nats-server is not installed")
        if not binary_available(ETCD_BINARY):
            pytest.skip("etcd is not installed")
    page = Page(tmp_path, _env(tmp_path))
    try:
        for block in blocks_of(page_path):
            _run_block(page, block)
    finally:
        slow = page.stop()
    assert slow == [], f"did not stop within 20 s of SIGINT: {slow}"


def test_dockerfile_commands_are_the_readmes() -> None:
    readme = (ROOT / "README.md").read_text()
    lines = [ln for ln in (ROOT / "Dockerfile").read_text().splitlines() if ln.startswith(("RUN ", "CMD "))]
    assert lines
    for line in lines:
        command = line.split(" ", 1)[1]
        if command.startswith("["):  # CMD ["kvflow", "run", ...]
            command = " ".join(re.findall(r'"([^"]*)"', command))
        assert command in re.sub(r"\\\n\s*", " ", readme), f"Dockerfile command not in README: {command}"
