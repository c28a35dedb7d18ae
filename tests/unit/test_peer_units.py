"""A peer's checks and budgets without sockets: request validation, the KV-cache budget, batched sessions' plans, the step batcher."""

from __future__ import annotations

import asyncio
import functools
import math

import pytest
import torch

from peers.cache import CacheBudget
from peers.validation import Limits, check_block_inputs, check_span
from swarm import errors

pytestmark = pytest.mark.timeout(60)


# ---- peer-side validation ----------------------------------------------------------------------
LIMITS = Limits(hidden_size=8, max_batch_size=4, max_length=32)


@pytest.mark.parametrize(
    "tensors",
    [
        {},
        {"hidden_states": torch.zeros(1, 2, 9)},
        {"hidden_states": torch.zeros(1, 2, 8, dtype=torch.int64)},
        {"hidden_states": torch.zeros(5, 2, 8)},
        {"hidden_states": torch.full((1, 2, 8), math.nan)},
        {"hidden_states": torch.zeros(1, 2, 8), "position_ids": torch.zeros(1, 3, dtype=torch.int64)},
        {"hidden_states": torch.zeros(1, 2, 8), "position_ids": torch.full((1, 2), 99, dtype=torch.int64)},
        {"hidden_states": torch.zeros(1, 2, 8), "attention_mask": torch.ones(1, 3, dtype=torch.int64)},
        {"hidden_states": torch.zeros(1, 2, 8), "attention_mask": torch.full((1, 2), 7, dtype=torch.int64)},
    ],
)
def test_bad_inputs_are_refused(tensors):
    with pytest.raises(errors.InvalidRequestError):
        check_block_inputs(tensors, LIMITS)


def test_session_length_and_span_limits():
    with pytest.raises(errors.SessionLengthError):
        check_block_inputs({"hidden_states": torch.zeros(1, 4, 8)}, LIMITS, past_length=30)
    with pytest.raises(errors.BlocksNotServedError, match="serves 2:4"):
        check_span(0, 4, (2, 4))
    with pytest.raises(errors.InvalidRequestError, match="empty"):
        check_span(3, 3, (2, 4))
    inputs = check_block_inputs({"hidden_states": torch.zeros(2, 3, 8)}, LIMITS)
    assert inputs.hidden_states.shape == (2, 3, 8)


def test_cache_budget_waits_then_reports_overload():
    async def scenario():
        budget = CacheBudget(total_bytes=100 * 8, bytes_per_token=8, max_sessions=2)
        async with budget.reserve(60, timeout_s=1):
            assert budget.tokens_left == 40 and budget.used_bytes == 480
            with pytest.raises(errors.OverloadedError, match="no cache for 50 tokens"):
                async with budget.reserve(50, timeout_s=0.05):
                    pass
        async with budget.reserve(100, timeout_s=0.05):
            assert budget.tokens_left == 0
        with pytest.raises(errors.SessionLengthError):
            async with budget.reserve(101, timeout_s=0.05):
                pass
        assert budget.tokens_left == 100 and budget.sessions == 0

    asyncio.run(scenario())


def test_cache_budget_limits_concurrent_sessions_and_wakes_waiters():
    async def scenario():
        budget = CacheBudget(total_bytes=1000, bytes_per_token=1, max_sessions=2)
        async with budget.reserve(1, timeout_s=1), budget.reserve(1, timeout_s=1):
            assert budget.tokens_left == 0  # no slot: nothing to offer a new session
            with pytest.raises(errors.OverloadedError, match="all 2 session slots"):
                async with budget.reserve(1, timeout_s=0.05):
                    pass
        held = asyncio.Event()

        async def holder():
            async with budget.reserve(1, timeout_s=1), budget.reserve(1, timeout_s=1):
                held.set()
                await asyncio.sleep(0.1)

        task = asyncio.create_task(holder())
        await held.wait()
        async with budget.reserve(500, timeout_s=2):  # waits for a slot, then gets it
            assert budget.sessions == 1
        await task
        assert budget.sessions == 0 and budget.used_bytes == 0

    asyncio.run(scenario())


def _slot_step(**fields):
    from swarm.messages import SlotStep

    return SlotStep(step_id=0, **fields)


