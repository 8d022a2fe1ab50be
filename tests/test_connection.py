"""One description of how clients reach the brokers, rendered for librdkafka and for Faust."""

from __future__ import annotations

import certifi
import faust
import pytest

from topics.connection import KafkaConnection
from vlm4rec.settings import Settings


def test_plain_text_renders_the_servers_alone() -> None:
    connection = KafkaConnection("kafka-1:9092, kafka-2:9092")
    assert connection.librdkafka() == {"bootstrap.servers": "kafka-1:9092, kafka-2:9092", "security.protocol": "PLAINTEXT"}
    assert connection.faust_broker() == "kafka://kafka-1:9092;kafka://kafka-2:9092"
    assert connection.faust_credentials() is None


def test_sasl_over_tls_reaches_both_clients_alike() -> None:
    connection = KafkaConnection(
        "kafka-1:9093", "SASL_SSL", "SCRAM-SHA-512", "feed", "s3cret", ssl_cafile=certifi.where()
    )
    rendered = connection.librdkafka()
    assert rendered["sasl.mechanism"] == "SCRAM-SHA-512" and rendered["sasl.username"] == "feed"
    assert rendered["sasl.password"] == "s3cret" and rendered["ssl.ca.location"] == certifi.where()
    credentials = connection.faust_credentials()
    assert isinstance(credentials, faust.SASLCredentials)
    assert (credentials.username, credentials.password) == ("feed", "s3cret")
    assert str(credentials.mechanism.value) == "SCRAM-SHA-512"
    assert credentials.ssl_context is not None


def test_sasl_without_a_mechanism_is_plain_for_both_clients() -> None:
    connection = KafkaConnection("k:9092", "SASL_PLAINTEXT", "", "feed", "pw")
    assert connection.librdkafka()["sasl.mechanism"] == "PLAIN"
    credentials = connection.faust_credentials()
    assert str(credentials.mechanism.value) == "PLAIN" and credentials.ssl_context is None


def test_tls_alone_gives_faust_a_context_and_librdkafka_the_files() -> None:
    connection = KafkaConnection("k:9093", "SSL", ssl_cafile=certifi.where())
    assert isinstance(connection.faust_credentials(), faust.SSLCredentials)
    assert connection.librdkafka()["ssl.ca.location"] == certifi.where()
    assert "sasl.username" not in connection.librdkafka()


def test_a_missing_ca_file_fails_when_the_processor_is_configured() -> None:
    with pytest.raises(FileNotFoundError):
        KafkaConnection("k:9093", "SSL", ssl_cafile="/nowhere/ca.pem").faust_credentials()


def test_the_password_stays_out_of_the_repr() -> None:
    assert "s3cret" not in repr(KafkaConnection("k:9092", "SASL_SSL", "PLAIN", "feed", "s3cret"))


def test_settings_hand_down_one_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLM4REC_BOOTSTRAP_SERVERS", "kafka-1:9093")
    monkeypatch.setenv("VLM4REC_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("VLM4REC_KAFKA_SASL_USERNAME", "feed")
    monkeypatch.setenv("VLM4REC_KAFKA_SASL_PASSWORD", "s3cret")
    settings = Settings(_env_file=None)
    assert settings.kafka_connection.sasl_password == "s3cret"
    assert settings.kafka_config() == settings.kafka_connection.librdkafka()
    from vlm4rec.wiring import build_streams_config

    assert build_streams_config(settings).connection == settings.kafka_connection
