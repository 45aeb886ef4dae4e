"""Preprocess: an OpenAI request → prompt token ids → one PreprocessedRequest per choice.

Chat requests render the model's chat template; completion requests take text or
token ids. Everything the engine should not see (stop strings, parser choice, echo)
goes into `OutputOptions` for the postprocessor. All validation that needs the model
(context length, token ids in range, template errors) happens here and raises ApiError.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec

from kvflow.frontend import guided
from kvflow.frontend.errors import ApiError, bad_request
from kvflow.frontend.models import ServedModel
from kvflow.llm.chat_template import TemplateError
from kvflow.llm.openai import ChatCompletionRequest, ChatMessage, CompletionRequest
from kvflow.llm.protocol import (
    PreprocessedRequest,
    RoutingHints,
    SamplingOptions,
    StopConditions,
)

T = TypeVar("T")
# Template variables the frontend sets itself; chat_template_kwargs may not override them.
_RENDER_ARGS = frozenset(
    {"messages", "tools", "add_generation_prompt", "continue_final_message", "flatten_content"}
)


@dataclass(frozen=True, slots=True)
class OutputOptions:
    """How to turn one choice's tokens into the response (frontend-side only)."""

    stop: tuple[str, ...] = ()
    include_stop_str: bool = False
    skip_special_tokens: bool = True
    # None: no logprobs; k: logprobs plus the top k alternatives per token.
    logprobs: int | None = None
    tools: bool = False
    reasoning: bool = False
    # The chat template already opened the reasoning block: output starts inside it.
    reasoning_open: bool = False


@dataclass(frozen=True, slots=True)
class ChoiceInput:
    """One choice to generate: its index in the response and its engine request."""

    index: int
    engine_request: PreprocessedRequest
    # Text the choice starts with in the response (completions with echo=True).
    echo: str = ""


@dataclass(frozen=True, slots=True)
class Prepared:
    choices: list[ChoiceInput]
    options: OutputOptions
    # Tokens of each distinct prompt (usage counts each prompt once, not once per choice).
    prompt_tokens: int
    # Choices per prompt; choice i belongs to prompt i // n.
    n: int = 1


async def run_maybe_offloaded(
    executor: Executor | None, size: int, threshold: int, fn: Callable[[], T]
) -> T:
    """Run `fn` inline when the input is small, in `executor` when it is big."""
    if executor is None or size < threshold:
        return fn()
    return await asyncio.get_running_loop().run_in_executor(executor, fn)


# ---------------------------------------------------------------- chat


def chat_prompt_chars(req: ChatCompletionRequest) -> int:
    total = 0
    for msg in req.messages:
        if isinstance(msg.content, str):
            total += len(msg.content)
        elif msg.content:
            total += sum(len(p.text or "") for p in msg.content)
    return total


@dataclass(frozen=True, slots=True)
class ChatPrompt:
    text: str
    ids: list[int]


def tokenize_chat(model: ServedModel, req: ChatCompletionRequest) -> ChatPrompt:
    """Render the chat template and tokenize it (may run in a worker thread)."""
    if model.template is None:
        raise bad_request(
            f"Model '{model.name}' has no chat template; use /v1/completions instead.",
            param="messages",
        )
    if req.add_generation_prompt and req.continue_final_message:
        raise bad_request(
            "add_generation_prompt and continue_final_message cannot both be true; "
            "set add_generation_prompt to false to continue the last message.",
            param="continue_final_message",
        )
    messages = [_message_dict(i, m) for i, m in enumerate(req.messages)]
    try:
        text = model.template.render(
            messages,
            add_generation_prompt=req.add_generation_prompt,
            continue_final_message=req.continue_final_message,
            tools=_template_tools(req),
            **(req.chat_template_kwargs or {}),
        )
    except TemplateError as exc:
        raise bad_request(f"The chat template rejected the messages: {exc}", "messages") from exc
    return ChatPrompt(text, model.tokenizer.encode(text, add_special_tokens=False))


def _message_dict(i: int, msg: ChatMessage) -> dict[str, Any]:
    """A message as the template sees it: text parts joined, "developer" as "system" (few
    templates know the newer role); the template itself parses tool-call arguments."""
    role = "system" if msg.role == "developer" else msg.role
    out: dict[str, Any] = {"role": role, "content": _text_content(i, msg)}
    if msg.name is not None:
        out["name"] = msg.name
    if msg.tool_call_id is not None:
        out["tool_call_id"] = msg.tool_call_id
    if msg.reasoning_content is not None:
        out["reasoning_content"] = msg.reasoning_content
    if msg.tool_calls:
        out["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.function.name, "arguments": call.function.arguments},
            }
            for call in msg.tool_calls
        ]
    return out


