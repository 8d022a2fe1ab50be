"""Work that may lag the hot path a little, run beside it on its own thread.

The recs round (interaction -> profile -> candidates -> rank -> push) must not wait for work
whose result is needed only eventually: the ranker's learning (training groups, counts,
refits) and the `users` collection (only the fresh-item fan-out reads it). Each such job is a
`Backlog`: the event loop puts values in by key and never waits; a task hands them in batches
to a blocking function on the backlog's own thread. A newer value for a key replaces the
queued one and keeps its place and age, so a user saved ten times while the store was slow is
written once. How stale the job is (the age of its oldest queued value) is exported per task.

Each backlog starts a batch at most every `every_s`: on a small machine its thread competes
with the recs round for the interpreter and for Milvus, and a learner or saver that ran as
often as it could made the rounds slower, not faster (measured: docs/bench-stream-lite.json's
history in the README). Paced, the work per batch grows with the load, the number of calls
does not.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

from streams import metrics
from streams.backoff import Backoff

log = logging.getLogger("vlm4rec.streams")

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Backlog(Generic[K, V]):
    """Values queued by key, drained in order by `handle` on one thread of its own.

    `retry`: a batch whose `handle` raised is put back (values queued since for the same
    keys win) and tried again after a back-off; for work that can succeed on retry (a vector
    store that was down). Without it the batch is dropped with an error in the log: work that
    failed for what it is would fail again and stall everything queued behind it."""

    def __init__(
        self,
        task: str,
        handle: Callable[[Sequence[V]], None],
        retry: bool,
        every_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.task = task
        self.handle = handle
        self.retry = retry
        self.every_s = every_s
        self._clock = clock
        self._queued: OrderedDict[K, tuple[float, V]] = OrderedDict()  # key -> (queued at, value)
        self._ready = asyncio.Event()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=task)
        self.handled = 0  # values handed to a successful `handle`

    def put(self, key: K, value: V) -> None:
        """Queue (or replace) the value for `key`; never waits."""
        kept = self._queued.get(key)
        self._queued[key] = (self._clock() if kept is None else kept[0], value)
        self._ready.set()

    def __len__(self) -> int:
        return len(self._queued)

    def lag(self) -> float:
        """Seconds since the oldest queued value was put (0: caught up)."""
        if not self._queued:
            return 0.0
        return max(0.0, self._clock() - next(iter(self._queued.values()))[0])

    def report(self) -> None:
        metrics.BACKGROUND_LAG.labels(self.task).set(self.lag())

    async def run(self) -> None:
        """Drain for ever (a Faust task): every batch is everything queued when it starts."""
        backoff = Backoff()
        while True:
            await self._ready.wait()
            self._ready.clear()
            while self._queued:
                started = time.monotonic()
                taken, self._queued = self._queued, OrderedDict()
                self.report()
                try:
                    with metrics.STAGE_SECONDS.labels(self.task).time():
                        await asyncio.get_running_loop().run_in_executor(
                            self._pool, self.handle, [value for _, value in taken.values()]
                        )
                except Exception:  # noqa: BLE001 - the hot path goes on whatever happens here
                    if not self.retry:
                        log.exception("%s: a batch of %d failed and is dropped", self.task, len(taken))
                        continue
                    delay = backoff.next()
                    log.exception("%s: a batch of %d failed; retrying in %.1fs", self.task, len(taken), delay)
                    for key, kept in reversed(taken.items()):
                        if key not in self._queued:
                            self._queued[key] = kept
                            self._queued.move_to_end(key, last=False)
                    self.report()
                    await asyncio.sleep(delay)
                    continue
                backoff.reset()
                self.handled += len(taken)
                self.report()
                await asyncio.sleep(max(0.0, self.every_s - (time.monotonic() - started)))
