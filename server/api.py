"""HTTP layer: validate, submit to the engine, return JSON or stream SSE. No torch here."""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from trieserve.decoding.sampling import SamplingParams, TokenLogprob
from trieserve.server.errors import (
    ContextLengthError,
    InvalidRequestError,
    ModelNotFoundRequestError,
    ModelNotReadyError,
    QueueFullError,
    RequestTimeoutError,
    TrieserveError,
    error_body,
)
from trieserve.server.pieces import Offsets, pieces_for
from trieserve.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    Health,
    ModelCard,
    ModelList,
    SamplingFields,
)
from trieserve.server.sequence import Delta, Failure, Finish, GenerationRequest
from trieserve.server.state import ServerState

log = logging.getLogger(__name__)


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="trieserve", version="0.1.0", lifespan=state.lifespan)
    app.state.server = state
    _install_error_handlers(app, state)

    app.add_middleware(Guard, state=state)
    if state.settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=state.settings.cors_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type"],
        )

    @app.get("/health", responses={200: {"model": Health}, 503: {"model": Health}})
    async def health():
        if state.engine is None:
            reason = state.load_error or "loading the model"
            return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics", responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}, **_errors(401)})
    async def metrics():
        return Response(state.metrics.render(state.engine), media_type="text/plain; version=0.0.4; charset=utf-8")

    def card(model_id: str) -> dict:
        return {
            "id": model_id,
            "object": "model",
            "created": state.started,
            "owned_by": "trieserve",
            "max_model_len": state.max_context or None,
        }

    @app.get("/v1/models", responses={200: {"model": ModelList}, **_errors(401)})
    async def models():
        return {"object": "list", "data": [card(state.model_name)]}

    @app.get("/v1/models/{model_id:path}", responses={200: {"model": ModelCard}, **_errors(401, 404)})
    async def model(model_id: str):
        if not model_id:  # /v1/models/
            return await models()
        if model_id not in state.model_names:  # the served name, or its alias "default"
            raise ModelNotFoundRequestError(
                f"the model {model_id!r} does not exist; this server serves {state.model_name!r}", "model"
            )
        return card(state.model_name)

    @app.post("/v1/completions", responses=_generation_responses(CompletionResponse))
    async def completions(body: CompletionRequest, request: Request):
        engine = state.require_engine()
        _check_model(body, state)
        prompt_ids = await _completion_prompt(body, state)
        gen = _generation_request(body, prompt_ids, body.max_tokens, state, "prompt")
        echo = _prompt_text(body, prompt_ids, state) if body.echo else None
        return await _respond(request, state, engine, body, gen, chat=False, echo=echo)

    @app.post("/v1/chat/completions", responses=_generation_responses(ChatCompletionResponse))
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        engine = state.require_engine()
        _check_model(body, state)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        for i, m in enumerate(messages):
            _check_text(m["content"], f"messages.{i}.content")
        try:
            prompt_ids = await state.encode_off_loop(state.encode_chat, messages)
        except Exception as exc:  # a template that rejects the conversation (e.g. role order)
            raise InvalidRequestError(f"the chat template rejected these messages: {exc}", "messages") from None
        max_tokens = body.max_completion_tokens or body.max_tokens
        gen = _generation_request(body, prompt_ids, max_tokens, state, "messages")
        return await _respond(request, state, engine, body, gen, chat=True)

    app.openapi = lambda: _openapi(app)
    return app


# ---- the OpenAPI document: every status a client can get, with its body ----------------------
_ERROR_DESCRIPTIONS = {
    400: "invalid request (bad JSON, wrong types, values out of range, prompt too long)",
    401: "missing or wrong API key (only when keys are configured)",
    404: "unknown model name",
    408: "the request did not finish within --request-timeout-s",
    413: "request body larger than --max-body-bytes",
    429: "the queue is full; retry after the Retry-After header's seconds",
    503: "the model is not loaded (yet), or the server is shutting down",
}


SSE_EVENT = {
    "type": "object",
    "description": "one server-sent event: `data` holds a JSON chunk, an error object, or `[DONE]`",
    "properties": {"event": {"type": "string"}, "data": {"type": "string"}},
    "required": ["data"],
}


