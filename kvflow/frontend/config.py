"""FrontendConfig: the HTTP frontend's settings, frozen once the server starts."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FrontendConfig:
    host: str = "127.0.0.1"
    # 0 picks a free port; HttpFrontend.start() returns the one it bound.
    port: int = 8000
    # Request bodies over this size get 413 before they are buffered.
    max_body_bytes: int = 32 * 1024 * 1024
    # Bearer tokens accepted on /v1/*; empty means no authentication.
    api_keys: tuple[str, ...] = ()
    tls_cert: str | None = None
    tls_key: str | None = None
    # Idle keep-alive connections are closed after this many seconds.
    keepalive_timeout_s: float = 75.0
    # Prompts longer than this (characters) are templated and tokenized in a thread.
    offload_prompt_chars: int = 16_384
    preprocess_threads: int = 2
    # Requests a connection may have queued (pipelined) before reading pauses.
    max_pipelined_requests: int = 16
    backlog: int = 2048

    def __post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("TLS needs both tls_cert and tls_key; pass both or neither")
        if self.max_body_bytes <= 0:
            raise ValueError(f"max_body_bytes must be positive, got {self.max_body_bytes}")