def _text_content(i: int, msg: ChatMessage) -> str:
    if msg.content is None or isinstance(msg.content, str):
        return msg.content or ""
    texts = []
    for j, part in enumerate(msg.content):
        if part.type != "text" or part.text is None:
            param = f"messages[{i}].content[{j}].type"
            raise bad_request(
                f"{param}: content part type '{part.type}' is not supported; this server "
                'takes only {"type": "text", "text": ...} parts.',
                param=param,
            )
        texts.append(part.text)
    return "\n".join(texts)


def _template_tools(req: ChatCompletionRequest) -> list[dict[str, Any]] | None:
    if not req.tools or req.tool_choice == "none":
        return None
    tools = req.tools
    if not isinstance(req.tool_choice, str) and req.tool_choice is not None:
        wanted = req.tool_choice.function.name
        tools = [t for t in tools if t.function.name == wanted]
    return msgspec.to_builtins(tools)


def validate_chat(req: ChatCompletionRequest) -> None:
    """Checks that need no model."""
    if req.tool_choice is not None and not req.tools and req.tool_choice != "none":
        raise bad_request("tool_choice needs tools; send tools or drop tool_choice.", "tool_choice")
    if req.tools and not isinstance(req.tool_choice, str) and req.tool_choice is not None:
        names = {t.function.name for t in req.tools}
        if req.tool_choice.function.name not in names:
            raise bad_request(
                f"tool_choice names function '{req.tool_choice.function.name}', which is not "
                "in tools; name one of the tools you sent.",
                "tool_choice",
            )
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs set to true.", "top_logprobs")
    clash = sorted(_RENDER_ARGS & set(req.chat_template_kwargs or ()))
    if clash:
        raise bad_request(
            f"chat_template_kwargs may not set {', '.join(clash)}; use the request fields.",
            "chat_template_kwargs",
        )
    _validate_common(req.logit_bias, req.stop)


def prepare_chat(
    model: ServedModel, req: ChatCompletionRequest, prompt: ChatPrompt, request_id: str,
    cache_salt: str | None = None,
    routing: RoutingHints | None = None,
) -> Prepared:
    ids = prompt.ids
    max_tokens = req.max_completion_tokens or req.max_tokens
    max_tokens = _fit_context(model, len(ids), max_tokens, "messages")
    uses_tools = bool(req.tools) and req.tool_choice != "none"
    if uses_tools and model.tool_parser is None:
        model.warn_no_tool_parser()
    reasoning = model.reasoning_parser
    options = OutputOptions(
        stop=_stops(req.stop),
        include_stop_str=req.include_stop_str_in_output,
        skip_special_tokens=req.skip_special_tokens,
        logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        tools=uses_tools and model.tool_parser is not None,
        reasoning=reasoning is not None,
        reasoning_open=reasoning is not None and reasoning.prompt_opens_reasoning(prompt.text),
    )
    base = _engine_request(model, req, ids, max_tokens, options.logprobs, cache_salt, routing)
    base = guided.force_tool_calls(model, req, base) if options.tools else base
    choices = [ChoiceInput(i, _for_choice(base, request_id, i, req.n)) for i in range(req.n)]
    return Prepared(choices, options, len(ids), req.n)


# ---------------------------------------------------------------- completions


