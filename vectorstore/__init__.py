"""The item vector store that workers write and streams read, behind one small interface.

It sits below both so that each reaches it downwards; it imports nothing of the project.
`MilvusVectorStore` is imported when first asked for: pymilvus takes 0.4 s to import, and the
ranker (`streams.rank`, also the offline evaluator's) needs only `vectorstore.order`.
"""

from __future__ import annotations

from typing import Any

from vectorstore.base import CollectionMismatch, VectorRecord, VectorStore
from vectorstore.memory import MemoryVectorStore
from vectorstore.replica import ReplicaVectorStore

__all__ = [
    "CollectionMismatch",
    "MemoryVectorStore",
    "MilvusVectorStore",
    "ReplicaVectorStore",
    "VectorRecord",
    "VectorStore",
]


def __getattr__(name: str) -> Any:
    if name == "MilvusVectorStore":
        from vectorstore.milvus import MilvusVectorStore

        return MilvusVectorStore
    raise AttributeError(f"module 'vectorstore' has no attribute {name!r}")
