"""Who covers blocks nobody serves (swarm.balance.plan_gap_cover, GapWatch): pure decisions, no sockets."""

from __future__ import annotations

import itertools
import random

from swarm.balance import GapCover, GapWatch, Span, block_throughputs, gaps, plan_gap_cover
from swarm.records import PeerState


def spans(*items) -> dict[str, Span]:
    """items: (peer_id, start, end, throughput[, state])"""
    return {item[0]: Span(*item) for item in items}


def apply(state: dict[str, Span], covers: list[GapCover]) -> dict[str, Span]:
    moved = dict(state)
    for cover in covers:
        moved[cover.peer_id] = Span(cover.peer_id, cover.start, cover.end, state[cover.peer_id].throughput, PeerState.JOINING)
    return moved


def test_one_gap_gets_exactly_one_coverer_whatever_the_reading_order():
    # the peer on 0:4 died; b and c both serve 4:8: exactly one of them moves, the same one for every reader
    state = spans(("c", 4, 8, 1.0), ("b", 4, 8, 1.0))
    assert plan_gap_cover(state, 8) == [GapCover("b", 0, 4, "covers 4 blocks nobody serves")]
    for order in itertools.permutations(state.items()):
        assert plan_gap_cover(dict(order), 8) == plan_gap_cover(state, 8)
    assert gaps(block_throughputs(apply(state, plan_gap_cover(state, 8)).values(), 8)) == []


def test_the_peer_leaving_the_strongest_blocks_goes_then_the_smallest_id():
    state = spans(("a", 0, 2, 1.0), ("b", 0, 2, 1.0), ("y", 4, 6, 5.0), ("z", 4, 6, 5.0), ("w", 4, 6, 5.0))
    (cover,) = plan_gap_cover(state, 6)  # blocks 2:4 are missing; 4:6 keep 10 tokens/s without one of y, z, w
    assert (cover.peer_id, cover.start, cover.end) == ("w", 2, 4)


def test_the_move_covering_the_most_missing_blocks_wins():
    # blocks 4:8 missing; a (2 blocks) could cover 2 of them, b (4 blocks) all 4
    state = spans(("a", 0, 2, 9.0), ("b", 0, 4, 1.0), ("c", 0, 4, 1.0))
    (cover,) = plan_gap_cover(state, 8)
    assert (cover.peer_id, cover.start, cover.end) == ("b", 4, 8)


def test_two_gaps_get_two_coverers():
    # blocks 2:4 and 6:8 missing; four redundant peers of 2 blocks each
    state = spans(("a", 0, 2, 1.0), ("b", 0, 2, 1.0), ("c", 4, 6, 1.0), ("d", 4, 6, 1.0), ("e", 0, 2, 1.0))
    covers = plan_gap_cover(state, 8)
    assert len(covers) == 2 and len({cover.peer_id for cover in covers}) == 2
    assert sorted((cover.start, cover.end) for cover in covers) == [(2, 4), (6, 8)]
    assert gaps(block_throughputs(apply(state, covers).values(), 8)) == []


def test_the_second_choice_must_not_reopen_a_gap_the_first_left():
    # a and b serve 0:2; blocks 2:4 and 4:6 are missing: only one of a, b may go
    state = spans(("a", 0, 2, 1.0), ("b", 0, 2, 1.0))
    covers = plan_gap_cover(state, 6)
    assert covers == [GapCover("a", 2, 4, "covers 2 blocks nobody serves")]
    assert gaps(block_throughputs(apply(state, covers).values(), 6)) == [4, 5]


def test_a_peer_whose_leaving_opens_a_gap_is_never_chosen():
    state = spans(("a", 0, 2, 100.0), ("b", 2, 4, 1.0), ("c", 2, 4, 1.0))
    assert plan_gap_cover(state, 6) == [GapCover("b", 4, 6, "covers 2 blocks nobody serves")]
    alone = spans(("a", 0, 2, 1.0), ("b", 2, 4, 1.0))
    assert plan_gap_cover(alone, 6) == []  # nobody can go without opening another gap
    overlapping = spans(("a", 0, 3, 1.0), ("b", 2, 4, 1.0))  # b alone serves block 3
    assert plan_gap_cover(overlapping, 6) == []


