"""The OpenAI-compatible HTTP frontend: server, model manager, request pipeline.

Files:
- server.py: HttpFrontend — routes, auth, TLS, start/stop.
- config.py: FrontendConfig.
- http.py / http_response.py: the HTTP/1.1 server (httptools) and the response writer.
- handlers.py: shared handler plumbing and the small routes (models, health, metrics...).
- chat.py / completions.py: the two generation endpoints, JSON and SSE.
- preprocess.py: request → template → tokens → PreprocessedRequest per choice.
- generation.py: one request in flight; streams.py: per-choice engine streams merged.
- postprocess.py: detokenize, stop strings, reasoning and tool-call parsing per choice.
- logprobs.py: logprobs in OpenAI's shapes. errors.py: ApiError and the error body.
- models.py: ModelManager / ServedModel. engine_client.py: the EngineClient contract.
- metrics.py: Prometheus metrics. openapi.py: /openapi.json.
- testing.py: in-process echo and scripted EngineClients.
"""

from kvflow.frontend.config import FrontendConfig
from kvflow.frontend.engine_client import EngineClient, EngineUnavailable
from kvflow.frontend.models import ModelManager, ServedModel
from kvflow.frontend.server import HttpFrontend

__all__ = [
    "EngineClient", "EngineUnavailable", "FrontendConfig", "HttpFrontend", "ModelManager",
    "ServedModel",
]
