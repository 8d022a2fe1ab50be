"""Event schemas v1 (pydantic), JSON on the wire, UTF-8.

Producers in other languages use the JSON Schema files in `topics/schemas/`, generated from
these models (`vlm4rec topics schemas`). Unknown extra fields are ignored so that producers can
add fields without breaking consumers; anything invalid raises one typed error, `EventError`,
whose `reason` is written to the dead-letter topic.
"""

from __future__ import annotations

import base64
import json
import re
import time
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

SCHEMA_VERSION = 1

MAX_ID_CHARS = 256
MAX_TITLE_CHARS = 2_000
MAX_TEXT_CHARS = 50_000
MAX_IMAGE_URL_CHARS = 8_000_000  # a data: URI of a few MB
MAX_ATTRIBUTES = 100
MAX_EVENT_CHARS = 64
MAX_RECS = 1_000
# Unix seconds later than this are almost surely milliseconds sent by mistake (year 5138).
MAX_TIMESTAMP = 1e11

#: Default profile weight of each known interaction type. The set is open: an unknown event
#: type gets weight 1.0 unless configured. `rating` scales with its value (see streams).
DEFAULT_EVENT_WEIGHTS: dict[str, float] = {
    "view": 0.5,
    "click": 1.0,
    "like": 2.0,
    "share": 2.0,
    "purchase": 3.0,
    "rating": 1.0,
    "skip": -0.5,
    "hide": -2.0,
}

IMAGE_URL_SCHEMES = ("https://", "http://", "file://", "data:image/")


class EventError(ValueError):
    """An event that cannot be accepted. `reason` is short and human-readable."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _clean_text(value: str) -> str:
    """Refuse strings that cannot be written back as UTF-8 (lone surrogates from JSON escapes)
    and drop NUL characters, which several stores reject."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("contains characters that are not valid UTF-8 (lone surrogate)") from exc
    return value.replace("\x00", "")


#: C0 controls and DEL: one regex search, not a Python test per character (every pushed list
#: validates 20 ids, and a per-character test took 7 % of a loaded stream processor's loop)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _clean_id(value: str) -> str:
    if "\x00" in value:  # checked before `_clean_text` drops it: "a\x00b" must not become "ab"
        raise ValueError("must not contain control characters")
    value = _clean_text(value).strip()
    if not value:
        raise ValueError("must not be empty")
    if _CONTROL.search(value):
        raise ValueError("must not contain control characters")
    return value


def _none_if_blank(value: Any) -> Any:
    return None if isinstance(value, str) and not value.strip() else value


def _no_bool(value: Any) -> Any:
    """JSON true/false is not a number, whatever Python thinks."""
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")
    return value


def _check_timestamp(value: float | None) -> float | None:
    if value is None:
        return None
    if value < 0:
        raise ValueError("must be unix seconds, not negative")
    if value > MAX_TIMESTAMP:
        raise ValueError("looks like milliseconds; send unix seconds")
    return value


Id = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS), AfterValidator(_clean_id)]
Text = Annotated[str, AfterValidator(_clean_text)]
Number = Annotated[float, BeforeValidator(_no_bool)]
Timestamp = Annotated[float, BeforeValidator(_no_bool), AfterValidator(_check_timestamp)]
OptionalTimestamp = Annotated[
    float | None,
    BeforeValidator(_no_bool),
    BeforeValidator(_none_if_blank),
    AfterValidator(_check_timestamp),
]


class Event(BaseModel):
    model_config = ConfigDict(
        extra="ignore",
        frozen=True,
        allow_inf_nan=False,
        coerce_numbers_to_str=True,  # numeric ids from producers are fine: "42" == 42
    )


