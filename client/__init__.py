"""The user side of swarm: routing, inference sessions, and the distributed model with generate().

`from client import AutoDistributedModelForCausalLM, SwarmClient`; submodules load on first use.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "AutoDistributedModelForCausalLM": "client.model",
    "DistributedModelForCausalLM": "client.model",
    "SwarmClient": "client.text",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'client' has no attribute {name!r}")
