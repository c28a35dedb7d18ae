"""swarm: run large language models collaboratively, each peer serving a range of blocks."""

__version__ = "0.1.0"
