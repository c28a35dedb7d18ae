"""A peer's lifecycle: join the DHT, load its blocks, serve them, announce them, leave cleanly.

It wires the pieces together (models, BlockStack, BlockServicer, DHT announcements) and owns every
background task and child process it starts; `run()` returns only after all of them stopped.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time

import torch
from tqdm.auto import tqdm

import swarm
from peers.handler import BlockServicer
from swarm import models, network, protocol
from swarm.blocks import BlockStack
from swarm.config import PeerConfig
from swarm.errors import ConfigError
from swarm.messages import PeerInfo
from swarm.records import PROTOCOL_VERSION, PeerRecord, PeerState

logger = logging.getLogger(__name__)

LEAVE_TIMEOUT_S = 5.0  # the offline announcement must not hold up a shutdown


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    return getattr(torch, name)


class Peer:
    def __init__(self, config: PeerConfig):
        self.config = config
        self.source = models.resolve_model(config.model)
        self.model_config = models.load_config(self.source)
        self.dht_prefix = config.dht_prefix or self.source.dht_prefix
        self.start_block, self.end_block = config.block_range()
        num_blocks = self.model_config.num_hidden_layers
        if self.end_block > num_blocks:
            raise ConfigError(
                f"--blocks {config.blocks}: {config.model} has {num_blocks} blocks (valid ranges lie within 0:{num_blocks})"
            )
        config.network.require_peers_or_new_swarm()
        self.dtype = resolve_dtype(config.dtype, config.device)
        self.dtype_name = str(self.dtype).removeprefix("torch.")
        self.dht = None
        self.servicer: BlockServicer | None = None
        self.state = PeerState.JOINING
        self.peer_id: str | None = None
        self.p2p = None
        # every torch call of the peer runs on this one thread: a second thread would start a second
        # OpenMP pool, whose spinning workers slow the first one down (measured: ~10-20% per step)
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set, then leave: announce offline, remove handlers, stop the DHT.

        A compute step still running at that moment is abandoned with the process."""
        loop = asyncio.get_running_loop()
        self.dht = await loop.run_in_executor(None, network.start_node, self.config.network)
        try:
            print(f"swarm: listening on {' '.join(network.visible_maddrs(self.dht))}", flush=True)
            self.peer_id = self.dht.peer_id.to_base58()
            await self._announce()
            stack = await loop.run_in_executor(self.executor, self._load_blocks)
            self.p2p = await self.dht.replicate_p2p()
            self.servicer = BlockServicer(
                stack,
                self._info(),
                cache_tokens=self.config.cache_tokens,
                session_idle_timeout_s=self.config.session_idle_timeout_s,
                cache_wait_s=self.config.cache_wait_s,
                executor=self.executor,
                p2p=self.p2p,
            )
            await protocol.register(self.p2p, self.servicer, self.dht_prefix)
            self.state = PeerState.ONLINE
            await self._announce()
            logger.info("serving %s blocks %d:%d as %s", self.config.model, self.start_block, self.end_block, self.peer_id)
            print(f"swarm: ready, serving {self.config.model} blocks {self.start_block}:{self.end_block}", flush=True)
            await self._announce_until(stop)
        finally:
            await self._leave()

    def _load_blocks(self) -> BlockStack:
        if self.config.num_threads:
            torch.set_num_threads(self.config.num_threads)
        started = time.perf_counter()
        layers = [
            models.load_block(self.source, self.model_config, index, dtype=self.dtype, device=self.config.device)
            for index in tqdm(range(self.start_block, self.end_block), desc="loading blocks", unit="block", leave=False)
        ]
        rotary = models.load_rotary(self.model_config, device=self.config.device)
        logger.info("loaded blocks %d:%d (%s) in %.1f s", self.start_block, self.end_block, self.dtype, time.perf_counter() - started)
        return BlockStack(self.model_config, layers, self.start_block, rotary)

    def _info(self) -> PeerInfo:
        return PeerInfo(
            protocol_version=PROTOCOL_VERSION,
            model=self.config.model,
            dht_prefix=self.dht_prefix,
            start_block=self.start_block,
            end_block=self.end_block,
            dtype=self.dtype_name,
            version=swarm.__version__,
            max_batch_size=self.config.max_batch_size,
            max_length=self.config.max_length,
        )

    def _record(self) -> PeerRecord:
        return PeerRecord(
            protocol_version=PROTOCOL_VERSION,
            state=self.state,
            model=self.config.model,
            start_block=self.start_block,
            end_block=self.end_block,
            throughput=float(self.config.throughput),
            cache_tokens_left=self.servicer.cache.tokens_left if self.servicer else self.config.cache_tokens,
            dtype=self.dtype_name,
            version=swarm.__version__,
            public_name=self.config.public_name,
        )

    async def _announce(self, ttl_s: float | None = None, timeout_s: float | None = None) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._store_record, ttl_s, timeout_s)

    def _store_record(self, ttl_s: float | None, timeout_s: float | None) -> None:
        network.announce(
            self.dht,
            dht_prefix=self.dht_prefix,
            peer_id=self.peer_id,
            record=self._record(),
            num_blocks=self.model_config.num_hidden_layers,
            ttl_s=ttl_s or self.config.announce_period_s * self.config.record_ttl_periods,
            timeout_s=timeout_s or self.config.announce_period_s * self.config.record_ttl_periods,
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

    async def _leave(self) -> None:
        """Announce offline, stop taking requests, then stop the compute thread and the DHT process."""
        if self.dht is None:
            return
        try:
            if self.peer_id is not None:
                self.state = PeerState.OFFLINE
                await self._announce(ttl_s=self.config.announce_period_s, timeout_s=LEAVE_TIMEOUT_S)
            if self.p2p is not None:
                await protocol.unregister(self.p2p, self.dht_prefix)
                await self.p2p.shutdown()
        except Exception:
            logger.warning("could not leave cleanly (the DHT process may be gone already)", exc_info=True)
        finally:
            self.executor.shutdown(wait=False, cancel_futures=True)
            network.stop_dht(self.dht)
            self.dht = None
            logger.info("left the swarm")
