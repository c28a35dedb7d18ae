"""`python -m swarm.plan`: how well the swarm serves a model's blocks, and where a new peer would go.

Joins the DHT as a client, reads every block's records (invalid ones are skipped with a warning)
and prints, per block, the peers serving it, their summed throughput and the gaps; then which
blocks a new peer with the given block count and throughput would take (`swarm.balance`, the
same function a joining peer runs). Reads only the DHT: it needs no model weights. Its settings are a
PlanConfig (flags, `--config FILE`, SWARM_PLAN_* environment variables; see `swarm.settings`).
"""

from __future__ import annotations

import logging
import sys

from swarm import balance, coverage, network, settings
from swarm.cli import fail, setup_logging
from swarm.config import PlanConfig
from swarm.errors import ConfigError, SwarmError
from swarm.records import ModelRecord, parse_models, parse_peer_records

logger = logging.getLogger(__name__)


def announced_models(dht) -> dict[str, ModelRecord]:
    return parse_models(network.fetch_models(dht))


def pick_model(models: dict[str, ModelRecord], wanted: str | None) -> tuple[str, ModelRecord]:
    if not models:
        raise ConfigError("no model is announced in this swarm (no peer has joined it yet?)")
    if wanted is None:
        if len(models) > 1:
            raise ConfigError(f"the swarm serves several models, pick one with --model: {', '.join(sorted(models))}")
        return next(iter(models.items()))
    for prefix, record in models.items():
        if wanted in (prefix, record.model):
            return prefix, record
    raise ConfigError(f"model {wanted!r} is not announced; the swarm serves: {', '.join(sorted(models))}")


def report(prefix: str, model: ModelRecord, spans: dict[str, coverage.Span], new_blocks: int, new_throughput: float) -> list[str]:
    throughputs = balance.block_throughputs(spans.values(), model.num_blocks)
    missing = balance.gaps(throughputs)
    health = "healthy: every block is served" if not missing else f"BROKEN: blocks {_ranges(missing)} are not served"
    lines = [f"model {model.model} (DHT prefix {prefix}, {model.num_blocks} blocks, {len(spans)} peers): {health}"]
    lines += balance.describe_coverage(throughputs, spans.values())
    lines.append(f"total: {sum(span.throughput * span.length for span in spans.values()):.1f} block-tokens/s")
    new_blocks = min(new_blocks, model.num_blocks)
    starts = balance.weakest_windows(throughputs, new_blocks)  # the very candidates a joining peer picks from
    choice = f"blocks {starts[0]}:{starts[0] + new_blocks}"
    if len(starts) > 1:
        choice = f"one of blocks {', '.join(f'{start}:{start + new_blocks}' for start in starts)} (equally weak; picked at random)"
    lines.append(f"a new peer with {new_blocks} blocks at {new_throughput:g} tokens/s would take {choice}")
    return lines


def _ranges(indices: list[int]) -> str:
    groups, start = [], indices[0]
    for previous, current in zip(indices, [*indices[1:], None]):
        if current != previous + 1:
            groups.append(f"{start}:{previous + 1}")
            start = current
    return ", ".join(groups)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    dht = None
    try:
        config = settings.parse(PlanConfig, argv, prog="python -m swarm.plan", description=__doc__.split("\n\n")[0], env_prefix="SWARM_PLAN_")
        dht = network.start_node(config.network)
        prefix, model = pick_model(announced_models(dht), config.model)
        raw = network.fetch_block_records(dht, prefix, model.num_blocks)
        records = [parse_peer_records(entry, where=f"{prefix}.{index}") for index, entry in enumerate(raw)]
        new_blocks = config.blocks or max(1, model.num_blocks // 4)
        print("\n".join(report(prefix, model, coverage.peer_spans(records), new_blocks, config.throughput)))
        return 0
    except SwarmError as exc:
        return fail(str(exc))
    finally:
        if dht is not None:
            network.stop_dht(dht)


if __name__ == "__main__":
    sys.exit(main())