def test_slot_steps_plan_rows_starts_and_releases():
    from peers.slots import RowPlan, plan_step

    held = {0: (5, 20), 1: (3, 10)}  # slot -> (cached tokens, reserved tokens)
    plan = functools.partial(plan_step, slots=4, max_length=64)
    rows = plan(_slot_step(slots=[1, 0], positions=[3, 5], tokens=[1, 6]), held, shape=(1, 7))
    assert rows == [RowPlan(1, 3, 1, 10), RowPlan(0, 5, 6, 20)]  # a decode token and a prefill chunk side by side
    assert plan(_slot_step(starts=[2, 0], start_lengths=[30, 9], release=[1]), held, shape=None) == []
    assert plan(_slot_step(release=[0, 1]), held, shape=None) == []
    refused = [
        (_slot_step(slots=[0], positions=[5], tokens=[1], release=[0]), (1, 1), errors.InvalidRequestError),  # released
        (_slot_step(slots=[0], positions=[4], tokens=[1]), (1, 1), errors.InvalidRequestError),  # not where it stands
        (_slot_step(slots=[0], positions=[5], tokens=[16]), (1, 16), errors.SessionLengthError),  # past its reservation
        (_slot_step(starts=[2], start_lengths=[65]), None, errors.SessionLengthError),  # over max_length
        (_slot_step(starts=[2], start_lengths=[8, 8]), None, errors.InvalidRequestError),
        (_slot_step(starts=[2], start_lengths=[8], slots=[0], positions=[5], tokens=[1]), (1, 1), errors.InvalidRequestError),
        (_slot_step(slots=[3], positions=[0], tokens=[1]), (1, 1), errors.InvalidRequestError),  # holds nothing
        (_slot_step(starts=[4], start_lengths=[8]), None, errors.InvalidRequestError),  # no such slot
        (_slot_step(slots=[0, 0], positions=[5, 5], tokens=[1, 1]), (1, 2), errors.InvalidRequestError),
        (_slot_step(slots=[0, 1], positions=[5, 3], tokens=[1]), (1, 1), errors.InvalidRequestError),
        (_slot_step(slots=[0, 1], positions=[5, 3], tokens=[1, 1]), (2, 1), errors.InvalidRequestError),  # not side by side
        (_slot_step(slots=[0, 1], positions=[5, 3], tokens=[1, 1]), (1, 3), errors.InvalidRequestError),  # token count
        (_slot_step(slots=[0], positions=[5], tokens=[1]), None, errors.InvalidRequestError),  # no hidden states
        (_slot_step(release=[1, 1]), None, errors.InvalidRequestError),
        (_slot_step(), (1, 1), errors.InvalidRequestError),  # hidden states without rows
    ]
    for step, shape, kind in refused:
        with pytest.raises(kind):
            plan(step, held, shape=shape)


def test_cache_budget_takes_without_waiting_and_gives_back():
    async def run():
        budget = CacheBudget(total_bytes=100, bytes_per_token=10, max_sessions=2)
        budget.take(6)
        with pytest.raises(errors.OverloadedError):
            budget.take(5)
        with pytest.raises(errors.SessionLengthError):
            budget.take(11)
        await budget.give_back(6)
        budget.take(10)
        assert budget.tokens_left == 0

    asyncio.run(run())


def test_step_batcher_counts_rows_per_turn():
    from peers.batching import StepBatcher

    async def run():
        turns = []

        async def run_compute(job):
            await asyncio.sleep(0.01)
            return job()

        def run_batch(items):
            turns.append(list(items))
            return items

        batcher = StepBatcher(run_compute, run_batch, max_steps=4)
        results = await asyncio.gather(*(batcher.submit(name, rows) for name, rows in [("a", 1), ("b", 3), ("c", 2), ("d", 5), ("e", 1)]))
        batcher.close()
        return results, turns

    results, turns = asyncio.run(run())
    assert results == ["a", "b", "c", "d", "e"]
    # all five wait before the first turn: a turn takes items in order up to 4 rows, and at least one item
    assert turns == [["a", "b"], ["c"], ["d"], ["e"]]




def test_a_peer_pings_the_peers_that_serve_the_block_after_its_own():
    from peers.pings import next_hops
    from swarm.coverage import Span
    from swarm.records import MAX_NEXT_PINGS

    spans = {"me": Span("me", 0, 4), "next": Span("next", 4, 8), "over": Span("over", 2, 6), "later": Span("later", 5, 9)}
    assert next_hops(spans, 4, "me") == ["next", "over"]  # they could take our push; "later" could not
    many = {f"p{index:03d}": Span(f"p{index:03d}", 4, 8) for index in range(50)}
    assert len(next_hops(many, 4, "me")) == MAX_NEXT_PINGS
