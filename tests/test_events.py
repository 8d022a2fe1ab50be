"""The event contract: valid, invalid, unknown fields, unicode, JSON Schema files."""

from __future__ import annotations

import json

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from topics import DeadLetter, EventError, Interaction, ItemEmbedded, ItemNew, Recs, decode, encode
from topics.events import EVENT_MODELS, MAX_ID_CHARS
from topics.jsonschema import SCHEMA_DIR, schema_documents
from topics.names import TopicNames
from topics.producer import EventProducer, event_key

ITEM = {"item_id": "sku-1", "title": "Red dress", "image_url": "https://example.com/a.jpg"}
CLICK = {"user_id": "u1", "item_id": "sku-1", "event": "click", "ts": 1_700_000_000.5}


def raw(obj: object) -> bytes:
    return json.dumps(obj).encode()


def test_valid_item_defaults() -> None:
    item = decode(ItemNew, raw(ITEM))
    assert item.text == "" and item.category == "" and item.attributes == {}
    assert item.created_at is None


def test_unknown_fields_are_ignored_not_fatal() -> None:
    item = decode(ItemNew, raw({**ITEM, "brand_new_field": {"x": 1}}))
    assert item.item_id == "sku-1"


def test_unicode_round_trip() -> None:
    item = decode(ItemNew, raw({**ITEM, "item_id": "ünï-😀", "title": "Robe 红色 \u202e"}))
    again = decode(ItemNew, encode(item))
    assert again == item and again.item_id == "ünï-😀"


def test_numeric_ids_are_accepted_as_strings() -> None:
    event = decode(Interaction, raw({**CLICK, "user_id": 42, "item_id": 7}))
    assert (event.user_id, event.item_id) == ("42", "7")


def test_event_type_is_normalised_and_open() -> None:
    assert decode(Interaction, raw({**CLICK, "event": " Add_To_Cart "})).event == "add_to_cart"


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        (b"\xff\xfe", "not valid UTF-8"),
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (b"null", "expected a JSON object"),
        (raw({k: v for k, v in CLICK.items() if k != "ts"}), "ts: Field required"),
        (raw({**CLICK, "user_id": ""}), "user_id"),
        (raw({**CLICK, "user_id": "   "}), "must not be empty"),
        (raw({**CLICK, "user_id": None}), "user_id"),
        (raw({**CLICK, "user_id": "a\nb"}), "control characters"),
        (raw({**CLICK, "ts": "yesterday"}), "ts"),
        (raw({**CLICK, "ts": True}), "not a boolean"),
        (raw({**CLICK, "ts": 1_700_000_000_000}), "milliseconds"),
        (raw({**CLICK, "ts": -5}), "negative"),
        (b'{"user_id":"u","item_id":"i","event":"click","ts":NaN}', "finite"),
        (raw({**CLICK, "user_id": "x" * (MAX_ID_CHARS + 1)}), "at most 256"),
        (raw({**ITEM, "image_url": "ftp://x/y.jpg"}), "scheme"),
        (raw({**ITEM, "image_url": "javascript:alert(1)"}), "scheme"),
        (raw({**ITEM, "image_url": "data:image/png,notbase64"}), "base64"),
        (raw({**ITEM, "title": "t" * 100_000}), "title"),
        (raw({**ITEM, "attributes": {"a": ["list"]}}), "attributes"),
        (b'{"item_id": "\\ud800", "title": "t"}', "item_id"),
    ],
)
def test_invalid_events_raise_one_typed_error(payload: bytes, fragment: str) -> None:
    model = Interaction if b"user_id" in payload else ItemNew
    with pytest.raises(EventError) as info:
        decode(model, payload)
    assert fragment in info.value.reason


def test_dead_letter_keeps_original_bytes() -> None:
    letter = DeadLetter.of(b"\xff garbage", b"key", "items.new", 3, 42, "not valid UTF-8")
    again = decode(DeadLetter, encode(letter))
    assert again.original_bytes() == b"\xff garbage"
    assert (again.topic, again.partition, again.offset) == ("items.new", 3, 42)
    assert event_key(again) == b"key"


