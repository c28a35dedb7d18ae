"""Trainers of one run finding each other and averaging over the DHT (hivemind.Optimizer).

hivemind's progress tracker learns of a trainer only once that trainer has reported samples, and
refreshes its view every few seconds. Trainers that start at once each reach the first round's
target alone before seeing the others, skip averaging and drift apart (measured: 8 of 8 rounds
alone with tiny steps). So trainers meet first (`wait_for_trainers`: one DHT subkey per trainer
under `<run>_trainers`), and the tracker refreshes its view often.
"""

from __future__ import annotations

import functools
import logging
import time

import hivemind
import torch
from hivemind.utils import get_dht_time

from swarm.errors import CollaborationError

logger = logging.getLogger(__name__)

ROLL_CALL_TTL_S = 30.0
START_DELAY_S = 1.0  # after the last awaited trainer announced itself
POLL_S = 0.2
# how often each trainer reads the run's progress: hivemind's defaults (0.5 s at most, 3 s with no
# peer seen) miss the other trainers of rounds that last a few seconds
TRACKER_OPTS = {"min_refresh_period": 0.1, "default_refresh_period": 0.25, "max_refresh_period": 1.0}


def roll_call_key(run_name: str) -> str:
    return f"{run_name}_trainers"


def wait_for_trainers(dht: hivemind.DHT, run_name: str, count: int, timeout_s: float) -> int:
    """Announce this trainer under the run, wait until `count` trainers (this one included) have, then
    until the start time they all compute from the same announcements (so their first rounds line up).
    Returns how many trainers were seen. Raises CollaborationError after `timeout_s`."""
    key, subkey = roll_call_key(run_name), dht.peer_id.to_bytes()
    joined_at = get_dht_time()
    deadline, announced_until, last_seen = time.monotonic() + timeout_s, 0.0, -1
    while True:
        now = get_dht_time()
        if announced_until - now < ROLL_CALL_TTL_S / 2:
            dht.store(key, subkey=subkey, value=joined_at, expiration_time=now + ROLL_CALL_TTL_S)
            announced_until = now + ROLL_CALL_TTL_S
        found = dht.get(key, latest=True)
        entries = found.value if found is not None and isinstance(found.value, dict) else {}
        times = sorted(entry.value for entry in entries.values() if isinstance(getattr(entry, "value", None), float))
        if len(times) != last_seen:
            logger.info("run %s: %d of %d trainers here", run_name, len(times), count)
            last_seen = len(times)
        if len(times) >= count:
            time.sleep(max(0.0, times[count - 1] + START_DELAY_S - get_dht_time()))
            return len(times)
        if time.monotonic() > deadline:
            raise CollaborationError(f"run {run_name}: {len(times)} of {count} trainers joined within {timeout_s:.0f} s")
        time.sleep(POLL_S)


def wait_until_tracked(optimizer: hivemind.Optimizer, count: int, timeout_s: float) -> None:
    """After this trainer's first step of a new run: wait until hivemind's progress tracker lists `count`
    trainers. It lists a trainer only once that one reported samples; a trainer that reaches the first
    round's target while its tracker lists only itself takes the step alone ("Proceeding with local
    gradients") and the others average their round 0 with its round 1 (seen in a test, under load)."""
    deadline = time.monotonic() + timeout_s
    while optimizer.tracker.global_progress.num_peers < count and time.monotonic() < deadline:
        time.sleep(POLL_S)


def join_run(optimizer: hivemind.Optimizer, timeout_s: float) -> None:
    """A trainer joining a run that is already under way loads its state at the start of a round.

    hivemind would load the state at once and let this trainer accumulate gradients for the round
    in progress; if that round ends before this trainer reaches it (its group is already formed), the
    trainer finishes it one round late, averaged with the others' *next* round, and holds different
    values until hivemind notices and reloads (measured: three rounds). Waiting for the round in
    progress to end and loading the state then puts this trainer in the next round's group."""
    tracker = optimizer.tracker
    tracker.fetched_global_progress_this_epoch.wait(timeout_s)
    if tracker.global_epoch <= optimizer.local_epoch:
        return  # a new run, or one this trainer is not behind
    current, deadline = tracker.global_epoch, time.monotonic() + timeout_s
    logger.info("run under way at round %d: joining at the start of the next one", current)
    while tracker.global_epoch <= current and time.monotonic() < deadline:
        time.sleep(POLL_S)
    optimizer.load_state_from_peers()
    logger.info("loaded the run's state: round %d", optimizer.local_epoch)


def say_goodbye(optimizer: hivemind.Optimizer, dht: hivemind.DHT, timeout_s: float = 5.0) -> None:
    """Leave the run, then shut the optimizer down. The tracker's goodbye is stored in the background;
    if the DHT stops before it lands, the others wait for this trainer in their next round (up to the
    record's 60 s life plus a round's timeout). So wait until the run's progress no longer lists us,
    before the averagers stop (the DHT's pipe breaks in hivemind 1.1.12 once they have)."""
    optimizer.tracker.shutdown()
    me, deadline = dht.peer_id.to_bytes(), time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = dht.get(optimizer.tracker.training_progress_key, latest=True)
        entries = found.value if found is not None and isinstance(found.value, dict) else {}
        if not any(isinstance(entry.value, dict) and entry.value.get("peer_id") == me for entry in entries.values()):
            break
        time.sleep(POLL_S)
    else:
        logger.warning("the run still lists this trainer after %.0f s; the others may wait for it once", timeout_s)
    optimizer.shutdown()


def make_optimizer(
    dht: hivemind.DHT, run_name: str, params, *, learning_rate: float, batch_size: int, target_batch_size: int,
    matchmaking_time: float, verbose: bool,
) -> hivemind.Optimizer:
    """AdamW whose gradients are averaged with every trainer of `run_name` once they have together
    processed `target_batch_size` examples; all trainers then take the same step."""
    return hivemind.Optimizer(
        dht=dht, run_id=run_name, params=params,
        optimizer=functools.partial(torch.optim.AdamW, lr=learning_rate),
        batch_size_per_step=batch_size, target_batch_size=target_batch_size,
        matchmaking_time=matchmaking_time, averaging_timeout=max(15.0, 5 * matchmaking_time),
        # a part of the all-reduce that does not arrive within this is averaged without that trainer,
        # and the trainers end the round with different values; hivemind's default (matchmaking_time)
        # was missed on a busy 2-core machine (measured: 50% of a round's parts dropped)
        next_chunk_timeout=max(10.0, 2 * matchmaking_time),
        # as hivemind's matchmaking asks: request_timeout well under matchmaking_time
        averager_opts={"request_timeout": min(3.0, matchmaking_time / 2)},
        tracker_opts=TRACKER_OPTS,
        # parameters are averaged within the round's step, not in the background: a background round's
        # result lands at a moment that differs between trainers, so they would end a round with different
        # values (measured under load: rounds 16-17 of 23 differed, the next averaging re-synced them)
        delay_state_averaging=False,
        verbose=verbose,
    )