def _errors(*codes: int) -> dict:
    return {c: {"model": ErrorResponse, "description": _ERROR_DESCRIPTIONS[c]} for c in codes}


def _generation_responses(model) -> dict:
    ok = {
        "model": model,
        "description": "the completion; with `stream: true`, server-sent events of chunks ending in `data: [DONE]`",
        "content": {"text/event-stream": {"schema": SSE_EVENT}},
    }
    return {200: ok, **_errors(400, 401, 404, 408, 413, 429, 503)}


def _openapi(app: FastAPI) -> dict:
    """FastAPI's document without its 422 entries: validation errors are answered with 400 here."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for path in doc.get("paths", {}).values():
            for op in path.values():
                op.get("responses", {}).pop("422", None)
        schemas = doc.get("components", {}).get("schemas", {})
        for unused in ("HTTPValidationError", "ValidationError"):
            schemas.pop(unused, None)
        app.openapi_schema = doc
    return app.openapi_schema


KNOWN_ENDPOINTS = {"/v1/completions", "/v1/chat/completions", "/v1/models"}


class Guard:
    """Auth, body size and request counting, before any route runs.

    A plain ASGI middleware, not `@app.middleware("http")`: that wrapper hands routes a receive
    channel on which `request.is_disconnected()` never reports a client that has gone, so a
    non-streaming request would run to max_tokens for nobody. Here routes get the server's own
    channel (a chunked body, read to check its size, is replayed first). Requests that end in an
    unhandled error are counted as 500s."""

    def __init__(self, app, state: ServerState) -> None:
        self.app = app
        self.state = state
        self.keys = state.settings.api_keys()
        self.limit = state.settings.max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        status = [500]  # until a response starts: an exception escaping the app is a 500

        async def send_counted(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            request = Request(scope, receive)
            response = _check_auth(request, self.keys, self.state.settings.metrics_open)
            if response is None and scope["method"] == "POST":
                response, receive = await _check_size(request, receive, self.limit)
            if response is not None:
                await response(scope, receive, send_counted)
            else:
                await self.app(scope, receive, send_counted)
        finally:
            if path.startswith("/v1/"):
                endpoint = path if path in KNOWN_ENDPOINTS else "other"
                self.state.metrics.requests.labels(endpoint, str(status[0])).inc()


def _check_auth(request: Request, keys: list[str], metrics_open: bool) -> JSONResponse | None:
    path = request.url.path
    if not keys or not (path.startswith("/v1/") or (path == "/metrics" and not metrics_open)):
        return None
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    given = token.strip().encode()
    # compare against every key, always, in constant time per key
    ok = scheme.lower() == "bearer" and sum(hmac.compare_digest(given, k.encode()) for k in keys) > 0
    if ok:
        return None
    body = error_body(
        "invalid or missing API key (send 'Authorization: Bearer KEY')", "authentication_error", None, "invalid_api_key"
    )
    return JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})


async def _check_size(request: Request, receive, limit: int):
    """(a 413 response or None, the receive channel the app should read). The body is read here,
    counting bytes up to the limit whatever the headers say (a Content-Length can disagree with a
    chunked body the server decodes anyway), then replayed to the app, which afterwards reads the
    server's own channel (disconnects included). A declared length over the limit is refused
    before reading."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return _body_error(limit), receive
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client left while sending: nobody to answer
            return Response(status_code=499), receive
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > limit:
            return _body_error(limit), receive
        if not message.get("more_body", False):
            break
    return None, _replay([{"type": "http.request", "body": b"".join(chunks), "more_body": False}], receive)


def _replay(messages: list[dict], receive):
    pending = list(messages)

    async def replayed() -> dict:
        return pending.pop(0) if pending else await receive()

    return replayed


def _body_error(limit: int) -> JSONResponse:
    body = error_body(f"request body larger than {limit} bytes", "invalid_request_error", None, "request_too_large")
    return JSONResponse(body, status_code=413)


# ---- request building ----------------------------------------------------------------------
def _check_model(body: SamplingFields, state: ServerState) -> None:
    if body.model is not None and body.model not in state.model_names:
        raise ModelNotFoundRequestError(
            f"the model {body.model!r} does not exist; this server serves {state.model_name!r}", "model"
        )


