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


def test_swarm_client_samples_with_its_own_generator_and_leaves_torchs_global_one_alone():
    import torch

    from client.sampling import SeededSampler
    from client.text import SwarmClient

    class FakeModel:
        def generate(self, input_ids, **kwargs):
            self.kwargs = kwargs
            return torch.cat([input_ids, torch.tensor([[7]])], dim=1)

    class FakeTokenizer:
        def __call__(self, prompt, return_tensors):
            return type("Encoded", (), {"input_ids": torch.tensor([[1, 2]])})()

        def decode(self, ids, skip_special_tokens):
            return " ".join(str(int(token)) for token in ids)

    client = object.__new__(SwarmClient)
    client.model, client.tokenizer = FakeModel(), FakeTokenizer()
    before = torch.random.get_rng_state()
    assert client.generate("hi", max_new_tokens=1, temperature=0.7, seed=3) == "7"
    assert torch.equal(torch.random.get_rng_state(), before), "seeding a request reseeded torch's global generator"
    (sampler,) = client.model.kwargs["logits_processor"]
    assert isinstance(sampler, SeededSampler) and client.model.kwargs["do_sample"] is False
