"""Topic names and which event each topic carries."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TopicNames:
    """The product's topics. Names are configurable so that several deployments can share a
    cluster; the dead-letter topics follow their source as `<topic>.dlq`."""

    items_new: str = "items.new"
    interactions: str = "interactions"
    items_embedded: str = "items.embedded"
    recs: str = "recs"

    @staticmethod
    def dlq(topic: str) -> str:
        """Dead-letter topic of `topic`."""
        return f"{topic}.dlq"

    @property
    def items_new_dlq(self) -> str:
        return self.dlq(self.items_new)

    @property
    def interactions_dlq(self) -> str:
        return self.dlq(self.interactions)

    def all(self) -> list[str]:
        """Every topic the product reads or writes, in a stable order."""
        return [
            self.items_new,
            self.interactions,
            self.items_embedded,
            self.recs,
            self.items_new_dlq,
            self.interactions_dlq,
        ]
