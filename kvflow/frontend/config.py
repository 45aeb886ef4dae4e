"""FrontendConfig: the HTTP frontend's settings, frozen once the server starts."""

from __future__ import annotations

from dataclasses import dataclass

from kvflow.frontend.admission import AdmissionLimits
from kvflow.frontend.http_timeouts import HttpTimeouts


@dataclass(frozen=True)
class FrontendConfig:
    host: str = "127.0.0.1"
    # 0 picks a free port; HttpFrontend.start() returns the one it bound.
    port: int = 8000
    # Request bodies over this size get 413 before they are buffered.
    max_body_bytes: int = 32 * 1024 * 1024
    # Bearer tokens accepted on /v1/*; empty means no authentication.
    api_keys: tuple[str, ...] = ()
    # Who may call the other routes (frontend.routes): /debug/* takes an admin key (else an
    # API key) or is off; /metrics, /health + /live, /openapi.json: open, keyed or off.
    admin_api_keys: tuple[str, ...] = ()
    debug_routes: bool = True
    metrics_access: str = "open"
    health_access: str = "open"
    openapi_access: str = "open"
    tls_cert: str | None = None
    tls_key: str | None = None
    # Idle connections (new, or keep-alive between requests) are closed after this long; a
    # request whose line + headers, or whose body, takes longer than its limit gets 408.
    keepalive_timeout_s: float = 30.0
    header_timeout_s: float = 20.0
    body_timeout_s: float = 60.0
    # Open connections beyond this get 503 at once (clamped below the open-file limit).
    max_connections: int = 8192
    # Prompts longer than this (characters) are templated and tokenized in a thread.
    offload_prompt_chars: int = 16_384
    preprocess_threads: int = 2
    # Requests a connection may have queued (pipelined) before reading pauses.
    max_pipelined_requests: int = 16
    backlog: int = 2048
    # Request line + headers over this size get 431 (they are never buffered beyond it).
    max_header_bytes: int = 64 * 1024
    # Overload: requests in flight per model (0 = no limit), how many more may wait for a
    # slot (first come, first served) and for how long; refused ones get 429 + Retry-After.
    max_inflight_per_model: int = 0
    max_queued_per_model: int = 0
    queue_timeout_s: float = 30.0
    overload_retry_after_s: float = 1.0
    # Hostile-input bounds, checked before any tokenizing.
    max_stop_strings: int = 64
    max_stop_chars: int = 1024
    max_choices: int = 1024  # engine requests one HTTP request may start (prompts x n)
    # /v1/messages: keep the cacheable prefix stable (see frontend/anthropic_request.py).
    anthropic_stable_prefix: bool = False
    # /v1/responses: responses kept for previous_response_id (oldest dropped first).
    responses_store_size: int = 1024

    def __post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("TLS needs both tls_cert and tls_key; pass both or neither")
        for name in ("max_body_bytes", "max_header_bytes", "max_stop_strings", "max_stop_chars",
                     "max_choices", "max_connections"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("metrics_access", "health_access", "openapi_access"):
            if getattr(self, name) not in ("open", "keyed", "off"):
                raise ValueError(f"{name} must be open, keyed or off; got {getattr(self, name)!r}")
        if self.responses_store_size < 0:
            raise ValueError(f"responses_store_size must be >= 0, got {self.responses_store_size}")
        self.admission_limits()  # checks the overload settings now
        self.timeouts()

    def timeouts(self) -> HttpTimeouts:
        return HttpTimeouts(self.keepalive_timeout_s, self.header_timeout_s, self.body_timeout_s)

    def admission_limits(self) -> AdmissionLimits:
        return AdmissionLimits(self.max_inflight_per_model, self.max_queued_per_model,
                               self.queue_timeout_s, self.overload_retry_after_s)
