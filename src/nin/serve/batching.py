"""Dynamic batching: concurrent requests' images gathered into one forward pass, off the event loop.

One worker task takes what is queued (up to ``max_batch`` images that share a key: requests asking
for different TTA never share a forward pass), runs it in the single inference
thread and answers each request's future.  While a batch runs, the next one gathers, so under load
batches fill by themselves.  The worker waits up to ``max_wait_ms`` for more images only while
other requests are known to be on their way (their body is being read or decoded): a lone client
pays no waiting time.  The queue is bounded: ``submit`` raises QueueFull instead of letting
latency and memory grow without limit; the server answers 503 with Retry-After.
"""
from __future__ import annotations

import asyncio
import collections
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np


class QueueFull(Exception):
    """More images are waiting than the queue holds."""


@dataclass
class BatchStats:
    """Counters the server exports as metrics (read by the /metrics collector)."""

    batches: int = 0
    images: int = 0
    rejected: int = 0
    sizes: collections.Counter = field(default_factory=collections.Counter)
    on_batch: Callable[[int, float], None] | None = None  # (batch size, seconds) after each batch


class Batcher:
    """``await batcher.predict(image, key)`` -> that image's row of ``infer(np.stack(images), key)``.

    ``infer`` takes uint8 N x C x H x W and the key (here: the TTA asked for, None for the model's own)
    and returns an N x K array; it runs in one thread
    (``self.executor``), which other compute (class maps) shares so they never compete for the cores.
    """

    def __init__(self, infer: Callable[[np.ndarray, object], np.ndarray], *, max_batch: int = 16,
                 max_wait_ms: float = 2.0, max_queue: int = 256) -> None:
        self.infer = infer
        self.max_batch = max(1, max_batch)
        self.max_wait = max(0.0, max_wait_ms) / 1000
        self.max_queue = max(1, max_queue)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="nin-infer")
        self.stats = BatchStats()
        self._queue: collections.deque[tuple[np.ndarray, object, asyncio.Future]] = collections.deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._stopping = False
        self.arriving = 0  # requests past the door whose image is not queued yet

    # --- lifecycle (the app's lifespan) ---
    def start(self) -> None:
        self._stopping = False
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._worker(), name="nin-batcher")

    async def stop(self) -> None:
        """Finish what is queued, then stop the worker and the inference thread."""
        self._stopping = True
        if self._task is not None:
            while self._queue:
                await asyncio.sleep(0.005)
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self.executor.shutdown(wait=True)

    # --- requests ---
    def expect(self) -> "_Arrival":
        """Context manager around reading and decoding a request: tells the worker one is coming."""
        return _Arrival(self)

    @property
    def running(self) -> bool:
        """Started and not stopping (/readyz)."""
        return self._task is not None and not self._stopping

    async def predict(self, image: np.ndarray, key: object = None) -> np.ndarray:
        if len(self._queue) >= self.max_queue:
            self.stats.rejected += 1
            raise QueueFull(f"{len(self._queue)} images are waiting (--max-queue {self.max_queue})")
        fut = asyncio.get_running_loop().create_future()
        self._queue.append((image, key, fut))
        self._wake.set()
        return await fut

    async def run(self, fn: Callable, *args):
        """Run other compute (class maps) in the inference thread, between batches."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    @property
    def queued(self) -> int:
        return len(self._queue)

    # --- the worker ---
    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
            deadline = loop.time() + self.max_wait
            while len(self._queue) < self.max_batch and self.arriving > 0 and loop.time() < deadline:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), deadline - loop.time())
                except asyncio.TimeoutError:
                    break
            key, batch = self._take()
            if not batch:
                continue
            start = time.perf_counter()
            try:
                out = await loop.run_in_executor(self.executor, self.infer, np.stack([x for x, _ in batch]), key)
            except Exception as e:  # a bug, not a bad request (images are checked before queuing)
                for _, f in batch:
                    if not f.done():
                        f.set_exception(e)
                continue
            seconds = time.perf_counter() - start
            for (_, f), row in zip(batch, out):
                if not f.done():
                    f.set_result(row)
            self.stats.batches += 1
            self.stats.images += len(batch)
            self.stats.sizes[len(batch)] += 1
            if self.stats.on_batch:
                self.stats.on_batch(len(batch), seconds)


    def _take(self) -> tuple[object, list[tuple[np.ndarray, asyncio.Future]]]:
        """The next batch: the oldest request's key and up to max_batch queued images with that key,
        in arrival order (the others keep their place); requests whose client went away are dropped."""
        if not self._queue:  # woken by a request that was refused before it queued
            return None, []
        key = self._queue[0][1]
        batch, rest = [], collections.deque()
        while self._queue:
            x, k, f = self._queue.popleft()
            if k != key or len(batch) == self.max_batch:
                rest.append((x, k, f))
            elif not f.cancelled():
                batch.append((x, f))
        self._queue = rest
        return key, batch


class _Arrival:
    def __init__(self, batcher: Batcher) -> None:
        self.batcher = batcher

    def __enter__(self) -> "_Arrival":
        self.batcher.arriving += 1
        return self

    def __exit__(self, *exc) -> None:
        self.batcher.arriving -= 1
        if self.batcher._wake is not None:
            self.batcher._wake.set()  # the worker may stop waiting for this one
