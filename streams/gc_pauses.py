"""Python's garbage-collector pauses, timed: a full collection stops every thread of a
process for as long as it takes to walk every tracked object, so as a process's state grows
its pauses grow with it, and they land on whatever the hot path was doing."""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable

log = logging.getLogger("vlm4rec.streams")

#: a pause this long or longer is logged
LOGGED_S = 0.05


def settle() -> None:
    """Collects once, then moves every object alive now (modules, models, the app's wiring)
    out of the collector's reach (`gc.freeze`): they live as long as the process, and every
    full collection would walk them again. Objects made later are collected as usual."""
    gc.collect()
    gc.freeze()


def watch(process: str, on_pause: Callable[[int, float], None] | None = None) -> None:
    """Times every collection of this process; `on_pause(generation, seconds)` for each, and
    a log line for the long ones. Only where every log handler's lock is reentrant (a
    collection can start inside a handler). The stream processor watches its main process,
    whose pauses hold up its event loop; a CI failure once put on this hook in the ranking
    process was two threads reaping that child (`streams.ranking_process._exited`)."""
    started = [0.0]

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            return
        took = time.perf_counter() - started[0]
        if on_pause is not None:
            on_pause(info["generation"], took)
        if took >= LOGGED_S:
            log.info("%s: generation %d collection took %.0f ms", process, info["generation"], took * 1000)

    gc.callbacks.append(callback)
