"""Block selection and rebalancing on hand-made swarm states (pure functions, no sockets)."""

from __future__ import annotations

import random

import pytest

from swarm.balance import Span, block_throughputs, choose_start, gaps, plan_move
from swarm.coverage import peer_spans
from swarm.records import PROTOCOL_VERSION, PeerRecord, PeerState


def spans(*items) -> dict[str, Span]:
    """items: (peer_id, start, end, throughput[, state])"""
    return {item[0]: Span(*item) for item in items}


def test_block_throughputs_sum_joining_and_online_peers():
    state = spans(("a", 0, 2, 1.0), ("b", 1, 3, 2.0, PeerState.JOINING))
    assert block_throughputs(state.values(), 4) == [1.0, 3.0, 2.0, 0.0]
    assert gaps(block_throughputs(state.values(), 4)) == [3]


def test_a_joining_peer_fills_the_gap_first():
    assert choose_start([5.0, 5.0, 0.0, 0.0, 5.0, 5.0], 2) == 2
    assert choose_start([5.0, 0.0, 5.0, 5.0, 0.0, 0.0], 3) == 3  # two missing blocks beat one
    assert choose_start([0.0] * 6, 6) == 0


def test_a_joining_peer_takes_the_weakest_window():
    assert choose_start([3.0, 3.0, 1.0, 2.0, 3.0, 3.0], 2) in (1, 2)
    assert choose_start([3.0, 3.0, 1.0, 1.5, 3.0, 3.0], 2) == 2


def test_a_window_goes_flush_with_a_gaps_edge_so_the_rest_stays_in_one_piece():
    for seed in range(20):
        rng = random.Random(seed)
        assert choose_start([0.0] * 6, 2, rng) in (0, 4)  # not 1:3, which would leave block 0 alone
        assert choose_start([1.0, 1.0, 0.0, 0.0, 0.0, 0.0], 2, rng) in (2, 4)
        assert choose_start([1.0, 1.0, 0.0, 0.0, 1.0, 1.0], 1, rng) in (2, 3)


def test_ties_are_broken_at_random():
    starts = {choose_start([1.0] * 8, 2, random.Random(seed)) for seed in range(50)}
    assert len(starts) > 3  # peers joining at once spread out instead of piling onto block 0


def test_window_must_fit():
    with pytest.raises(ValueError):
        choose_start([1.0, 1.0], 3)


def test_the_only_server_of_a_block_stays():
    state = spans(("a", 0, 2, 1.0), ("b", 2, 4, 1.0), ("c", 2, 4, 1.0))
    assert plan_move(state, 6, "a", threshold=0.1).start is None  # blocks 4:6 are missing, but a would open 0:2
    assert plan_move(state, 6, "c", threshold=0.1).start == 4  # c is redundant: it covers the gap


def test_a_redundant_peer_covers_a_gap_left_by_a_departure():
    state = spans(("a", 0, 2, 1.0), ("b", 0, 2, 1.0), ("d", 4, 6, 1.0))  # the peer on 2:4 left
    move = plan_move(state, 6, "b", threshold=0.1)
    assert move.start == 2 and "nobody serves" in move.reason


def test_no_move_below_the_threshold_and_no_move_back():
    state = spans(("a", 0, 2, 1.0), ("b", 0, 2, 1.0), ("c", 2, 4, 1.5))
    assert plan_move(state, 4, "b", threshold=0.1).start is None  # weakest 1.5 either way
    state = spans(("a", 0, 2, 1.0), ("b", 0, 2, 1.0), ("c", 2, 4, 1.0))
    assert plan_move(state, 4, "b", threshold=0.1).start is None  # 2/1 -> 1/2: the weakest stays 1
    uneven = spans(("a", 0, 2, 3.0), ("b", 0, 2, 3.0), ("c", 2, 4, 1.0))
    move = plan_move(uneven, 4, "b", threshold=0.1)
    assert move.start == 2  # weakest 1 -> 3
    moved = {**uneven, "b": Span("b", 2, 4, 3.0)}
    assert plan_move(moved, 4, "b", threshold=0.1).start is None  # and it does not come back


