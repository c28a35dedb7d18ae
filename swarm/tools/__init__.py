"""Tooling around the swarm, not part of any node: local swarms of subprocesses for the demo, the tests
and the benchmarks (`local`), and the fine-tuning corpus fetcher (`python -m swarm.tools.corpus`).
"""
