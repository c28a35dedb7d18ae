"""The dashboard's settings (`python -m swarm.dashboard`): one model, mapped onto flags, SWARM_DASHBOARD_*
environment variables and a TOML file by `swarm.settings`."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from swarm.config import NetworkConfig, client_network


class DashboardConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    network: NetworkConfig = Field(default_factory=client_network)
    host: str = Field("127.0.0.1", description="address the web server listens on")
    port: int = Field(8000, ge=0, le=65535, description="port the web server listens on")
    period_s: float = Field(10.0, gt=0, description="seconds between crawls of the swarm")
    ping_timeout_s: float = Field(2.0, gt=0, description="seconds a peer has to answer a latency ping")

    @model_validator(mode="after")
    def _needs_peers(self) -> "DashboardConfig":
        self.network.require_initial_peers()
        return self