def test_a_joining_peer_counts_as_cover_and_is_not_moved_again():
    state = spans(("a", 0, 4, 1.0), ("b", 4, 8, 1.0), ("c", 4, 8, 1.0))  # the same swarm as the live test
    covers = plan_gap_cover(state, 8)
    assert gaps(block_throughputs(state.values(), 8)) == [] and covers == []
    after_kill = spans(("b", 4, 8, 1.0), ("c", 4, 8, 1.0))
    (cover,) = plan_gap_cover(after_kill, 8)
    joining = apply(after_kill, [cover])  # the chosen one announced itself joining 0:4 before loading
    assert plan_gap_cover(joining, 8) == []  # nobody piles on
    newcomer = spans(("b", 4, 8, 1.0), ("c", 4, 8, 1.0), ("n", 0, 4, 1.0, PeerState.JOINING))
    assert plan_gap_cover(newcomer, 8) == []  # a newcomer loading the gap covers it too
    partial = spans(("b", 4, 8, 1.0), ("c", 4, 8, 1.0), ("n", 0, 2, 1.0, PeerState.JOINING))
    (cover,) = plan_gap_cover(partial, 8)
    assert cover.peer_id != "n" and (cover.start, cover.end) == (0, 4)  # the rest, 2:4, still needs one


def test_peers_passed_over_are_not_chosen():
    state = spans(("b", 4, 8, 1.0), ("c", 4, 8, 1.0))
    assert plan_gap_cover(state, 8, passed_over={"b"})[0].peer_id == "c"
    assert plan_gap_cover(state, 8, passed_over={"b", "c"}) == []


def test_the_choice_is_the_same_for_every_reader_on_random_swarms():
    rng = random.Random(0)
    for _ in range(200):
        items = []
        for index in range(rng.randint(1, 12)):
            start = rng.randrange(0, 10)
            items.append((f"p{index:02d}", start, rng.randint(start + 1, 10), round(rng.uniform(0.1, 3.0), 3)))
        state = spans(*items)
        covers = plan_gap_cover(state, 10)
        shuffled = list(state.items())
        rng.shuffle(shuffled)
        assert plan_gap_cover(dict(shuffled), 10) == covers
        assert len({cover.peer_id for cover in covers}) == len(covers)
        after = block_throughputs(apply(state, covers).values(), 10)
        assert len(gaps(after)) < len(gaps(block_throughputs(state.values(), 10))) or not covers
        assert set(gaps(after)) <= set(gaps(block_throughputs(state.values(), 10)))  # no move opened a gap


def test_a_chosen_peer_that_does_not_act_is_passed_over_after_the_patience():
    state = spans(("b", 4, 8, 1.0), ("c", 4, 8, 1.0))
    watch = GapWatch(patience_s=15.0)
    assert [cover.peer_id for cover in watch.plan(state, 8, now_s=100.0)] == ["b"]
    assert [cover.peer_id for cover in watch.plan(state, 8, now_s=114.0)] == ["b"]
    assert [cover.peer_id for cover in watch.plan(state, 8, now_s=116.0)] == ["c"]  # b never announced itself joining
    assert [cover.peer_id for cover in watch.plan(state, 8, now_s=120.0)] == ["c"]  # and b is not chosen back
    covered = {**state, "c": Span("c", 0, 4, 1.0, PeerState.JOINING)}
    assert watch.plan(covered, 8, now_s=121.0) == [] and not watch.passed_over  # no gap: everyone is a candidate again
    assert [cover.peer_id for cover in watch.plan(state, 8, now_s=200.0)] == ["b"]
