#!/usr/bin/env bash
# kvflow's one entry point for a fresh machine: `serve` sets up and runs a local
# OpenAI-compatible stack; `test` sets up and runs the default test suite.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=${KVFLOW_VENV:-.venv}
VPY="$VENV/bin/python"

log() { printf '[kvflow] %s\n' "$*" >&2; }

make_venv() {
  if [ ! -x "$VPY" ]; then
    log "creating $VENV with $($PY --version)"
    "$PY" -m venv "$VENV"
  fi
  "$VPY" -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
}

install_torch_cpu() {
  # The CPU build of torch; a looser requirement would pull several GB of CUDA
  # packages. Where this exact build is not available the native engine's
  # tests are skipped (they say so).
  if "$VPY" -c "import torch" 2>/dev/null; then return 0; fi
  if "$VPY" -m pip install -q "torch==2.13.0" 2>/dev/null; then
    log "installed torch 2.13.0 (CPU)"
  else
    log "torch 2.13.0 CPU build not available for this Python; native engine disabled"
  fi
}

install() {  # $1: pip extras; skipped when pyproject.toml and the extras are as last time
  local stamp="$VENV/.kvflow-install-$1" want
  want="$(cat pyproject.toml; echo "$1")"
  if [ -x "$VPY" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$(printf '%s' "$want" | cksum)" ]; then
    log "$VENV is up to date (pyproject.toml unchanged); skipping install"
    return 0
  fi
  make_venv
  install_torch_cpu
  local extras="$1"
  if "$VPY" -c "import torch" 2>/dev/null; then extras="$extras,torch"; fi
  "$VPY" -m pip install -q -e ".[$extras]"
  printf '%s' "$want" | cksum > "$stamp"
}

observability_tools() {
  # Debian's prometheus and chromium for the observability tests (a real Prometheus server,
  # the fleet page in a headless browser). Installed only when missing; where apt cannot
  # install them the tests skip and say so.
  if command -v prometheus >/dev/null && command -v chromium >/dev/null; then return 0; fi
  local sudo=""
  if [ "$(id -u)" != 0 ]; then sudo="sudo -n"; fi
  if ! command -v apt-get >/dev/null; then log "no apt-get: Prometheus/Chromium tests will skip"; return 0; fi
  { $sudo apt-get update -q && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q \
      --no-install-recommends prometheus chromium; } >/dev/null 2>&1 \
    || log "could not install prometheus/chromium: their tests will skip"
}

compat_venvs() {
  # Interpreters for the cross-version wire test (worker on 3.10, client on 3.13).
  local root
  root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
  for v in 3.10 3.13; do
    local target=".venv-compat/py${v/./}" interp=""
    for cand in $(ls -d "$root"/versions/"$v".*/bin/python 2>/dev/null | sort -V | tail -1) \
                "$(command -v "python$v" || true)"; do
      # pyenv shims exist for versions that are not selected: check it really runs.
      if [ -n "$cand" ] && "$cand" -c "import sys" >/dev/null 2>&1; then interp="$cand"; break; fi
    done
    if [ -z "$interp" ]; then log "python$v not found: the compat test will skip"; continue; fi
    if [ ! -x "$target/bin/python" ]; then "$interp" -m venv "$target"; fi
    "$target/bin/python" -m pip install -q --disable-pip-version-check -e . \
      || log "could not install kvflow under python$v: the compat test will skip"
  done
}

cluster_tools() {
  # The cluster tests cut links with nftables (they fall back to blackhole routes
  # without it) and need root for network namespaces; elsewhere they skip.
  if [ "$(id -u)" = 0 ] && ! command -v nft >/dev/null && command -v apt-get >/dev/null; then
    (apt-get install -y -qq nftables >/dev/null 2>&1 \
      || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq nftables >/dev/null 2>&1)) \
      || log "nftables not installed: cluster partitions use blackhole routes"
  fi
}

case "${1:-}" in
  serve)
    shift
    install "bench"
    model=.kvflow/models/tiny
    [ -f "$model/tokenizer.json" ] || "$VPY" -m kvflow.cli.main make-test-model "$model" >/dev/null
    log "serving a tiny test model on the mocker engine; try:"
    log "  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\"
    log "    -d '{\"model\":\"tiny\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}'"
    exec "$VPY" -m kvflow.cli.main run in=http out=mocker --model-path "$model" --model-name tiny \
      --speedup-ratio 10 --mocker-output echo "$@"
    ;;
  test)
    shift
    install "dev"
    compat_venvs
    cluster_tools
    observability_tools
    set +e
    "$VPY" -m pytest "$@"
    rc=$?
    set -e
    if [ "$rc" -eq 5 ]; then log "pytest collected no tests"; fi
    exit "$rc"
    ;;
  *)
    echo "usage: scripts/dev.sh serve [kvflow run flags] | test [pytest args]" >&2
    exit 2
    ;;
esac