async def _completion_prompt(body: CompletionRequest, state: ServerState) -> list[int]:
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise InvalidRequestError("batched prompts are not supported: send one prompt per request", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidRequestError("prompt must not be empty", "prompt")
        _check_text(prompt, "prompt")
        return await state.encode_off_loop(state.encode, prompt)
    if not prompt:
        raise InvalidRequestError("prompt must not be empty", "prompt")
    bad = [t for t in prompt if not 0 <= t < state.vocab_size]
    if bad:
        raise InvalidRequestError(f"token id {bad[0]} is outside the vocabulary (0..{state.vocab_size - 1})", "prompt")
    return list(prompt)


def _prompt_text(body: CompletionRequest, prompt_ids: list[int], state: ServerState) -> str:
    """The prompt as `echo` repeats it: the client's text, or its token ids decoded."""
    prompt = (
        body.prompt[0]
        if isinstance(body.prompt, list) and body.prompt and isinstance(body.prompt[0], str)
        else body.prompt
    )
    return prompt if isinstance(prompt, str) else state.tokenizer.decode(prompt_ids)


def _check_text(text: str, param: str) -> None:
    """JSON can carry strings that are not text (a lone UTF-16 surrogate, "\\ud800"): a 400."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequestError(
            f"{param} is not valid Unicode text: a lone surrogate (U+{ord(text[exc.start]):04X}) at character {exc.start}",
            param,
        ) from None


# OpenAI fields that would change the result, which this server does not implement: answering
# without them would be a wrong answer with no sign of it, so they get a 400 (param, message)
def _unsupported(body: SamplingFields) -> tuple[str, str] | None:
    extra = body.model_extra or {}
    if getattr(body, "suffix", None):
        return "suffix", "suffix (insertion) is not supported"
    if body.stream_options is not None and not body.stream:
        return "stream_options", "stream_options is only allowed with stream: true"
    if extra.get("best_of") not in (None, 1):
        return "best_of", "best_of is not supported (only 1)"
    if extra.get("tool_choice") not in (None, "none", "auto"):
        return "tool_choice", "tool calls are not supported"
    # OpenAI's, then vLLM's sampling and structured-output extensions
    for name in ("tools", "functions", "bad_words"):
        if extra.get(name):
            return name, f"{name} is not supported"
    for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs"):
        if extra.get(name) is not None:
            return name, f"{name} is not supported"
    fmt = extra.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        return "response_format", "response_format other than {'type': 'text'} is not supported"
    return None


def _token_ids(ids: list[int], vocab_size: int, param: str) -> list[int]:
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequestError(f"{param}: token ids must be in [0, {vocab_size}), got {bad[0]}", param)
    return ids


def _logit_bias(bias: dict[str, float] | None, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's logit_bias ({"token id": bias in [-100, 100]}) as (id, bias) pairs."""
    pairs: dict[int, float] = {}
    for key, value in (bias or {}).items():
        if not (key.isascii() and key.isdigit()):
            raise InvalidRequestError(f"logit_bias keys are token ids, got {key!r}", "logit_bias")
        token = int(key)
        if token in pairs:
            raise InvalidRequestError(f"logit_bias names token {token} twice", "logit_bias")
        pairs[token] = value
    _token_ids(list(pairs), vocab_size, "logit_bias")
    return tuple(pairs.items())


MAX_LOGPROBS = 20  # alternatives per token (vLLM's default limit; OpenAI's is 20 for chat)


def _logprobs_wanted(body: SamplingFields) -> int | None:
    """How many alternatives per token the request asks for (0: the chosen token's only), or
    None for no logprobs. Chat: `logprobs: true` with `top_logprobs`; completions: `logprobs: k`."""
    if isinstance(body, ChatCompletionRequest):
        top = body.top_logprobs
        if top is not None and not 0 <= top <= MAX_LOGPROBS:
            raise InvalidRequestError(f"top_logprobs must be between 0 and {MAX_LOGPROBS}, got {top}", "top_logprobs")
        if not body.logprobs:
            if top:
                raise InvalidRequestError("top_logprobs needs logprobs: true", "top_logprobs")
            return None
        return top or 0
    k = getattr(body, "logprobs", None)
    if k is not None and not 0 <= k <= MAX_LOGPROBS:
        raise InvalidRequestError(f"logprobs must be between 0 and {MAX_LOGPROBS}, got {k}", "logprobs")
    return k


def _generation_request(
    body: SamplingFields, prompt_ids: list[int], max_tokens: int | None, state: ServerState, prompt_param: str
):
    if not prompt_ids:
        raise InvalidRequestError("the prompt is empty after tokenization", prompt_param)
    context = state.max_context
    if len(prompt_ids) > context or (len(prompt_ids) == context and max_tokens != 0):  # 0: echo scores it
        raise ContextLengthError(
            f"the prompt has {len(prompt_ids)} tokens; this model's context is {context} tokens", prompt_param
        )
    if max_tokens is None:
        max_tokens = context - len(prompt_ids)
    elif len(prompt_ids) + max_tokens > context:
        raise ContextLengthError(
            f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) = {len(prompt_ids) + max_tokens} "
            f"exceeds this model's context of {context} tokens",
            "max_tokens",
        )
    if body.min_tokens > max_tokens:
        raise InvalidRequestError(
            f"min_tokens ({body.min_tokens}) must not exceed max_tokens ({max_tokens})", "min_tokens"
        )
    try:
        params = SamplingParams(
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=max(body.top_k, 0),
            repetition_penalty=body.repetition_penalty,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            seed=body.seed,
            min_p=body.min_p,
            min_tokens=body.min_tokens,
            logit_bias=_logit_bias(body.logit_bias, state.vocab_size),
        )
    except ValueError as exc:
        raise InvalidRequestError(str(exc)) from None
    unsupported = _unsupported(body)
    if unsupported is not None:
        raise InvalidRequestError(unsupported[1], unsupported[0])
    logprobs = _logprobs_wanted(body)
    echo = getattr(body, "echo", False)
    if max_tokens == 0 and not echo:
        raise InvalidRequestError("max_tokens must be at least 1 (0 only with echo)", "max_tokens")
    if echo and logprobs is not None and (body.kv_policy or state.settings.kv_policy) != "full":
        # an evicting prefill scores and drops entries chunk by chunk: its rows are not the model's
        raise InvalidRequestError("echo with logprobs needs kv_policy 'full' (the prompt's logprobs)", "echo")
    window = state.settings.kv_window
    if body.kv_regrow is not None and 0 < body.kv_regrow < window:
        raise InvalidRequestError(f"kv_regrow must be 0 or at least the observation window ({window})", "kv_regrow")
    for stop in body.stop_list():
        _check_text(stop, "stop")
    extra = sorted(set(body.model_extra or {}))
    if extra:
        log.debug("ignoring unknown request fields: %s", ", ".join(extra))
    return GenerationRequest(
        prompt_ids=prompt_ids,
        max_tokens=max_tokens,
        params=params,
        stop=body.stop_list(),
        lookahead=body.lookahead,
        kv_policy=body.kv_policy,
        kv_budget=body.kv_budget,
        kv_regrow=body.kv_regrow,
        ignore_eos=body.ignore_eos,
        stop_token_ids=_token_ids(body.stop_token_ids or [], state.vocab_size, "stop_token_ids"),
        logprobs=logprobs,
        prompt_logprobs=logprobs if echo else None,
    )


