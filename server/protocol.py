"""OpenAI-compatible request bodies (pydantic). Unknown fields are accepted and ignored; `null`
stands for a field's default, as in the OpenAI API."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from trieserve.server.settings import KV_POLICIES

Float = Annotated[float, Field(allow_inf_nan=False)]


class NullIsDefault(BaseModel):
    """Clients send unset options as null: those are dropped, so a field takes its default."""

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data):
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k not in cls.model_fields}
        return data


class StreamOptions(NullIsDefault):
    model_config = ConfigDict(extra="allow", strict=True)
    include_usage: bool = False


class SamplingFields(NullIsDefault):
    """Fields shared by both endpoints (OpenAI's, then vLLM-style and trieserve extensions).
    For completions, max_tokens null is 16, its default, as in OpenAI's completions API."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = None
    temperature: Annotated[Float, Field(ge=0.0, le=100.0)] = 1.0
    top_p: Annotated[Float, Field(gt=0.0, le=1.0)] = 1.0
    n: Annotated[int, Field(ge=1, le=16, description="choices per request, each its own sequence (at most 16)")] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: Annotated[int, Field(ge=0, lt=2**63)] | None = None
    presence_penalty: Annotated[Float, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[Float, Field(ge=-2.0, le=2.0)] = 0.0
    user: str | None = None
    # extensions (vLLM-compatible names)
    top_k: Annotated[int, Field(ge=-1, le=1_000_000)] = 0
    repetition_penalty: Annotated[Float, Field(gt=0.0, le=100.0)] = 1.0
    min_p: Annotated[Float, Field(ge=0.0, le=1.0)] = 0.0
    min_tokens: Annotated[int, Field(ge=0)] = 0
    ignore_eos: bool = False
    stop_token_ids: Annotated[list[int], Field(max_length=64)] | None = None
    logit_bias: Annotated[dict[str, Annotated[Float, Field(ge=-100.0, le=100.0)]], Field(max_length=1024)] | None = None
    # trieserve extensions
    lookahead: bool | None = Field(None, description="speculate with the trie for this request")
    kv_policy: str | None = Field(None, description=f"KV eviction policy: one of {', '.join(KV_POLICIES)}")
    kv_budget: Annotated[Float, Field(gt=0.0)] | None = Field(
        None, description="KV entries kept: a fraction (<=1) or a token count (>1)"
    )
    kv_regrow: Annotated[int, Field(ge=0)] | None = Field(
        None, description="evict again each time the cache has grown by this many tokens (0 = at prefill only)"
    )

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 16:
            raise ValueError(f"at most 16 stop strings are allowed, got {len(stops)}")
        for s in stops:
            if len(s) > 256:
                raise ValueError(f"stop strings are limited to 256 characters, got one of {len(s)}")
        return v

    @field_validator("kv_policy")
    @classmethod
    def _check_policy(cls, v):
        if v is not None and v not in KV_POLICIES:
            raise ValueError(f"unknown kv_policy {v!r}; known: {', '.join(KV_POLICIES)}")
        return v

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: Annotated[int, Field(ge=0)] | None = 16  # 0 only with echo: score the prompt
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


# ---- response bodies: documentation for /openapi.json (routes return plain dicts) ------------
class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class GenerationStats(BaseModel):
    """How the request was served (trieserve extension)."""

    forward_passes: int
    draft_tokens: int
    accepted_tokens: int
    tokens_per_forward: float
    kv_tokens_kept: int
    kv_tokens_total: int
    cached_prompt_tokens: int
    prefill_s: float
    decode_s: float


FinishReason = Literal["stop", "length", "cancelled"]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    """Raw model log-probabilities (before penalties, temperature and truncation)."""

    content: list[ChatTokenLogprob]


class CompletionLogprobs(BaseModel):
    """Raw model log-probabilities; `text_offset` counts characters of the returned text. With
    `echo` the prompt's tokens come first, and the first of them has none (null)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    stats: GenerationStats


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    stats: GenerationStats


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int | None = None  # the context in tokens (prompt + completion), as vLLM reports it


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    reason: str | None = None
