"""Defects of the applications found by reading them: each test failed before its fix."""

from __future__ import annotations

import gc
import os
import warnings

import psutil
import pytest

from swarm.api.jobs import JobManager, group_alive
from swarm.api.schema import FineTuneRequest


@pytest.mark.timeout(60)
def test_a_started_job_closes_its_log_file_in_the_api_process(tmp_path):
    (tmp_path / "data.jsonl").write_text('{"text": "hello there"}\n')
    manager = JobManager(tmp_path / "jobs", tmp_path, model="tiny", initial_peers=["/ip4/127.0.0.1/tcp/9"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        job = manager.start(FineTuneRequest(dataset_path="data.jsonl", output_path="out"))
        gc.collect()
    unclosed = [str(warning.message) for warning in caught if issubclass(warning.category, ResourceWarning) and ".log" in str(warning.message)]
    assert unclosed == [], "the job's log file was left for the garbage collector to close"
    try:
        log_path = str((tmp_path / "jobs" / f"{job.id}.log").resolve())
        held = [entry.path for entry in psutil.Process(os.getpid()).open_files() if entry.path == log_path]
        assert held == [], "the API process keeps the job's log file open"
    finally:
        manager.cancel(job.id)
    assert not group_alive(job.pid)
