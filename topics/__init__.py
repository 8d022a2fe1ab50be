"""The event contract of VLM4Rec: topic names, event schemas, serialization, topic creation.

Everything else in the project imports this package; it imports nothing of the project.
"""

from topics.events import (
    DeadLetter,
    Event,
    EventError,
    Interaction,
    ItemEmbedded,
    ItemNew,
    Rec,
    Recs,
    decode,
    encode,
)
from topics.names import TopicNames

__all__ = [
    "DeadLetter",
    "Event",
    "EventError",
    "Interaction",
    "ItemEmbedded",
    "ItemNew",
    "Rec",
    "Recs",
    "TopicNames",
    "decode",
    "encode",
]
