"""The item vector store that workers write and streams read, behind one small interface.

It sits below both so that each reaches it downwards; it imports nothing of the project.
"""

from vectorstore.base import CollectionMismatch, VectorRecord, VectorStore
from vectorstore.memory import MemoryVectorStore
from vectorstore.milvus import MilvusVectorStore
from vectorstore.replica import ReplicaVectorStore

__all__ = [
    "CollectionMismatch",
    "MemoryVectorStore",
    "MilvusVectorStore",
    "ReplicaVectorStore",
    "VectorRecord",
    "VectorStore",
]
