"""Request and response bodies of `swarm.api`: OpenAI's completions and chat completions (the
fields we support; unknown fields are ignored, as OpenAI's own clients may send newer ones), our
simple `/chat`, and fine-tuning jobs."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from swarm.api.config import MOST_SPECULATIVE_TOKENS, SpeculationKind

MAX_TOKENS = 4096
MAX_N = 8
MAX_STOPS = 4

SPECULATION_HELP = (
    "speculative decoding (our extension): prompt_lookup proposes tokens from the text so far, draft from the server's "
    "draft model, none decodes plainly; default: the server's. Greedy output is the same either way; a speculative "
    "request runs in a session of its own, outside the batch"
)
SPECULATIVE_TOKENS_HELP = "the longest proposal, in tokens (default: the server's)"

Temperature = Annotated[float, Field(1.0, ge=0.0, le=2.0)]
TopP = Annotated[float, Field(1.0, gt=0.0, le=1.0)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stop: str | list[Annotated[str, Field(min_length=1, max_length=256)]] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    logprobs: None = Field(None, description="not supported")
    stream_options: dict | None = Field(None, description='{"include_usage": true}: a last chunk with the usage')
    adapter: str | None = Field(None, min_length=1, max_length=128, description="a LoRA adapter served by peers (our extension)")
    speculation: SpeculationKind | None = Field(None, description=SPECULATION_HELP)
    speculative_tokens: int | None = Field(None, ge=1, le=MOST_SPECULATIVE_TOKENS, description=SPECULATIVE_TOKENS_HELP)

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOPS or any(not stop for stop in stops):
            raise ValueError(f"stop: up to {MAX_STOPS} non-empty strings")
        return stops

    def stops(self) -> list[str]:
        return list(self.stop or [])


class CompletionRequest(_Request):
    prompt: Annotated[str, Field(min_length=1)] | list[Annotated[str, Field(min_length=1)]] = Field(
        description="one prompt or several"
    )
    max_tokens: int | None = Field(16, ge=1, le=MAX_TOKENS)  # OpenAI's default for completions

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @field_validator("prompt")
    @classmethod
    def _some_prompt(cls, value):
        if isinstance(value, list) and not 1 <= len(value) <= 32:
            raise ValueError("prompt: between 1 and 32 prompts")
        return value


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class Completion(BaseModel):
    id: str = Field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    finish_reason: Literal["stop", "length"] | None


class ChatCompletion(BaseModel):
    id: str = Field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class SimpleChatRequest(BaseModel):
    """`POST /chat`: a prompt in, the completion out."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1)
    max_tokens: int = Field(64, ge=1, le=MAX_TOKENS)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    adapter: str | None = Field(None, min_length=1, max_length=128)
    speculation: SpeculationKind | None = Field(None, description=SPECULATION_HELP)
    speculative_tokens: int | None = Field(None, ge=1, le=MOST_SPECULATIVE_TOKENS, description=SPECULATIVE_TOKENS_HELP)


class SimpleChatReply(BaseModel):
    text: str
    prompt_tokens: int
    completion_tokens: int


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["lora", "ptune", "deep_ptune"] = "lora"
    lora_r: int = Field(8, ge=1, le=256)
    lora_alpha: float = Field(16.0, gt=0, le=4096)
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    learning_rate: float = Field(1e-3, gt=0, le=1.0)
    num_epochs: int = Field(1, ge=1, le=1000)
    batch_size: int = Field(4, ge=1, le=1024)
    max_seq_length: int = Field(256, ge=2, le=32768)


class FineTuneRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset_path: str = Field(min_length=1, max_length=4096, description="JSONL on the API's machine, under its --data-root")
    output_path: str = Field(min_length=1, max_length=4096, description="folder for checkpoints and the result, under --data-root")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


JobStatus = Literal["running", "succeeded", "failed", "cancelled"]


class Job(BaseModel):
    id: str
    status: JobStatus
    created_at: float
    finished_at: float | None = None
    dataset_path: str
    output_path: str
    hyperparameters: Hyperparameters
    pid: int | None = None
    steps_done: int = 0
    total_steps: int
    progress: float = Field(0.0, description="steps done / total steps, 0..1")
    loss: float | None = Field(None, description="the last training loss")
    error: str | None = None
