"""One BLAS thread for the product's numpy work.

The ranker and the evaluator make many small matrix products (a round's candidates against a
few profile vectors, per user). OpenBLAS splits each over its threads, whose start-up and
spin-waiting cost more than the products: on ml100k the evaluator's walk took 3x the CPU on 2
cores, and the stream processor shares its cores with Milvus, the broker and the embedding
worker, where a spinning BLAS thread takes CPU from all of them (`vlm4rec bench rank` on a
busy machine: 1.1-5.2 ms per user with two threads, 0.63-0.70 ms with one)."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any


def single_threaded_blas() -> AbstractContextManager[Any]:
    """BLAS limited to one thread in this process while the context is open (threadpoolctl,
    a dependency; without it, nothing changes but speed)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - only slower
        return nullcontext()
    return threadpool_limits(limits=1, user_api="blas")
