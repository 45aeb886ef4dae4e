"""POST /tokenize and /detokenize: a model's tokenizer and chat template, without generating.

Text and chat messages go through the same bounds, template and tokenizer as the
generation routes, so `count` is what a completion or chat request would send the engine.
Both routes need the API key when one is configured, like /v1/*.
"""

from __future__ import annotations

import msgspec

from kvflow.frontend import limits
from kvflow.frontend import preprocess as pre
from kvflow.frontend.errors import bad_request, model_not_found
from kvflow.frontend.handlers import FrontendState, decode_body
from kvflow.frontend.http_response import HttpRequest, Responder
from kvflow.frontend.models import ServedModel
from kvflow.llm import tokenize as tk
from kvflow.llm.openai import ChatCompletionRequest, CompletionRequest

_TOKENIZE = msgspec.json.Decoder(tk.TokenizeRequest)
_DETOKENIZE = msgspec.json.Decoder(tk.DetokenizeRequest)
_ENCODER = msgspec.json.Encoder()


async def handle_tokenize(state: FrontendState, request: HttpRequest, responder: Responder
                          ) -> None:
    body: tk.TokenizeRequest = decode_body(_TOKENIZE, request.body)
    model = _model(state, body.model)
    if (body.prompt is None) == (body.messages is None):
        raise bad_request("Send exactly one of prompt (text) and messages (chat).", "prompt")
    if body.messages is not None:
        ids = await _chat_ids(state, model, body)
    else:
        assert body.prompt is not None
        text = body.prompt
        limits.check_completion(state.config, model, CompletionRequest(model=model.name,
                                                                       prompt=text))
        ids = await pre.run_maybe_offloaded(
            state.executor, len(text), state.config.offload_prompt_chars,
            lambda: model.tokenizer.encode(text, add_special_tokens=body.add_special_tokens))
    strs = None
    if body.return_token_strs:
        strs = [model.tokenizer.id_to_token(i) or "" for i in ids]
    out = tk.TokenizeResponse(len(ids), model.context_length, ids, strs)
    responder.send(200, _ENCODER.encode(out))


async def _chat_ids(state: FrontendState, model: ServedModel, body: tk.TokenizeRequest
                    ) -> list[int]:
    assert body.messages is not None
    chat = ChatCompletionRequest(
        model=model.name, messages=body.messages, add_generation_prompt=body.add_generation_prompt,
        continue_final_message=body.continue_final_message,
        chat_template_kwargs=body.chat_template_kwargs)
    pre.validate_chat(chat)
    limits.check_chat(state.config, model, chat)
    prompt = await pre.run_maybe_offloaded(
        state.executor, pre.chat_prompt_chars(chat), state.config.offload_prompt_chars,
        lambda: pre.tokenize_chat(model, chat))
    return prompt.ids


async def handle_detokenize(state: FrontendState, request: HttpRequest, responder: Responder
                            ) -> None:
    body: tk.DetokenizeRequest = decode_body(_DETOKENIZE, request.body)
    model = _model(state, body.model)
    vocab = model.tokenizer.vocab_size
    for t in body.tokens:
        if not 0 <= t < vocab:
            raise bad_request(f"Token id {t} is outside the vocabulary (0..{vocab - 1}).", "tokens")
    text = await pre.run_maybe_offloaded(
        state.executor, len(body.tokens) * 4, state.config.offload_prompt_chars,
        lambda: model.tokenizer.decode(body.tokens, skip_special_tokens=body.skip_special_tokens))
    responder.send(200, _ENCODER.encode(tk.DetokenizeResponse(text)))


def _model(state: FrontendState, name: str) -> ServedModel:
    model = state.models.get(name)
    if model is None:
        raise model_not_found(name, state.models.names())
    return model