def test_keys_follow_the_contract() -> None:
    assert event_key(decode(ItemNew, raw(ITEM))) == b"sku-1"
    assert event_key(decode(Interaction, raw(CLICK))) == b"u1"
    recs = Recs(user_id="u1", items=[], trigger="request", model="m", generated_at=1.0)
    assert event_key(recs) == b"u1"
    emb = ItemEmbedded(item_id="sku-1", model="m", dim=3, embedded_at=1.0)
    assert event_key(emb) == b"sku-1"


def test_recs_trigger_is_closed_set() -> None:
    with pytest.raises(EventError):
        decode(Recs, raw({"user_id": "u", "items": [], "trigger": "magic", "model": "m", "generated_at": 1}))


def test_topic_names_and_dlq() -> None:
    names = TopicNames()
    assert names.items_new_dlq == "items.new.dlq"
    assert names.interactions_dlq == "interactions.dlq"
    assert len(set(names.all())) == 6


def test_committed_schema_files_match_models() -> None:
    docs = schema_documents()
    assert set(docs) == {p.name for p in SCHEMA_DIR.glob("*.json")}, "run `vlm4rec topics schemas`"
    for name, text in docs.items():
        assert (SCHEMA_DIR / name).read_text(encoding="utf-8") == text, f"{name} is stale: run `vlm4rec topics schemas`"


@pytest.mark.parametrize("name", list(EVENT_MODELS))
def test_schema_accepts_what_the_model_emits(name: str) -> None:
    examples = {
        "items.new": decode(ItemNew, raw({**ITEM, "created_at": 5, "attributes": {"k": "v"}})),
        "interactions": decode(Interaction, raw({**CLICK, "value": 4.5})),
        "items.embedded": ItemEmbedded(item_id="a", model="m", dim=384, embedded_at=1.0),
        "recs": Recs(user_id="u", items=[{"item_id": "a", "score": 0.5}], trigger="interaction", model="m", generated_at=1.0),
        "dlq": DeadLetter.of(b"x", None, "t", 0, 1, "r"),
    }
    schema = json.loads(schema_documents()[f"{name}.v1.json"])
    jsonschema.validate(json.loads(encode(examples[name])), schema)


json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=True) | st.integers() | st.text(),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["item_id", "user_id", "title", "text", "image_url", "event", "ts", "value", "created_at", "attributes", "extra"]),
        json_values,
    )
)
def test_any_json_object_either_parses_or_raises_event_error(obj: dict) -> None:
    payload = json.dumps(obj).encode()
    for model in (ItemNew, Interaction):
        try:
            event = decode(model, payload)
        except EventError as exc:
            assert exc.reason
        else:
            assert decode(model, encode(event)) == event  # accepted events survive the wire


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_either_parse_or_raise_event_error(payload: bytes) -> None:
    for model in (ItemNew, Interaction):
        try:
            decode(model, payload)
        except EventError:
            pass


def test_a_long_running_producer_hears_of_refused_messages_once() -> None:
    """The stream processor pushes recs without flushing: `refused` hands over the delivery
    failures reported since the last call, each once."""
    from confluent_kafka import KafkaError

    from topics.producer import EventProducer

    class Failed:
        def topic(self) -> str:
            return "recs"

    producer = EventProducer({"bootstrap.servers": "127.0.0.1:1", "socket.connection.setup.timeout.ms": 1000})
    assert producer.refused() == []
    producer._on_delivery(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED), Failed())  # what librdkafka reports
    refused = producer.refused()
    assert len(refused) == 1 and refused[0].startswith("recs: ") and producer.refused() == []


def test_a_producer_that_cannot_reach_its_broker_says_so_when_asked_to_connect() -> None:
    from confluent_kafka import KafkaException

    producer = EventProducer({"bootstrap.servers": "127.0.0.1:1", "socket.connection.setup.timeout.ms": 1000})
    with pytest.raises(KafkaException):
        producer.connect(timeout_s=1.5)