def validate_completion(req: CompletionRequest) -> None:
    if req.suffix:
        raise bad_request("suffix is not supported; put the text in the prompt.", "suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request("best_of other than n is not supported; drop best_of.", "best_of")
    if req.echo and req.logprobs is not None:
        raise bad_request("echo with logprobs is not supported; drop one of them.", "echo")
    _validate_common(req.logit_bias, req.stop)


def completion_prompt_chars(req: CompletionRequest) -> int:
    if isinstance(req.prompt, str):
        return len(req.prompt)
    return sum(len(p) for p in req.prompt if isinstance(p, str))


def tokenize_completion(model: ServedModel, req: CompletionRequest) -> list[list[int]]:
    """Every prompt of the request as token ids (may run in a worker thread)."""
    prompt = req.prompt
    if isinstance(prompt, str):
        return [model.tokenizer.encode(prompt, add_special_tokens=True)]
    if not prompt:
        raise bad_request("prompt is empty; send text or token ids.", "prompt")
    items: list[Any] = prompt
    if all(isinstance(p, str) for p in items):
        return [model.tokenizer.encode(p, add_special_tokens=True) for p in items]
    if all(isinstance(p, int) for p in items):
        return [_checked_ids(model, items, "prompt")]
    if all(isinstance(p, list) for p in items):
        return [_checked_ids(model, p, f"prompt[{i}]") for i, p in enumerate(items)]
    raise bad_request(
        "prompt mixes texts, token ids and lists of token ids; send one kind.", "prompt"
    )


def prepare_completion(
    model: ServedModel, req: CompletionRequest, prompts: list[list[int]], request_id: str,
    cache_salt: str | None = None,
    routing: RoutingHints | None = None,
) -> Prepared:
    options = OutputOptions(
        stop=_stops(req.stop),
        include_stop_str=req.include_stop_str_in_output,
        skip_special_tokens=req.skip_special_tokens,
        logprobs=req.logprobs,
    )
    choices: list[ChoiceInput] = []
    total = len(prompts) * req.n
    for p, ids in enumerate(prompts):
        param = "prompt" if len(prompts) == 1 else f"prompt[{p}]"
        max_tokens = _fit_context(model, len(ids), req.max_tokens, param)
        base = _engine_request(model, req, ids, max_tokens, options.logprobs, cache_salt, routing)
        echo = _echo_text(model, req, p, ids)
        for i in range(req.n):
            index = p * req.n + i
            engine_request = _for_choice(base, request_id, index, total)
            choices.append(ChoiceInput(index, engine_request, echo))
    return Prepared(choices, options, sum(len(ids) for ids in prompts), req.n)


def _echo_text(model: ServedModel, req: CompletionRequest, p: int, ids: list[int]) -> str:
    if not req.echo:
        return ""
    item = req.prompt if isinstance(req.prompt, str) else req.prompt[p]
    if isinstance(item, str):
        return item
    return model.tokenizer.decode(ids, skip_special_tokens=False)


def _checked_ids(model: ServedModel, ids: list[int], param: str) -> list[int]:
    if not ids:
        raise bad_request(f"{param} is an empty list of token ids; send at least one.", param)
    vocab = model.tokenizer.vocab_size
    for t in ids:
        if not 0 <= t < vocab:
            raise bad_request(
                f"Token id {t} in {param} is outside the vocabulary (0..{vocab - 1}).", param
            )
    return ids


# ---------------------------------------------------------------- shared


def _validate_common(logit_bias: dict[str, float] | None, stop: str | list[str] | None) -> None:
    if logit_bias:
        raise bad_request("logit_bias is not supported by this server; drop it.", "logit_bias")
    stops = [stop] if isinstance(stop, str) else stop or []
    if any(s == "" for s in stops):
        raise bad_request("stop strings must not be empty.", "stop")


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


def _fit_context(model: ServedModel, prompt_len: int, max_tokens: int | None, param: str) -> int:
    """max_tokens for the engine; 400 if prompt + completion cannot fit the context."""
    limit = model.context_length
    wanted = max_tokens if max_tokens is not None else max(limit - prompt_len, 1)
    if prompt_len + wanted > limit:
        raise ApiError(
            400,
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{prompt_len + wanted} tokens ({prompt_len} in the {param}, {wanted} in the "
            "completion). Shorten the prompt or lower max_tokens.",
            param=param,
            code="context_length_exceeded",
        )
    return wanted


def _engine_request(
    model: ServedModel,
    req: ChatCompletionRequest | CompletionRequest,
    ids: list[int],
    max_tokens: int,
    logprobs: int | None,
    cache_salt: str | None = None,
    routing: RoutingHints | None = None,
) -> PreprocessedRequest:
    fmt = msgspec.to_builtins(req.response_format) if req.response_format else None
    if fmt and fmt.get("type", "text") != "text" and not model.card.guided_decoding:
        raise bad_request(
            f"response_format {fmt.get('type')!r} needs guided decoding, which the engine serving "
            f"model '{model.name}' does not offer; omit response_format or use {{\"type\": \"text\"}}",
            param="response_format", code="unsupported_response_format")
    guided.check_response_format(fmt)
    sampling = SamplingOptions(
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        min_p=req.min_p,
        seed=req.seed,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty,
        logprobs=logprobs,
        response_format=fmt,
    )
    stop = StopConditions(
        max_tokens=max_tokens,
        min_tokens=req.min_tokens,
        stop_token_ids=list(req.stop_token_ids or ()),
        ignore_eos=req.ignore_eos,
    )
    return PreprocessedRequest(
        request_id="",
        token_ids=ids,
        model=model.name,
        sampling=sampling,
        stop=stop,
        eos_token_ids=list(model.card.eos_token_ids),
        cache_salt=cache_salt,
        routing=routing,
    )


def _for_choice(
    base: PreprocessedRequest, request_id: str, index: int, total: int
) -> PreprocessedRequest:
    """The engine request of one choice: its own id, and its own seed when one was given."""
    if total == 1:
        return msgspec.structs.replace(base, request_id=request_id)
    sampling = base.sampling
    if sampling.seed is not None:
        sampling = msgspec.structs.replace(sampling, seed=sampling.seed + index)
    return msgspec.structs.replace(base, request_id=f"{request_id}-{index}", sampling=sampling)

