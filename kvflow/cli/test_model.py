"""`kvflow make-test-model DIR`: a tiny model directory (tokenizer + config, optional weights)."""

from __future__ import annotations

import argparse


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kvflow make-test-model")
    parser.add_argument("path", help="directory to create (its last part is the model's default name)")
    parser.add_argument(
        "--weights", action="store_true", help="also write random weights (needs torch + transformers)"
    )
    parser.add_argument("--arch", default="llama", choices=["llama", "qwen2", "qwen3", "mistral"],
                        help="architecture of the random weights (default: llama)")
    ns = parser.parse_args(argv)
    if ns.weights:
        from kvflow.testing.models import make_tiny_model

        path = make_tiny_model(ns.path, ns.arch)
    else:
        from kvflow.testing.tokenizer import make_model_dir

        path = make_model_dir(ns.path)
    print(path)
    return 0
