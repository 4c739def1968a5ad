"""OpenAI chat-completions wire schema, plus Duet's `duet` extension object. No engine code here."""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

PairsMode = Literal["allow", "force", "never"]
MAX_STOP_CHARS = 200  # per stop sequence: they are stored with every comparison and vote


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    # OpenAI also allows a list of content parts; only text parts make sense for a text model.
    content: str | list[dict]
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _text_only(cls, v: str | list[dict]) -> str:
        if isinstance(v, str):
            return v
        texts = []
        for part in v:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported")
            texts.append(part["text"])
        return "".join(texts)


class DuetRequestOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pairs: PairsMode = "never"
    k: int | None = Field(None, ge=2, description="answers in a comparison (default 2; capped by DUET_MAX_K)")


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we don't use (logprobs=False, ...)

    model: str
    messages: list[ChatMessageIn] = Field(min_length=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = Field(None, validate_default=True)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # what the engine's generator takes
    user: str | None = None
    stream: bool = False
    stream_options: dict | None = None
    duet: DuetRequestOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> list[str]:
        if v is None:
            return []
        stops = [v] if isinstance(v, str) else v
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("a stop sequence cannot be empty")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop sequence is at most {MAX_STOP_CHARS} characters")
        return stops

    @field_validator("n")
    @classmethod
    def _n_needs_sampling(cls, v: int, info: ValidationInfo) -> int:
        if v > 1 and info.data.get("temperature") == 0:
            raise ValueError("n > 1 needs temperature > 0: greedy answers would all be the same")
        return v


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: ChatMessageOut
    finish_reason: str | None
    logprobs: None = None


class DuetResponseInfo(BaseModel):
    """Duet's extension on every response: which weights answered, and for pairs how to vote."""

    model_version: str
    model_versions: list[str] | None = None  # set when tokens came from more than one version (swap mid-request)
    comparison_id: str | None = None  # set when the response holds K answers to compare
    completion_id: str | None = None  # set on single answers to Duet-aware clients (thumbs up/down)
    vote_token: str | None = None
    expires_at: int | None = None  # unix seconds


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage
    duet: DuetResponseInfo


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    duet: DuetResponseInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "duet"
    root: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
