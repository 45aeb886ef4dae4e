"""`in=text` (a chat in the terminal) and `in=batch:FILE` (a file of requests) for `kvflow run`."""

from __future__ import annotations

import asyncio
import http.client
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from kvflow.runtime.threads import in_daemon_thread


def _post(base_url: str, path: str, body: dict) -> http.client.HTTPResponse:
    url = urlsplit(base_url)
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port or 80, timeout=600)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    return conn.getresponse()


def _sse_deltas(resp: http.client.HTTPResponse) -> Iterator[str]:
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        for choice in chunk.get("choices", []):
            text = choice.get("delta", {}).get("content")
            if text:
                yield text


def _chat_turn(base_url: str, model: str, messages: list[dict]) -> str:
    resp = _post(base_url, "/v1/chat/completions", {"model": model, "messages": messages, "stream": True})
    if resp.status != 200:
        return f"[error {resp.status}] {resp.read().decode(errors='replace')}"
    out = []
    for delta in _sse_deltas(resp):
        out.append(delta)
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return "".join(out)


def _text_loop(base_url: str, model: str) -> None:
    messages: list[dict] = []
    print(f"Chatting with {model}; an empty line or Ctrl-D ends.", flush=True)
    while True:
        try:
            line = input("> ")
        except EOFError:
            return
        if not line.strip():
            return
        messages.append({"role": "user", "content": line})
        reply = _chat_turn(base_url, model, messages)
        messages.append({"role": "assistant", "content": reply})


async def run_text(base_url: str, model: str) -> None:
    await in_daemon_thread(_text_loop, base_url, model, name="kvflow-text")


def _batch(base_url: str, model: str, path: str) -> Path:
    src = Path(path)
    dest = src.with_name(src.stem + ".out.jsonl")
    with src.open() as fin, dest.open("w") as fout:
        for n, line in enumerate(fin):
            if not line.strip():
                continue
            body = _parse_line(line, src, n + 1)
            if body is None:
                continue
            body.setdefault("model", model)
            body["stream"] = False
            route = "/v1/chat/completions" if "messages" in body else "/v1/completions"
            resp = _post(base_url, route, body)
            result = {"line": n + 1, "status": resp.status, "response": json.loads(resp.read() or b"null")}
            fout.write(json.dumps(result) + "\n")
    return dest


def _parse_line(line: str, src: Path, number: int) -> dict | None:
    """One request body, or None (reported on stderr with its line number) for a bad line."""
    try:
        body = json.loads(line)
    except json.JSONDecodeError as exc:
        print(f"kvflow run: {src}:{number}: not valid JSON ({exc.msg}); line skipped", file=sys.stderr)
        return None
    if not isinstance(body, dict):
        print(f"kvflow run: {src}:{number}: not a JSON object (a request body); line skipped",
              file=sys.stderr)
        return None
    return body


async def run_batch(base_url: str, model: str, path: str) -> None:
    dest = await asyncio.to_thread(_batch, base_url, model, path)
    print(f"kvflow: wrote {dest}", flush=True)