# ---- responses -----------------------------------------------------------------------------
class _Logprobs:
    """OpenAI's logprobs objects for one response, built chunk by chunk: chat's
    {"content": [{token, logprob, bytes, top_logprobs}]} or the completions API's
    {tokens, token_logprobs, top_logprobs, text_offset} (offsets into the returned text, echoed
    prompt included). Token strings, bytes and offsets come from the vocabulary's pieces
    (server/pieces.py), so they add up to the returned text, multi-byte characters included.
    Log-probabilities of -inf are written as -9999.0 (JSON has no infinity)."""

    def __init__(self, tokenizer, chat: bool) -> None:
        self.pieces = pieces_for(tokenizer)
        self.chat = chat
        self.offsets = Offsets(self.pieces)

    def _entry(self, token_id: int, logprob: float) -> dict:
        return {
            "token": self.pieces.text(token_id),
            "logprob": _finite(logprob),
            "bytes": list(self.pieces.bytes(token_id)),
        }

    def format_prompt(self, prompt_ids: list[int], items: list[TokenLogprob], echo_len: int) -> dict:
        """The completions API's logprobs of an echoed prompt (its first token has none); the
        completion's offsets then start after the echoed text's `echo_len` characters."""
        prompt = Offsets(self.pieces, skip_special=False)  # the echoed prompt keeps its special tokens
        out = {
            "tokens": [self.pieces.text(t) for t in prompt_ids],
            "token_logprobs": [None] + [_finite(i.logprob) for i in items],
            "top_logprobs": [None] + [self._top(i) for i in items],
            "text_offset": [prompt.next(t) for t in prompt_ids],
        }
        self.offsets = Offsets(self.pieces, start=echo_len)
        return out

    def _top(self, item: TokenLogprob) -> dict[str, float]:
        """A position's alternatives by text, most likely first; the chosen token is always
        there (as vLLM's). Tokens that read the same keep the likelier value."""
        top: dict[str, float] = {}
        for token_id, logprob in [*item.top, (item.token, item.logprob)]:
            top.setdefault(self.pieces.text(token_id), _finite(logprob))
        return top

    def format(self, items: list[TokenLogprob]) -> dict:
        if self.chat:
            return {
                "content": [
                    {**self._entry(i.token, i.logprob), "top_logprobs": [self._entry(t, lp) for t, lp in i.top]}
                    for i in items
                ]
            }
        return {
            "tokens": [self.pieces.text(i.token) for i in items],
            "token_logprobs": [_finite(i.logprob) for i in items],
            "top_logprobs": [self._top(i) for i in items],
            "text_offset": [self.offsets.next(i.token) for i in items],
        }