class ItemNew(Event):
    """A new or updated item, topic `items.new`, key `item_id`. Re-publishing an item id
    replaces its content."""

    item_id: Id
    title: Annotated[Text, Field(max_length=MAX_TITLE_CHARS)]
    text: Annotated[Text, Field(max_length=MAX_TEXT_CHARS)] = ""
    image_url: Annotated[
        Annotated[str, Field(max_length=MAX_IMAGE_URL_CHARS)] | None,
        BeforeValidator(_none_if_blank),
    ] = None
    category: Annotated[Text, Field(max_length=MAX_TITLE_CHARS)] = ""
    created_at: OptionalTimestamp = None
    attributes: Annotated[dict[Text, Text], Field(max_length=MAX_ATTRIBUTES)] = {}

    @field_validator("image_url")
    @classmethod
    def _known_scheme(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip()
        if not value.lower().startswith(IMAGE_URL_SCHEMES):
            scheme = value.split(":", 1)[0][:20] if ":" in value else value[:20]
            raise ValueError(
                f"scheme of {scheme!r} is not one of https://, http://, file://, data:image/"
            )
        if value.lower().startswith("data:") and ";base64," not in value[:200].lower():
            raise ValueError("data: URIs must be base64 (data:image/<type>;base64,...)")
        return value


class Interaction(Event):
    """A user did something with an item, topic `interactions`, key `user_id`."""

    user_id: Id
    item_id: Id
    event: Annotated[str, Field(min_length=1, max_length=MAX_EVENT_CHARS)]
    value: Number | None = None
    ts: Timestamp

    @field_validator("event")
    @classmethod
    def _normalise_event(cls, value: str) -> str:
        value = _clean_id(value).lower()
        return value


class ItemEmbedded(Event):
    """An item's vector is in the vector store, topic `items.embedded`, key `item_id`."""

    item_id: Id
    model: str
    dim: Annotated[int, Field(gt=0)]
    embedded_at: float
    created_at: float | None = None
    strategy: str = ""
    content_hash: str = ""
    published_at: float | None = Field(
        default=None, description="when the item reached items.new (its Kafka timestamp)"
    )


class Rec(Event):
    item_id: Id
    score: float


class Recs(Event):
    """A user's current recommendations, topic `recs`, key `user_id`: the push to the feed."""

    user_id: Id
    items: Annotated[list[Rec], Field(max_length=MAX_RECS)]
    trigger: Literal["interaction", "fresh_item", "request"]
    model: str
    generated_at: float
    answers: dict[str, int] = Field(
        default_factory=dict,
        description="what the list takes into account: per input partition (\"topic:partition\"), the offset "
        "of the user's last event there that the profile had handled when the list was ranked (applied, or "
        "held until its item is embedded)",
    )
    variant: str = Field(
        default="",
        max_length=64,
        description="the ranking variant that produced the list (VLM4REC_RANK_VARIANTS; \"default\" when only one "
        "is served); empty from producers that predate variants",
    )


class DeadLetter(Event):
    """An event that could not be processed, with the original bytes so nothing is lost.
    Topic `<source>.dlq`, same key as the original."""

    original: str = Field(description="the original message value, base64")
    key: str | None = Field(default=None, description="the original message key, base64")
    topic: str
    partition: int
    offset: int
    reason: str
    failed_at: float

    @classmethod
    def of(
        cls,
        value: bytes | None,
        key: bytes | None,
        topic: str,
        partition: int,
        offset: int,
        reason: str,
    ) -> DeadLetter:
        return cls(
            original=base64.b64encode(value or b"").decode("ascii"),
            key=None if key is None else base64.b64encode(key).decode("ascii"),
            topic=topic,
            partition=partition,
            offset=offset,
            reason=reason[:2000],
            failed_at=time.time(),
        )

    def original_bytes(self) -> bytes:
        return base64.b64decode(self.original)


E = TypeVar("E", bound=Event)

EVENT_MODELS: dict[str, type[Event]] = {
    "items.new": ItemNew,
    "interactions": Interaction,
    "items.embedded": ItemEmbedded,
    "recs": Recs,
    "dlq": DeadLetter,
}


def _describe_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "event"
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {msg}")
    more = len(exc.errors()) - 5
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)


def decode(model: type[E], raw: bytes | str | None) -> E:
    """Parse one message value into `model`, or raise `EventError` saying why not."""
    if raw is None:
        raise EventError("empty message (null value)")
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise EventError(f"not valid UTF-8 at byte {exc.start}") from exc
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as exc:
        detail = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
        raise EventError(f"not valid JSON: {detail}") from exc
    if not isinstance(data, dict):
        raise EventError(f"expected a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise EventError(_describe_validation_error(exc)) from exc


def encode(event: Event) -> bytes:
    """Serialise an event for the wire (compact JSON, UTF-8)."""
    return event.model_dump_json().encode("utf-8")