def test_joining_peers_count_where_they_are_going():
    online = PeerRecord(
        protocol_version=PROTOCOL_VERSION, state=PeerState.ONLINE, model="m", start_block=0, end_block=2,
        throughput=1.0, cache_tokens_left=1, dtype="float32", version="0",
    )
    joining = online.model_copy(update={"state": PeerState.JOINING, "start_block": 2, "end_block": 4})
    offline = online.model_copy(update={"state": PeerState.OFFLINE})
    records = [{"x": online, "y": offline}, {"x": online}, {"x": joining}, {"x": joining, "y": online}]
    result = peer_spans(records)
    assert result == {"x": Span("x", 2, 4, 1.0, PeerState.JOINING)}  # y's online record sits outside its range


def test_block_throughputs_leave_no_rounding_residue_on_a_gap():
    state = spans(("a", 0, 3, 0.1), ("b", 1, 4, 0.2), ("c", 2, 5, 0.3), ("d", 4, 6, 0.7), ("e", 9, 12, 1.0))
    throughputs = block_throughputs(state.values(), 10)
    assert gaps(throughputs) == [6, 7, 8] and throughputs[6:9] == [0.0, 0.0, 0.0]
    assert throughputs[2] == pytest.approx(0.6) and throughputs[9] == 1.0  # e's range past block 9 is cut off


def test_a_redundant_peer_evens_out_an_unbalanced_swarm():
    # 20 + 10 peers: one move lifts the weakest block 10 -> 11, under the 10% threshold, but the
    # weakest block is far below the even spread (15), so a peer from the crowded half moves
    crowded = [(f"c{index}", 0, 2, 1.0) for index in range(20)]
    sparse = [(f"s{index}", 2, 4, 1.0) for index in range(10)]
    state = spans(*crowded, *sparse)
    move = plan_move(state, 4, "c0", threshold=0.1)
    assert move.start == 2 and "touches" in move.reason
    moved = {**state, "c0": Span("c0", 2, 4, 1.0, PeerState.JOINING)}
    assert plan_move(moved, 4, "c0", threshold=0.1).start is None  # and it does not come back
    near_even = spans(*crowded[:16], *sparse, *[(f"t{index}", 2, 4, 1.0) for index in range(4)])
    assert plan_move(near_even, 4, "c0", threshold=0.1).start is None  # 16 vs 14: within 15% of the even spread


def test_a_move_must_leave_its_old_blocks_stronger_than_its_new_ones():
    # blocks 0:2 hold 115 (s 105 + x 10), 2:4 hold 100, 4:6 hold 300: unbalanced. x moving to 2:4
    # would lift the weakest block it touches 100 -> 105 but leave 0:2 (105) weaker than 2:4 (110)
    state = spans(
        ("s", 0, 2, 105.0),
        ("x", 0, 2, 10.0),
        *[(f"d{index}", 2, 4, 10.0) for index in range(10)],
        *[(f"r{index}", 4, 6, 10.0) for index in range(30)],
    )
    assert plan_move(state, 6, "x", threshold=0.1).start is None
    assert plan_move(state, 6, "r0", threshold=0.1).start == 2  # r0 leaves 290 behind: it goes


def test_plan_predicts_exactly_the_blocks_a_joining_peer_may_take():
    """`swarm.plan` and a joining peer (`peers.server.Peer._choose_blocks`) call the same placement function:
    on a state where the tie-break matters (a gap of four blocks, a peer of two), they agree."""
    import re

    from swarm.plan import report
    from swarm.records import ModelRecord

    state = spans(("a", 0, 2, 1.0), ("b", 6, 8, 1.0))  # blocks 2:6 unserved
    model = ModelRecord(model="m", num_blocks=8, protocol_version=PROTOCOL_VERSION)
    (line,) = [line for line in report("m", model, state, 2, 1.0) if "a new peer" in line]
    predicted = {int(start) for start in re.findall(r"(\d+):\d+", line.split("would take")[1])}
    throughputs = block_throughputs(state.values(), 8)
    taken = {choose_start(throughputs, 2, random.Random(seed)) for seed in range(200)}  # what Peer._choose_blocks runs
    assert predicted == taken == {2, 4}  # flush with the gap's edges, never 3:5 (which splits what is left)
