"""Client-side continuous batching (`client.generator`) over batched sessions (`peers.slots`), through a
live local swarm of the tiny model: requests that join and leave at any step produce exactly the
tokens transformers produces for each alone, long prompts are fed in chunks, a peer killed mid-run
costs no request and no token, and malformed slot steps get typed errors while the peer keeps serving."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import pytest
import torch

from client import AutoDistributedModelForCausalLM
from client.batched import BatchedSession
from client.generator import BatchedGenerator, GenerationRequest
from client.sampling import SeededSampler
from swarm import errors
from swarm.tools.local import LocalSwarm
from swarm.loop_thread import run_coroutine

from tests.conftest import PEER_ENV

pytestmark = pytest.mark.timeout(300)

NEW_TOKENS = 20


def _prompts(count: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (3 + 5 * index,), generator=generator).tolist() for index in range(count)]


def _expected(reference, prompt: list[int], new_tokens: int = NEW_TOKENS) -> list[int]:
    ids = torch.tensor([prompt])
    output = reference.generate(ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    return output[0, ids.shape[1] :].tolist()


def _submit_staggered(generator: BatchedGenerator, prompts: list[list[int]], **request) -> list[list[int]]:
    """Submit each prompt from its own thread, a little apart, so requests join while others decode."""
    futures: list[concurrent.futures.Future] = [None] * len(prompts)

    def submit(index: int) -> None:
        time.sleep(0.05 * index)
        futures[index] = generator.submit(GenerationRequest(prompts[index], NEW_TOKENS, **request))

    threads = [threading.Thread(target=submit, args=(index,)) for index in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [future.result(timeout=120) for future in futures]


def test_requests_joining_at_any_step_equal_transformers(model, reference):
    prompts = _prompts(8)
    prompts[3] = (prompts[3] * 8)[:70]  # longer than the prefill chunk: fed in pieces between decode steps
    generator = BatchedGenerator(model, max_batch=4, max_length=128, prefill_chunk=16)
    try:
        outputs = _submit_staggered(generator, prompts)
        assert outputs == [_expected(reference, prompt) for prompt in prompts]
        assert generator.rows > 2 * generator.steps  # most decode steps carried several sequences
        cancelled = GenerationRequest(prompts[0], 100 - len(prompts[0]))
        future = generator.submit(cancelled)
        time.sleep(0.3)
        cancelled.cancelled.set()
        assert len(future.result(timeout=60)) < 100 - len(prompts[0])  # it stopped early, with what it had
        with pytest.raises(errors.SessionLengthError):
            generator.submit(GenerationRequest(prompts[0], 200)).result(timeout=10)
    finally:
        generator.close()


def test_seeded_sampling_and_eos(model, reference):
    prompt = _prompts(1, seed=3)[0]
    generator = BatchedGenerator(model, max_batch=4, max_length=128)
    try:
        runs = [generator.submit(GenerationRequest(prompt, NEW_TOKENS, sampler=SeededSampler(0.9, 0.95, seed=7))) for _ in range(3)]
        first, second, third = (future.result(timeout=60) for future in runs)
        assert first == second == third  # same seed, same tokens, though they ran side by side
        greedy = _expected(reference, prompt)
        eos = greedy[5]
        stopped = generator.submit(GenerationRequest(prompt, NEW_TOKENS, eos_token_ids=frozenset({eos}))).result(timeout=60)
        assert stopped == greedy[: greedy.index(eos) + 1]
    finally:
        generator.close()


def test_a_peer_killed_mid_generation_loses_nothing(tiny_model_path, reference, tmp_path):
    prompts = _prompts(6, seed=9)
    expected = [_expected(reference, prompt, 40) for prompt in prompts]
    with LocalSwarm(tmp_path, env=PEER_ENV) as swarm:
        swarm.start_bootstrap()
        nodes = [swarm.start_peer(blocks, model=str(tiny_model_path), extra_args=["--announce-period", "1"], wait=False)
                 for blocks in ("0:2", "0:2", "2:4", "2:4")]
        for node in nodes:
            swarm.wait_ready(node)
        model = AutoDistributedModelForCausalLM.from_pretrained(str(tiny_model_path), initial_peers=swarm.initial_peers)
        generator = BatchedGenerator(model, max_batch=8, max_length=128)
        try:
            counts = [0] * len(prompts)

            def counter(index):
                def on_token(token):
                    counts[index] += 1
                return on_token

            futures = [generator.submit(GenerationRequest(prompt, 40, on_token=counter(index))) for index, prompt in enumerate(prompts)]
            deadline = time.monotonic() + 60
            while min(counts) < 10:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            used = {peer_id for peer_id, _, _ in generator._session.route}
            victim = next(node for node in nodes if _peer_id(node) in used)
            victim.kill()
            assert [future.result(timeout=120) for future in futures] == expected
            assert generator.resets >= 1
        finally:
            generator.close()
            model.close()


def _peer_id(node) -> str:
    return node.maddrs[0].rsplit("/p2p/", 1)[1]


def test_bad_slot_steps_get_typed_errors_and_the_session_goes_on(model, reference):
    session = BatchedSession(model.sequence, slots=4, max_length=64)
    prompt = _prompts(1, seed=4)[0]
    run_coroutine(session.open())
    try:
        def step(*args, **kwargs):
            return run_coroutine(session.step(*args, **kwargs))

        hidden = model.embed_tokens(torch.tensor([prompt])).detach()  # [1, tokens, hidden]
        n = len(prompt)
        bad = [
            (([0], [0], [n], hidden), {}, errors.InvalidRequestError),  # slot 0 holds nothing yet
            (([], [], [], None), {"starts": [9], "start_lengths": [64]}, errors.InvalidRequestError),  # no slot 9
            (([], [], [], None), {"starts": [1], "start_lengths": [65]}, errors.SessionLengthError),  # over max_length
            (([], [], [], None), {"starts": [0, 0], "start_lengths": [8, 8]}, errors.InvalidRequestError),  # a slot twice
        ]
        for args, kwargs, kind in bad:
            with pytest.raises(kind):
                step(*args, **kwargs)
        assert step(starts=[0], start_lengths=[n + 4]) is None
        worse = [
            (([0], [0], [n], hidden[..., :5]), errors.InvalidRequestError),  # wrong hidden size
            (([0], [0], [n], hidden * float("nan")), errors.InvalidRequestError),
            (([0], [0], [n - 1], hidden), errors.InvalidRequestError),  # tokens do not add up
            (([0], [0], [3 * n], torch.cat([hidden] * 3, dim=1)), errors.SessionLengthError),  # past its length (n + 4)
            (([0], [2], [n], hidden), errors.InvalidRequestError),  # not where the slot stands
        ]
        for args, kind in worse:
            with pytest.raises(kind):
                step(*args)
        outputs = step([0], [0], [n], hidden)  # the session still serves, exactly
        with torch.no_grad():
            logits = model.lm_head(model.norm(outputs[:, -1]))
            expected = reference(torch.tensor([prompt])).logits[:, -1]
        assert torch.allclose(logits, expected, atol=1e-4)
        assert step(release=[0]) is None
        with pytest.raises(errors.InvalidRequestError):
            step([0], [n], [1], hidden[:, :1])  # released: it holds nothing any more
    finally:
        session.close()
