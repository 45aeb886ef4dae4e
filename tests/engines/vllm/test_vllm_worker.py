"""vLLM (CPU build) as a kvflow worker behind `kvflow frontend`, each on its own Python (opt-in: -m vllm).

Needs `.venv-vllm` (`bash scripts/dev.sh engine vllm`). The frontend runs on
Python 3.13 (`.venv-compat/py313`) when present, else on this interpreter; the
worker runs on the vLLM venv's Python. Greedy outputs must equal vLLM's own
offline `LLM.generate` on the same token ids (compared as text, decoded with the
model's tokenizer, since the API returns text), and the KV router must see the
prompt's blocks from vLLM's relayed events.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from kvflow.testing.procs import Proc, runtime_env

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[3]
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"
BLOCK = 32
VLLM_ARGS = ["--block-size", str(BLOCK), "--max-model-len", "256", "--max-num-seqs", "4",
             "--dtype", "float32", "--enforce-eager"]
PROMPTS = [list(range(3, 40)), list(range(100, 180)), [5, 9, 200, 17, 33, 2, 400, 11]]
MAX_TOKENS = 12

OFFLINE = """
import json, sys
from vllm import LLM, SamplingParams
from vllm.engine.arg_utils import EngineArgs
from vllm.utils.argparse_utils import FlexibleArgumentParser

def main():
    model, args, prompts, n = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
    ns = EngineArgs.add_cli_args(FlexibleArgumentParser()).parse_args(["--model", model, *args])
    llm = LLM(**{k: getattr(ns, k) for k in ("model", "block_size", "max_model_len", "max_num_seqs",
                                               "dtype", "enforce_eager")})
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    print("RESULT " + json.dumps([list(o.outputs[0].token_ids) for o in outs]), flush=True)

if __name__ == "__main__":
    main()
"""


def _frontend_python() -> str:
    for root in (ROOT, Path("/work/main")):
        py = root / ".venv-compat" / "py313" / "bin" / "python"
        if py.exists():
            return str(py)
    return sys.executable


@pytest.fixture(scope="module")
def vllm_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not VLLM_PY.exists():
        pytest.skip(f"{VLLM_PY} missing: run `bash scripts/dev.sh engine vllm`")
    pytest.importorskip("torch")
    from kvflow.testing.models import make_tiny_model

    path = tmp_path_factory.mktemp("vllm") / "llama"
    return make_tiny_model(path, "llama", hidden_size=128, num_heads=2, num_kv_heads=1, intermediate_size=256)


def _env(tmp: Path) -> dict[str, str]:
    env = runtime_env(discovery="file", discovery_path=tmp / "discovery", event_plane="zmq",
                      namespace="vllm" + uuid.uuid4().hex[:6], lease_ttl=2.0, file_poll_interval=0.05)
    env.update(PYTHONPATH=str(ROOT), VLLM_CPU_KVCACHE_SPACE="1")
    return env


def _offline_reference(model: Path, env: dict[str, str]) -> list[list[int]]:
    out = subprocess.run(
        [str(VLLM_PY), "-c", OFFLINE, str(model), json.dumps(VLLM_ARGS), json.dumps(PROMPTS),
         str(MAX_TOKENS)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    found = re.search(r"^RESULT (.*)$", out.stdout, re.M)
    assert found, out.stderr[-4000:]
    return json.loads(found.group(1))


def _metric(text: str, name: str) -> float:
    found = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def test_vllm_worker_behind_the_frontend(vllm_model: Path, tmp_path: Path) -> None:
    import urllib.request

    import openai
    from tokenizers import Tokenizer

    env, logs = _env(tmp_path), tmp_path / "logs"
    logs.mkdir()
    expected = _offline_reference(vllm_model, env)
    worker = Proc([str(VLLM_PY), "-m", "kvflow.cli.main", "worker", "--engine", "vllm",
                   "--model-path", str(vllm_model), "--model-name", "tiny", "--", *VLLM_ARGS],
                  env, logs / "worker.log")
    frontend = Proc([_frontend_python(), "-m", "kvflow.cli.main", "frontend", "--http-port", "0",
                     "--router-mode", "kv"], env, logs / "frontend.log")
    try:
        frontend.wait_for_output("frontend: listening on", timeout=120)
        url = re.search(r"listening on (http://\S+)", frontend.output()).group(1)  # type: ignore[union-attr]
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
        _wait_for_model(client, worker)
        tokenizer = Tokenizer.from_file(str(vllm_model / "tokenizer.json"))
        for prompt, ids in zip(PROMPTS, expected, strict=True):
            want = tokenizer.decode(ids, skip_special_tokens=False)
            got = _completion_text(client, prompt)
            assert got == want, f"{prompt[:5]}..: kvflow+vLLM {got!r} != vLLM offline {want!r} ({ids})"
        again = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=2, temperature=0.0)
        assert again.usage.prompt_tokens_details.cached_tokens >= 2 * BLOCK
        with urllib.request.urlopen(url + "/metrics", timeout=30) as resp:
            metrics = resp.read().decode()
        assert _metric(metrics, "kvflow_router_matched_blocks_sum") >= 2, metrics[-2000:]
        assert "KV EVENTS MISSING" not in worker.output()
    finally:
        frontend.stop()
        worker.stop()
    print(f"frontend python: {_frontend_python()}; worker python: {VLLM_PY}")


def _completion_text(client, prompt: list[int]) -> str:
    """Greedy completion text for a token-id prompt, special tokens kept."""
    resp = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0,
        extra_body={"ignore_eos": True, "skip_special_tokens": False},
    )
    return resp.choices[0].text


def _wait_for_model(client, worker: Proc, timeout: float = 400.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert worker.alive, worker.output()[-4000:]
        if any(m.id == "tiny" for m in client.models.list().data):
            return
        time.sleep(1.0)
    raise TimeoutError(worker.output()[-4000:])
