"""The HTTP API application: OpenAI-compatible completions over the swarm (`app`), the engine that
generates concurrent requests together (`engine`), the request and response bodies (`schema`) and
fine-tuning jobs run as subprocesses (`jobs`). Run it with `python -m swarm.api`.

An application: it uses `client/`, and nothing in the shared contract imports it.
"""
