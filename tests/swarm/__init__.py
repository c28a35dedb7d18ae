"""Swarm tests: real nodes as subprocesses on 127.0.0.1 (or commands run as a user would)."""