def _finite(logprob: float) -> float:
    return max(logprob, -9999.0)


async def _respond(
    request: Request, state, engine, body: SamplingFields, gen: GenerationRequest, chat: bool, echo: str | None = None
):
    """Submit the request's `n` sequences (choice i samples with seed + i when a seed is given)
    and answer with all of them, streamed or whole."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    if body.n > engine.config.max_queue:
        raise InvalidRequestError(f"n ({body.n}) exceeds the request queue ({engine.config.max_queue})", "n")
    gens = [gen if i == 0 or gen.params.seed is None else _with_seed(gen, gen.params.seed + i) for i in range(body.n)]
    emits = [lambda ev, i=i: loop.call_soon_threadsafe(events.put_nowait, (i, ev)) for i in range(body.n)]
    seqs = engine.submit_many(gens, emits)  # all the choices or none (429)
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        timeout = state.settings.request_timeout_s
        formatters = [_Logprobs(state.tokenizer, chat) if gen.logprobs is not None else None for _ in seqs]
        stream = _stream(events, seqs, rid, created, state.model_name, chat, include_usage, timeout, formatters, echo)
        return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    text: list[list[str]] = [[echo or ""] for _ in seqs]
    logprobs: list[list[TokenLogprob]] = [[] for _ in seqs]
    prompt_logprobs: list[list[TokenLogprob]] = [[] for _ in seqs]
    finished: dict[int, Finish] = {}
    deadline = loop.time() + state.settings.request_timeout_s
    next_poll = loop.time() + 0.25
    try:
        while len(finished) < len(seqs):
            # the deadline and the client's connection are checked however fast tokens arrive
            now = loop.time()
            if now >= deadline:
                raise RequestTimeoutError(f"the request did not finish within {state.settings.request_timeout_s:g} s")
            if now >= next_poll:
                next_poll = now + 0.25
                if await request.is_disconnected():
                    return Response(status_code=499)
            try:
                i, ev = await asyncio.wait_for(events.get(), timeout=min(0.25, deadline - now))
            except asyncio.TimeoutError:
                continue
            if isinstance(ev, Delta):
                text[i].append(ev.text)
                logprobs[i] += ev.logprobs or []
                prompt_logprobs[i] += ev.prompt_logprobs or []
            elif isinstance(ev, Failure):
                raise ev.error
            elif isinstance(ev, Finish):
                finished[i] = ev
    finally:  # a failure, timeout, disconnect or cancellation: the others stop too (no-op when done)
        for seq in seqs:
            seq.cancelled.set()
    choices = []
    for i in range(len(seqs)):
        content = "".join(text[i])
        lp = None
        if gen.logprobs is not None:
            formatter = _Logprobs(state.tokenizer, chat)
            if echo is not None:
                prompt_lp = formatter.format_prompt(gen.prompt_ids, prompt_logprobs[i], len(echo))
                lp = _join(prompt_lp, formatter.format(logprobs[i]))
            else:
                lp = formatter.format(logprobs[i])
        reason = finished[i].reason
        choices.append(
            {"index": i, "message": {"role": "assistant", "content": content}, "finish_reason": reason, "logprobs": lp}
            if chat
            else {"index": i, "text": content, "finish_reason": reason, "logprobs": lp}
        )
    ends = [finished[i] for i in range(len(seqs))]
    return {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": state.model_name,
        "choices": choices,
        "usage": _usage(ends),
        "stats": _merged_stats(ends),
    }


def _with_seed(gen: GenerationRequest, seed: int) -> GenerationRequest:
    return dataclasses.replace(gen, params=dataclasses.replace(gen.params, seed=seed))


def _join(a: dict, b: dict) -> dict:
    """Two completions-API logprobs objects, one after the other."""
    return {key: a[key] + b[key] for key in a}


async def _stream(
    events,
    seqs,
    rid,
    created,
    model,
    chat,
    include_usage,
    timeout_s,
    formatters: list[_Logprobs | None],
    echo: str | None = None,
) -> AsyncIterator[str]:
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(
        index: int,
        delta_text: str | None,
        finish_reason: str | None,
        first: bool = False,
        logprobs: dict | None = None,
        **extra,
    ) -> str:
        if chat:
            delta = (
                {"role": "assistant", "content": delta_text or ""}
                if first
                else {"content": delta_text}
                if delta_text
                else {}
            )
            choice = {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}
        else:
            choice = {"index": index, "text": delta_text or "", "finish_reason": finish_reason, "logprobs": logprobs}
        payload = {"id": rid, "object": kind, "created": created, "model": model, "choices": [choice], **extra}
        return f"data: {json.dumps(payload)}\n\n"

    echoes = [echo] * len(seqs)  # each choice's prompt, until sent
    finished: dict[int, Finish] = {}
    try:
        for i, formatter in enumerate(formatters):
            if chat:
                yield chunk(i, "", None, first=True)
            if echoes[i] is not None and formatter is None:  # the prompt at once, in a chunk of its own
                yield chunk(i, echoes[i], None)
                echoes[i] = None
        deadline = asyncio.get_running_loop().time() + timeout_s
        while len(finished) < len(seqs):
            try:
                i, ev = await asyncio.wait_for(
                    events.get(), timeout=max(deadline - asyncio.get_running_loop().time(), 0)
                )
            except asyncio.TimeoutError:
                i, ev = 0, Failure(RequestTimeoutError(f"the request did not finish within {timeout_s:g} s"))
            formatter = formatters[i]
            if isinstance(ev, Delta):
                if echoes[i] is not None:  # with its logprobs, which come with the first delta after prefill
                    prompt_lp = formatter.format_prompt(seqs[i].prompt_ids, ev.prompt_logprobs or [], len(echoes[i]))
                    yield chunk(i, echoes[i], None, logprobs=prompt_lp)
                    echoes[i] = None
                if ev.text or ev.logprobs:
                    logprobs = formatter.format(ev.logprobs) if formatter is not None and ev.logprobs else None
                    yield chunk(i, ev.text, None, logprobs=logprobs)
            elif isinstance(ev, Failure):
                err = ev.error
                body = (
                    err.body()
                    if isinstance(err, TrieserveError)
                    else error_body(f"generation failed: {err}", "server_error")
                )
                yield f"data: {json.dumps(body)}\n\n"
                break
            elif isinstance(ev, Finish):
                finished[i] = ev
                yield chunk(i, None, ev.reason, stats=ev.stats)
        if include_usage and len(finished) == len(seqs):
            ends = [finished[i] for i in range(len(seqs))]
            usage = {
                "id": rid,
                "object": kind,
                "created": created,
                "model": model,
                "choices": [],
                "usage": _usage(ends),
                "stats": _merged_stats(ends),
            }
            yield f"data: {json.dumps(usage)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        # runs when the client goes away mid-stream too: the engine drops the sequences next step
        for seq in seqs:
            seq.cancelled.set()


def _merged_stats(ends: list[Finish]) -> dict:
    """One request's `stats` over its choices, which run in the same batched forwards:
    forward passes and times are the longest choice's, draft and accepted tokens are summed,
    tokens per forward is the choices' mean (their tokens over their forwards), the prompt's
    cache hits are the first choice's, and the KV figures are those of the choice that had seen
    the most tokens at its last eviction (with kv_regrow they depend on each choice's output)."""
    if len(ends) == 1:
        return ends[0].stats
    stats = dict(ends[0].stats)
    longest = max(ends, key=lambda e: e.stats["kv_tokens_total"])
    for key in ("kv_tokens_kept", "kv_tokens_total", "kv_evictions"):
        stats[key] = longest.stats[key]
    for key in ("forward_passes", "prefill_s", "decode_s"):
        stats[key] = max(e.stats[key] for e in ends)
    for key in ("draft_tokens", "accepted_tokens"):
        stats[key] = sum(e.stats[key] for e in ends)
    forwards = sum(e.stats["forward_passes"] for e in ends)
    completion = sum(e.completion_tokens for e in ends)
    stats["tokens_per_forward"] = round(completion / forwards, 4) if forwards else 0.0
    return stats


def _usage(ends: list[Finish]) -> dict:
    """OpenAI's usage of a request: the prompt once, the completion tokens of every choice."""
    prompt = ends[0].prompt_tokens
    completion = sum(e.completion_tokens for e in ends)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        # OpenAI's: prompt tokens whose prefill the prefix cache saved
        "prompt_tokens_details": {"cached_tokens": ends[0].stats.get("cached_prompt_tokens", 0)},
    }


