"""The HTTP API's settings (`python -m swarm.api`): one model with the client's settings as a section,
mapped onto flags, SWARM_API_* environment variables and a TOML file by `swarm.settings`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from swarm.config import DEFAULT_MODEL, ClientConfig

SpeculationKind = Literal["none", "prompt_lookup", "draft"]
MOST_SPECULATIVE_TOKENS = 64


class SpeculationConfig(BaseModel):
    """Speculative decoding for requests that do not choose (a request's `speculation` field overrides it)."""

    model_config = ConfigDict(extra="forbid")

    speculation: SpeculationKind = Field(
        "none", description="how requests that do not say propose tokens: prompt_lookup (n-grams of the text so far), "
        "draft (the --draft-model) or none (plain decoding); speculative requests run in a session of their own, outside the batch",
    )
    speculative_tokens: int = Field(10, ge=1, le=MOST_SPECULATIVE_TOKENS, description="the longest proposal, in tokens, for requests that do not say")
    draft_model: str | None = Field(
        None, description="a small model sharing the served model's tokenizer (Hugging Face id or folder), run by this server to propose tokens",
    )

    @model_validator(mode="after")
    def _draft_needs_a_model(self) -> "SpeculationConfig":
        if self.speculation == "draft" and not self.draft_model:
            raise ValueError("speculation 'draft' needs a --draft-model")
        return self


class ApiConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    client: ClientConfig = Field(default_factory=ClientConfig, description="how the API reaches the swarm")
    model: str = Field(DEFAULT_MODEL, description="model name, Hugging Face id or folder, as the peers serve it")
    host: str = Field("127.0.0.1", description="address the HTTP server listens on")
    port: int = Field(8080, ge=0, le=65535, description="port the HTTP server listens on")
    api_key: str | None = Field(None, description="require `Authorization: Bearer KEY` on every request but /health")
    jobs_dir: Path = Field(Path("swarm-jobs"), description="where fine-tuning jobs keep their records")
    data_root: Path = Field(Path("."), description="fine-tuning datasets and outputs must be under this folder")
    max_batch: int = Field(16, ge=1, description="requests generated together in one batched session (1: each request alone)")
    lanes: int = Field(
        2, ge=1, description="batched sessions in flight at once: while one lane's step runs on a peer, another's can run on the next"
    )
    max_length: int | None = Field(
        None, ge=2, description="longest prompt + completion, in tokens; default: the model's, at most the peers' default"
    )
    speculation: SpeculationConfig = Field(default_factory=SpeculationConfig, description="speculative decoding")

    @model_validator(mode="after")
    def _needs_peers(self) -> "ApiConfig":
        self.client.network.require_initial_peers()
        return self
