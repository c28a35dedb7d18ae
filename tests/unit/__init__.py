"""Unit tests: no sockets, no subprocesses of our own, seconds each."""
