"""A peer's lifecycle: join the DHT, choose and load its blocks, serve and announce them, move
when the swarm needs it elsewhere, leave cleanly.

It wires the pieces together (models, BlockStack, BlockServicer, DHT announcements, placement) and
owns every background task and child process it starts; `run()` returns only after all of them
stopped. Where blocks should go is decided by `swarm.balance`; this module acts on it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import random
import time

import torch
from tqdm.auto import tqdm

import swarm
from peers import nat, pings, placement, sizing
from peers.cache import CacheBudget
from peers.handler import BlockServicer, ServicerConfig
from peers.pushes import PushChannels
from peers.scheduler import Scheduler
from peers.serving import Serving
from peers.sessions import PUSH_TIMEOUT_S, SessionEnv
from swarm import balance, models, network, protocol, quantization, reachability
from swarm.blocks import BlockStack
from swarm.config import PeerConfig
from swarm.errors import ConfigError
from swarm.identity import Identity
from swarm.lora import AdapterId, LoraWeights, adapter_name, read_peft_adapter
from swarm.swarm_key import SwarmKey, make_proof
from swarm.messages import PeerInfo
from swarm.records import PROTOCOL_VERSION, PeerRecord, PeerState

logger = logging.getLogger(__name__)

LEAVE_TIMEOUT_S = 5.0  # the offline announcement must not hold up a shutdown
GAP_PATIENCE_PERIODS = 3  # a peer chosen to cover a gap that is not joining there within this many gap checks is passed over


class Peer:
    def __init__(self, config: PeerConfig):
        self.config = config
        self.source = models.resolve_model(config.model)
        self.model_config = models.load_config(self.source)
        self.dht_prefix = config.dht_prefix or self.source.dht_prefix
        self.num_blocks = self.model_config.num_hidden_layers
        spec = config.blocks_spec()
        self.fixed_range = spec if isinstance(spec, tuple) else None
        if self.fixed_range and self.fixed_range[1] > self.num_blocks:
            raise ConfigError(
                f"--blocks {config.blocks}: {config.model} has {self.num_blocks} blocks (valid ranges lie within 0:{self.num_blocks})"
            )
        if isinstance(spec, int) and spec > self.num_blocks:
            raise ConfigError(f"--blocks {spec}: {config.model} has {self.num_blocks} blocks")
        config.network.require_peers_or_new_swarm()
        sizing.check_device(config.device)
        self.dtype = sizing.resolve_dtype(config.dtype, config.device)
        self.dtype_name = str(self.dtype).removeprefix("torch.")
        quantization.check_quantization(config.quant, config.device)  # before anything big is loaded
        self.block_count = spec if isinstance(spec, int) else None  # "auto": chosen from memory in run()
        self._chosen = self.fixed_range or (0, 0)  # the blocks to load; once serving, they are the stack's
        self.moving_to: tuple[int, int] | None = None  # a range being loaded, announced as joining
        self.throughput = 0.0
        self.next_pings: dict[str, float] = {}  # round trips to the peers serving the block after ours
        self.load = 0.0  # share of the last announce period the compute thread was busy
        self.using_relay = False  # others reach us only through a relay (we are behind NAT)
        self._load_mark = (time.monotonic(), 0.0)
        self.dht = None
        self.servicer: BlockServicer | None = None  # serving: what it serves is `self.servicer.serving`
        self.state = PeerState.JOINING
        self.peer_id: str | None = None
        self.p2p = None
        self.rng = random.Random()
        # every torch call of the peer runs on this one thread: a second thread would start a second
        # OpenMP pool, whose spinning workers slow the first one down (measured: ~10-20% per step)
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")
        self.swarm_key = SwarmKey.load(config.network.swarm_key_path)  # None: a public swarm
        self.adapters = self._load_adapters(config.adapters)
        self.identity = Identity.load(config.network.identity_path)  # its key signs our records

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set, then leave: announce offline, let running steps finish (up to
        shutdown_grace_s), remove handlers, stop the DHT."""
        loop = asyncio.get_running_loop()
        self.dht = await loop.run_in_executor(None, network.start_node, self.config.network, self.identity)
        try:
            self.dht, identity = await nat.become_reachable(
                self.dht, self.config.network, lambda: Identity.load(self.config.network.identity_path), await self._checkers()
            )
            if identity is not None:  # restarted behind relays, maybe with a new (temporary) key
                self.identity, self.using_relay = identity, True
            await reachability.serve(await self.dht.replicate_p2p())
            maddrs = network.visible_maddrs(self.dht, latest=True)
            if self.using_relay:  # only the relayed ones are of use to others
                maddrs = [maddr for maddr in maddrs if "/p2p-circuit" in maddr]
            print(f"swarm: listening on {' '.join(maddrs)}", flush=True)
            self.peer_id = self.dht.peer_id.to_base58()
            assert self.peer_id == self.identity.peer_id, "the p2p daemon did not take our identity"
            self.throughput = await loop.run_in_executor(self.executor, self._measure_throughput)
            if self.fixed_range is None:
                await self._choose_blocks(stop)
                if stop.is_set():
                    return
            await self._announce()
            stack = await loop.run_in_executor(self.executor, self._load_blocks, *self._chosen, None)
            self.p2p = await self.dht.replicate_p2p()
            self.servicer = self._servicer(stack)
            await protocol.register(self.p2p, self.servicer, self.dht_prefix)
            self.state = PeerState.ONLINE
            await self._announce()
            logger.info("serving %s blocks %d:%d as %s", self.config.model, *self.blocks, self.peer_id)
            print(f"swarm: ready, serving {self.config.model} blocks {self.blocks[0]}:{self.blocks[1]}", flush=True)
            tasks = [asyncio.create_task(self._announce_until(stop))]
            if self.fixed_range is None:
                tasks.append(asyncio.create_task(self._rebalance_until(stop)))
            try:
                await asyncio.gather(*tasks)
            finally:
                for task in tasks:
                    task.cancel()
        finally:
            await self._leave()

    @property
    def blocks(self) -> tuple[int, int]:
        """The blocks this peer serves (its stack's), or, before it serves, those it chose to load."""
        return self.servicer.serving.blocks if self.servicer is not None else self._chosen

    def _servicer(self, stack: BlockStack) -> BlockServicer:
        """The serving pipeline over `stack`: what it serves, the compute scheduler, its sessions' shared state."""
        serving = Serving(stack, self._info(stack.start_block, stack.end_block), self.adapters)
        p2p, dht_prefix = self.p2p, self.dht_prefix
        env = SessionEnv(
            serving=serving,
            scheduler=Scheduler(self.executor, self.config.batch_steps),
            cache=self._cache_budget(),
            idle_timeout_s=self.config.session_idle_timeout_s,
            peer_id=self.peer_id or "",
            swarm_key=self.swarm_key,
            new_pusher=lambda: PushChannels(p2p, dht_prefix, PUSH_TIMEOUT_S),
        )
        return BlockServicer(env, ServicerConfig(idle_timeout_s=self.config.session_idle_timeout_s, cache_wait_s=self.config.cache_wait_s))

    def _load_adapters(self, folders: list[str]) -> dict[AdapterId, LoraWeights]:
        """(name: the folder's name, digest) -> LoRA weights of every block; the peer applies those of its blocks."""
        adapters = {}
        for folder in folders:
            name = adapter_name(folder)
            if not 0 < len(name) <= 128 or any(served.name == name for served in adapters):
                raise ConfigError(f"--adapters: {folder}: names are folder names, unique and of 1 to 128 characters")
            settings, weights = read_peft_adapter(folder, self.model_config)
            adapter = AdapterId(name, settings["digest"])
            adapters[adapter] = weights.to(self.dtype)
            logger.info("serving adapter %s (%s)", adapter, ", ".join(settings["targets"]))
        return adapters

    def _cache_budget(self) -> CacheBudget:
        """KV-cache bytes (--cache-gb, or --cache-tokens over the served blocks) and session slots."""
        per_token = sizing.kv_bytes_per_token(self.model_config, self.dtype) * (self.blocks[1] - self.blocks[0])
        total = int(self.config.cache_gb * 2**30) if self.config.cache_gb else self.config.cache_tokens * per_token
        budget = CacheBudget(total, per_token, self.config.max_sessions)
        logger.info(
            "KV cache: %.1f MiB (%d tokens over %d blocks), up to %d sessions at once",
            total / 2**20, budget.total_tokens, self.blocks[1] - self.blocks[0], self.config.max_sessions,
        )
        return budget

    # ---- choosing blocks -----------------------------------------------------------------------
    def _measure_throughput(self) -> float:
        if self.config.num_threads:
            torch.set_num_threads(self.config.num_threads)
        return sizing.block_throughput(
            self.source, self.model_config, device=self.config.device, dtype=self.dtype, quantization=self.config.quant,
            mode=self.config.throughput,
        )

    async def _choose_blocks(self, stop: asyncio.Event) -> None:
        """How many blocks (from memory, for 'auto') and where (the weakest window of the swarm)."""
        if self.block_count is None:
            self.block_count, explanation = placement.auto_block_count(
                self.model_config, dtype=self.dtype, quantization=self.config.quant, device=self.config.device,
                cache_tokens=self.config.cache_tokens,
                max_length=self.config.max_length, max_memory_gb=self.config.max_memory_gb, cache_gb=self.config.cache_gb,
            )
        else:
            explanation = f"--blocks {self.block_count}"
        jitter = self.rng.uniform(0, self.config.join_jitter_s)  # peers started together read different states
        try:
            async with asyncio.timeout(jitter):
                await stop.wait()
        except TimeoutError:
            pass
        spans = await placement.read_swarm(self.dht, self.dht_prefix, self.num_blocks)
        spans.pop(self.peer_id, None)  # our own record from an earlier life, if any
        throughputs = balance.block_throughputs(spans.values(), self.num_blocks)
        start = balance.choose_start(throughputs, self.block_count, self.rng)
        self._chosen = (start, start + self.block_count)
        logger.info(
            "taking blocks %d:%d (%s); %s", *self.blocks, explanation,
            placement.describe_choice(throughputs, start, self.block_count),
        )

    # ---- moving --------------------------------------------------------------------------------
    async def _rebalance_until(self, stop: asyncio.Event) -> None:
        """Read the swarm every gap_check_period_s (jittered): a gap is covered at once, by the peer
        `balance.plan_gap_cover` chooses; every rebalance_period_s (jittered), `plan_move` may move us."""
        loop = asyncio.get_running_loop()
        watch = balance.GapWatch(patience_s=GAP_PATIENCE_PERIODS * self.config.gap_check_period_s)
        rebalance_at_s = loop.time() + self._jittered(self.config.rebalance_period_s)
        while not stop.is_set():
            wait_s = min(self._jittered(self.config.gap_check_period_s), max(0.0, rebalance_at_s - loop.time()))
            try:
                async with asyncio.timeout(wait_s):
                    await stop.wait()
            except TimeoutError:
                pass
            if stop.is_set():
                return
            rebalance_due = loop.time() >= rebalance_at_s
            if rebalance_due:
                rebalance_at_s = loop.time() + self._jittered(self.config.rebalance_period_s)
            try:
                await self._maybe_move(watch, rebalance_due)
            except Exception as exc:  # the DHT may be slow, or loading failed: keep serving where we are
                logger.warning("rebalancing failed: %s: %s", type(exc).__name__, exc)
                self.moving_to = None

    def _jittered(self, period_s: float) -> float:
        return period_s * self.rng.uniform(0.5, 1.5)

    async def _maybe_move(self, watch: balance.GapWatch, rebalance_due: bool) -> None:
        """Cover a gap if we are the one chosen for it; else, if `rebalance_due`, move if `plan_move` says so."""
        spans = await placement.read_swarm(self.dht, self.dht_prefix, self.num_blocks)
        if self.peer_id not in spans:  # the DHT lookup missed even our own record: too partial to act on
            log = logger.info if rebalance_due else logger.debug
            log("the swarm read back without this peer's own record (a DHT node is slow?): not moving now")
            return
        me = balance.Span(self.peer_id, *self.blocks, self.throughput)
        spans[self.peer_id] = me  # as we are now, whatever the DHT still holds
        covers = watch.plan(spans, self.num_blocks, time.monotonic())
        mine = next((cover for cover in covers if cover.peer_id == self.peer_id), None)
        if mine is not None:
            await self._move(mine.start, mine.end, mine.reason)
            return
        if watch.chosen_since_s or not rebalance_due:  # a gap is someone else's to cover: no other move now
            return
        move = balance.plan_move(spans, self.num_blocks, self.peer_id, threshold=self.config.balance_threshold, rng=self.rng)
        if move.start is None:
            logger.debug("staying on blocks %d:%d: %s", *self.blocks, move.reason)
            return
        await self._move(move.start, move.start + me.length, move.reason)

    async def _move(self, start: int, end: int, reason: str) -> None:
        """Warm handoff: announce and load the new blocks while serving the old ones, switch, then
        announce the old ones offline. Sessions on the old blocks finish within handoff_grace_s."""
        old_start, old_end = self.blocks
        logger.info("moving from blocks %d:%d to %d:%d: %s", old_start, old_end, start, end, reason)
        self.moving_to = (start, end)
        await self._announce()
        loop = asyncio.get_running_loop()
        stack = await loop.run_in_executor(self.executor, self._load_blocks, start, end, self.servicer.serving.stack)
        self.servicer.serving.switch(stack, self.config.handoff_grace_s)
        self.moving_to = None
        await self._announce()
        left = set(range(old_start, old_end)) - set(range(start, end))
        if left:
            await self._announce_record(self._record(PeerState.OFFLINE, old_start, old_end), keys_of=(min(left), max(left) + 1))
        logger.info("now serving blocks %d:%d", start, end)
        print(f"swarm: moved, serving {self.config.model} blocks {start}:{end}", flush=True)

    def _load_blocks(self, start: int, end: int, reuse: BlockStack | None) -> BlockStack:
        """Blocks start:end; those `reuse` holds already are shared, not loaded again."""
        if self.config.num_threads:
            torch.set_num_threads(self.config.num_threads)
        started = time.perf_counter()
        layers = []
        for index in tqdm(range(start, end), desc="loading blocks", unit="block", leave=False):
            if reuse is not None and reuse.start_block <= index < reuse.end_block:
                layers.append(reuse.layers[index - reuse.start_block])
            else:
                layers.append(models.load_block(
                    self.source, self.model_config, index, dtype=self.dtype, device=self.config.device, quantization=self.config.quant
                ))
                sizing.trim_heap()  # the float weights it was read as
        rotary = reuse.rotary if reuse is not None else models.load_rotary(self.model_config, device=self.config.device)
        logger.info("loaded blocks %d:%d (%s, quantization %s) in %.1f s", start, end, self.dtype_name, self.config.quant,
                    time.perf_counter() - started)
        return BlockStack(self.model_config, layers, start, rotary)

    # ---- announcing ----------------------------------------------------------------------------
    def _info(self, start: int, end: int) -> PeerInfo:
        return PeerInfo(
            protocol_version=PROTOCOL_VERSION,
            model=models.announced_name(self.source),
            dht_prefix=self.dht_prefix,
            start_block=start,
            end_block=end,
            dtype=self.dtype_name,
            quantization=self.config.quant,
            version=swarm.__version__,
            max_batch_size=self.config.max_batch_size,
            max_length=self.config.max_length,
        )

    def _record(self, state: PeerState, start: int, end: int) -> PeerRecord:
        return PeerRecord(
            protocol_version=PROTOCOL_VERSION,
            state=state,
            model=models.announced_name(self.source),
            start_block=start,
            end_block=end,
            throughput=float(self.throughput),
            cache_tokens_left=self.servicer.cache.tokens_left if self.servicer else self.config.cache_tokens,
            dtype=self.dtype_name,
            quantization=self.config.quant,
            version=swarm.__version__,
            public_name=self.config.public_name,
            adapters=tuple(sorted(adapter.name for adapter in self.adapters)),
            adapter_digests={adapter.name: adapter.digest for adapter in self.adapters},
            next_pings=self.next_pings if (start, end) == self.blocks else {},
            load=self.load,
            using_relay=self.using_relay,
        )

    async def _announce(self, timeout_s: float | None = None) -> None:
        """Our current record (and, while moving, a joining record for where we are going)."""
        self._measure_load()
        await self._announce_record(self._record(self.state, *self.blocks), timeout_s=timeout_s)
        if self.moving_to is not None:
            await self._announce_record(self._record(PeerState.JOINING, *self.moving_to), timeout_s=timeout_s)

    async def _announce_record(self, record: PeerRecord, *, keys_of: tuple[int, int] | None = None, timeout_s: float | None = None) -> None:
        # every record lives as long: the DHT keeps the value with the latest expiration, so a shorter-lived
        # offline record would be ignored while the online one it replaces is still alive
        ttl_s = self.config.announce_period_s * self.config.record_ttl_periods
        await asyncio.get_running_loop().run_in_executor(
            None,
            functools.partial(
                network.announce, self.dht, dht_prefix=self.dht_prefix, identity=self.identity, record=record,
                num_blocks=self.num_blocks, ttl_s=ttl_s, timeout_s=timeout_s or ttl_s, keys_of=keys_of,
            ),
        )

    async def _announce_until(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                async with asyncio.timeout(self.config.announce_period_s):
                    await stop.wait()
            except TimeoutError:
                pass
            if stop.is_set():
                break
            try:
                await self._announce()
            except Exception as exc:  # the DHT may be slow or partitioned: keep serving, try next period
                logger.warning("announcement failed: %s: %s", type(exc).__name__, exc)
            try:  # for the next announcement; never long enough to let our records expire
                async with asyncio.timeout(self.config.announce_period_s / 2):
                    await self._measure_next_pings()
            except Exception as exc:  # a slow DHT or a gone peer: announce what we had
                logger.debug("measuring round trips to the next peers failed: %s: %s", type(exc).__name__, exc)

    async def _checkers(self) -> list[str]:
        """Peers that could check whether we can be dialed, besides our initial peers (a few, from the DHT)."""
        if self.config.network.is_loopback_only() or self.config.network.reachability != "auto":
            return []
        try:
            return list(await placement.read_swarm(self.dht, self.dht_prefix, self.num_blocks))[:8]
        except Exception as exc:  # a slow DHT: the initial peers will do
            logger.debug("could not read the swarm for reachability checkers: %s", exc)
            return []

    def _measure_load(self) -> None:
        if self.servicer is None:
            return
        now, busy_s = time.monotonic(), self.servicer.scheduler.busy_s
        then, busy_then = self._load_mark
        if now - then > 0:
            self.load = round(min(1.0, max(0.0, (busy_s - busy_then) / (now - then))), 4)
        self._load_mark = (now, busy_s)

    async def _measure_next_pings(self) -> None:
        """Round trips to the peers serving the block after ours, for our record (clients route by them)."""
        end = self.blocks[1]
        if self.p2p is None or not 0 < end < self.num_blocks:
            self.next_pings = {}
            return
        spans = await placement.read_swarm(self.dht, self.dht_prefix, self.num_blocks)
        targets = pings.next_hops(spans, end, self.peer_id)
        self.next_pings = await pings.measure(
            self.p2p, targets, self.dht_prefix, lambda target: make_proof(self.swarm_key, self.peer_id, target)
        )

    # ---- leaving -------------------------------------------------------------------------------
    async def _leave(self) -> None:
        """Announce offline at once, refuse new steps, let running ones finish (shutdown_grace_s),
        then stop taking requests, the step batcher, the compute thread and the DHT process."""
        if self.dht is None:
            return
        try:
            if self.peer_id is not None and self.blocks[1] > self.blocks[0]:
                self.state = PeerState.OFFLINE
                await self._announce_record(self._record(self.state, *self.blocks), timeout_s=LEAVE_TIMEOUT_S)
                if self.moving_to is not None:  # a move cut short: nobody should count on it
                    await self._announce_record(self._record(self.state, *self.moving_to), timeout_s=LEAVE_TIMEOUT_S)
            if self.servicer is not None:
                self.servicer.serving.closing = True
                if not await self.servicer.scheduler.wait_idle(self.config.shutdown_grace_s):
                    logger.warning("a step was still running after %.1f s: leaving anyway", self.config.shutdown_grace_s)
            if self.p2p is not None:
                await protocol.unregister(self.p2p, self.dht_prefix)
                await self.p2p.shutdown()
        except Exception:
            logger.warning("could not leave cleanly (the DHT process may be gone already)", exc_info=True)
        finally:
            if self.servicer is not None:
                await self.servicer.close()  # its batcher's worker task
            self.executor.shutdown(wait=False, cancel_futures=True)
            network.stop_dht(self.dht)
            self.dht = None
            logger.info("left the swarm")
