"""Dynamic batching of predict requests: many callers, one forward pass, one model version.

As Triton's dynamic batcher: requests queue; one worker thread takes the oldest and,
while more requests are on their way (being read or parsed), waits up to ``wait_s``
for them to join, up to ``max_rows`` instances; then it runs one forward pass with
:meth:`ServedModel.predict` -- which reads the published model once, so every caller
of the batch is answered by the same version -- and hands each caller its own rows.

The event loop only enqueues and awaits: the model runs in the worker thread, so HTTP,
the probes and ``/metrics`` never wait behind a forward pass. The queue is bounded:
past ``max_queued`` waiting requests :meth:`DynamicBatcher.submit` raises
:class:`Overloaded` at once, for a quick 503 instead of a queue that grows without end.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Arrival", "BatchAnswer", "DynamicBatcher", "Overloaded"]

log = logging.getLogger(__name__)


class Overloaded(RuntimeError):
    """The predict queue is full: answer 503 and let the client retry."""


@dataclass(frozen=True)
class BatchAnswer:
    """One caller's share of a batched forward pass."""

    labels: np.ndarray  # (n,) int64
    probabilities: np.ndarray  # (n, classes) float32
    version: int
    batch_rows: int  # instances in the forward pass that answered (this caller's included)


@dataclass(eq=False)
class _Pending:
    x: np.ndarray
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


class DynamicBatcher:
    """Joins concurrent predict requests into forward passes on a worker thread.

    Args:
        predict: ``x (N, *shape) -> (labels, probabilities, version)``, e.g.
            :meth:`daemon.registry.ServedModel.predict`; called from the worker thread.
        max_rows: most instances per forward pass (a larger request runs alone).
        wait_s: longest wait for more requests once one is queued and others are coming.
        max_queued: most requests waiting; beyond it :meth:`submit` raises Overloaded.
        on_batch: called with the rows of each forward pass (a metric), worker thread.
    """

    def __init__(self, predict: Callable[[np.ndarray], Any], max_rows: int = 64,
                 wait_s: float = 0.0015, max_queued: int = 256,
                 on_batch: Callable[[int], None] | None = None) -> None:
        if max_rows < 1 or max_queued < 1 or wait_s < 0:
            raise ValueError(f"need max_rows >= 1, max_queued >= 1, wait_s >= 0; got "
                             f"{max_rows}, {max_queued}, {wait_s}")
        self._predict, self.max_rows, self.wait_s = predict, max_rows, wait_s
        self.max_queued, self._on_batch = max_queued, on_batch
        self._queue: collections.deque[_Pending] = collections.deque()
        self._cv = threading.Condition()
        self._arriving = 0  # requests being read or parsed: worth waiting for
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="gnpd-batcher", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        """Requests waiting for a forward pass."""
        return len(self._queue)

    def arrive(self) -> Arrival:
        """Say a request is being read or parsed: a forming batch may wait for it.

        Without it, a lone request would wait ``wait_s`` for company that never comes.
        Pass the token to :meth:`predict`, or :meth:`Arrival.leave` it on an error.
        """
        with self._cv:
            self._arriving += 1
        return Arrival(self)

    async def predict(self, x: np.ndarray, arrival: Arrival | None = None) -> BatchAnswer:
        """Queue ``x`` (N, *shape) and await its answer.

        ``arrival`` (from :meth:`arrive`) leaves in the same step as ``x`` is queued, so a
        forming batch never stops waiting between the two.

        Raises:
            Overloaded: ``max_queued`` requests are already waiting.
            Whatever the model raises (e.g. NoModelError), for every caller of the batch.
        """
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._cv:
            if arrival is not None:
                arrival._leave_locked()
            if self._stopping:
                raise Overloaded("the server is stopping")
            if len(self._queue) >= self.max_queued:
                raise Overloaded(f"{len(self._queue)} predict requests are already waiting "
                                 f"(GNPD_SERVE__MAX_QUEUED_REQUESTS={self.max_queued})")
            self._queue.append(_Pending(x, future, loop))
            self._cv.notify()
        return await future

    def stop(self, timeout: float = 5.0) -> None:
        """Answer what is queued, then end the worker thread."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._thread.join(timeout)

    # ---- worker thread -----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            batch = self._collect()
            if batch is None:
                return
            self._forward(batch)

    def _collect(self) -> list[_Pending] | None:
        """The next batch: the oldest request, and those that join it in time."""
        with self._cv:
            while not self._queue:
                if self._stopping:
                    return None
                self._cv.wait()
            batch = [self._queue.popleft()]
            rows = len(batch[0].x)
            deadline = time.monotonic() + self.wait_s
            while rows < self.max_rows:
                if self._queue:
                    if rows + len(self._queue[0].x) > self.max_rows:
                        break
                    batch.append(self._queue.popleft())
                    rows += len(batch[-1].x)
                    continue
                left = deadline - time.monotonic()
                if left <= 0 or self._arriving == 0 or self._stopping:
                    break  # nobody else is on the way: do not wait for nothing
                self._cv.wait(left)
            return batch

    def _forward(self, batch: list[_Pending]) -> None:
        try:
            x = batch[0].x if len(batch) == 1 else np.concatenate([p.x for p in batch])
            labels, probs, version = self._predict(x)
        except BaseException as e:  # noqa: BLE001 - every caller of the batch gets the error
            for p in batch:
                p.loop.call_soon_threadsafe(_fail, p.future, e)
            return
        if self._on_batch is not None:
            self._on_batch(len(x))
        start = 0
        for p in batch:
            n = len(p.x)
            answer = BatchAnswer(labels[start:start + n], probs[start:start + n], version,
                                 len(x))
            p.loop.call_soon_threadsafe(_resolve, p.future, answer)
            start += n


class Arrival:
    """A request on its way to :meth:`DynamicBatcher.predict` (see :meth:`~DynamicBatcher.arrive`)."""

    def __init__(self, batcher: DynamicBatcher) -> None:
        self._b, self._left = batcher, False

    def leave(self) -> None:
        """The request will not be queued after all (idempotent)."""
        with self._b._cv:
            self._leave_locked()

    def _leave_locked(self) -> None:
        if not self._left:
            self._left = True
            self._b._arriving -= 1
            self._b._cv.notify()


def _resolve(future: asyncio.Future, answer: BatchAnswer) -> None:
    if not future.done():  # the caller may have gone away (cancelled)
        future.set_result(answer)


def _fail(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