# ---- errors --------------------------------------------------------------------------------
_TYPE_TAGS = {"str", "int", "float", "bool", "bytes", "dict", "list", "none"}


def _field_path(loc) -> tuple[str | None, str | None]:
    """(the field's dotted path, the union member tried) of a pydantic error location: pydantic
    adds a union member's type name ("str", "list[str]") after the field; clients know the field."""
    parts: list[str] = []
    for p in loc:
        if p == "body" and not parts:
            continue
        if isinstance(p, str) and (p in _TYPE_TAGS or "[" in p):
            return ".".join(parts) or None, p
        parts.append(str(p))
    return ".".join(parts) or None, None


def _json_type(kind: str) -> bool:
    """Whether FastAPI parses a body of this content type as JSON (application/json, */*+json)."""
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


def _install_error_handlers(app: FastAPI, state: ServerState) -> None:
    @app.exception_handler(TrieserveError)
    async def domain_error(request: Request, exc: TrieserveError):
        headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, QueueFullError) else None
        return JSONResponse(exc.body(), status_code=exc.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        param, _ = _field_path(first.get("loc", ()))
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if first.get("type") == "json_invalid":
            message, param = "the request body is not valid JSON", None
        elif param is None and not _json_type(kind):  # no type or a form type (curl -d): not parsed
            message = f"send the body as JSON with Content-Type: application/json (got {kind or 'none'!r})"
        else:
            # a field that takes several types fails once per type: name the field and the types
            same = [e for e in errors if _field_path(e.get("loc", ()))[0] == param]
            types = [t for t in dict.fromkeys(_field_path(e.get("loc", ()))[1] for e in same) if t]
            message = f"{param or 'body'}: {first.get('msg', 'invalid value')}"
            if len(types) > 1:
                message += f" (accepted: {' or '.join(types)})"
            if len(errors) > len(same):
                message += f" (and {len(errors) - len(same)} more problem(s))"
        return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(
            error_body(str(exc.detail), kind), status_code=exc.status_code, headers=getattr(exc, "headers", None)
        )

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("unhandled error")
        return JSONResponse(error_body("internal error", "server_error"), status_code=500)

    _ = (ModelNotReadyError, state)
