from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from vlm4rec.settings import Settings


def test_defaults_point_at_the_local_stack(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(__import__("os").environ):
        if key.startswith("VLM4REC_"):
            monkeypatch.delenv(key)
    s = Settings(_env_file=None)
    assert s.bootstrap_servers == "127.0.0.1:9092"
    assert s.milvus_uri == "http://127.0.0.1:19530"
    assert s.web_port == 6066
    assert s.kafka_config() == {"bootstrap.servers": "127.0.0.1:9092", "security.protocol": "PLAINTEXT"}
    assert s.topics.items_new == "items.new" and s.topics.recs == "recs"


def test_environment_overrides_and_sasl_passthrough(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLM4REC_BOOTSTRAP_SERVERS", "kafka-1:9093,kafka-2:9093")
    monkeypatch.setenv("VLM4REC_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("VLM4REC_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("VLM4REC_KAFKA_SASL_USERNAME", "svc")
    monkeypatch.setenv("VLM4REC_KAFKA_SASL_PASSWORD", "s3cret")
    monkeypatch.setenv("VLM4REC_KAFKA_SSL_CAFILE", "/etc/ca.pem")
    monkeypatch.setenv("VLM4REC_TOPIC_INTERACTIONS", "prod.interactions")
    s = Settings(_env_file=None)
    config = s.consumer_config("g")
    assert config["bootstrap.servers"] == "kafka-1:9093,kafka-2:9093"
    assert config["security.protocol"] == "SASL_SSL"
    assert config["sasl.mechanism"] == "SCRAM-SHA-512"
    assert config["sasl.password"] == "s3cret"
    assert config["ssl.ca.location"] == "/etc/ca.pem"
    assert config["group.id"] == "g" and config["enable.auto.commit"] is False
    assert s.topics.interactions_dlq == "prod.interactions.dlq"


def test_secrets_are_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLM4REC_KAFKA_SASL_PASSWORD", "s3cret")
    monkeypatch.setenv("VLM4REC_MILVUS_TOKEN", "root:Milvus")
    shown = Settings(_env_file=None).masked()
    assert shown["kafka_sasl_password"] == "***" and shown["milvus_token"] == "***"
    assert "s3cret" not in repr(shown) and "Milvus" not in str(shown["milvus_token"])


def test_invalid_values_fail_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLM4REC_WEB_PORT", "99999")
    with pytest.raises(ValidationError, match="web_port"):
        Settings(_env_file=None)


def test_data_dir_expands_user(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLM4REC_DATA_DIR", "~/somewhere")
    assert Settings(_env_file=None).data_dir == Path.home() / "somewhere"


def test_config_command_masks_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from vlm4rec.cli import main

    monkeypatch.setenv("VLM4REC_MILVUS_TOKEN", "topsecret")
    result = CliRunner().invoke(main, ["config"])
    assert result.exit_code == 0, result.output
    assert "VLM4REC_MILVUS_TOKEN=***" in result.output
    assert "topsecret" not in result.output
    assert "VLM4REC_BOOTSTRAP_SERVERS=" in result.output


def test_broker_shims_follow_the_local_broker_unless_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLM4REC_STREAMS_BROKER_SHIMS", raising=False)
    monkeypatch.delenv("VLM4REC_LOCAL_BROKER", raising=False)
    assert Settings(_env_file=None).local_broker == "own"
    assert Settings(_env_file=None).streams_broker_shims is False
    monkeypatch.setenv("VLM4REC_LOCAL_BROKER", "tansu")
    assert Settings(_env_file=None).streams_broker_shims is True
    monkeypatch.setenv("VLM4REC_STREAMS_BROKER_SHIMS", "false")
    assert Settings(_env_file=None).streams_broker_shims is False


def test_the_documented_event_weights_are_the_default_so_a_hide_pulls_the_profile_away(monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np

    from streams.profile import Profile, ProfileRule
    from topics.events import DEFAULT_EVENT_WEIGHTS

    for key in list(__import__("os").environ):
        if key.startswith("VLM4REC_"):
            monkeypatch.delenv(key)
    weights = Settings(_env_file=None).profile_weights
    assert weights == DEFAULT_EVENT_WEIGHTS and weights["hide"] < 0 < weights["view"] < weights["purchase"]
    liked, hidden = np.array([1.0, 0.0]), np.array([0.6, 0.8])
    profile = Profile("u")
    profile.apply("liked", liked, "click", None, 1.0, ProfileRule(weights=weights))
    profile.apply("hidden", hidden, "hide", None, 2.0, ProfileRule(weights=weights))
    assert float(np.dot(profile.as_array(), hidden)) < float(np.dot(liked, hidden)), "further from the hidden item than before"
    monkeypatch.setenv("VLM4REC_PROFILE_WEIGHTS", "{}")
    assert Settings(_env_file=None).profile_weights == {}, "the paper's plain mean is one setting away"


@pytest.mark.parametrize(
    ("streams", "env", "shared"),
    [(1, {}, "false"), (3, {}, "true"), (1, {"VLM4REC_STREAMS_LEARN_FROM_ALL": "true"}, "true"), (3, {"VLM4REC_STREAMS_LEARN_FROM_ALL": "false"}, "false")],
)
def test_up_shares_learning_between_several_stream_processors_unless_told(
    monkeypatch: pytest.MonkeyPatch, streams: int, env: dict[str, str], shared: str
) -> None:
    """One stream processor has no one to learn from; several share (streams.observations);
    an explicit VLM4REC_STREAMS_LEARN_FROM_ALL wins either way."""
    from vlm4rec.cli.stack import _product_services
    from vlm4rec.settings import Settings

    for key, value in {"VLM4REC_LOCAL_STREAMS": str(streams), **env}.items():
        monkeypatch.setenv(key, value)
    services = [s for s in _product_services(Settings()) if s.name.startswith("streams")]
    assert len(services) == streams
    assert {s.env["VLM4REC_STREAMS_LEARN_FROM_ALL"] for s in services} == {shared}


def test_the_rankers_settings_reach_its_config(monkeypatch: pytest.MonkeyPatch) -> None:
    from streams.rank import RankConfig
    from vlm4rec.wiring import build_rank_config

    monkeypatch.setenv("VLM4REC_RANK_CONTENT_PICKS", "false")
    monkeypatch.setenv("VLM4REC_RANK_TAIL_RULE", "calibrated")
    config = build_rank_config(Settings(_env_file=None))
    assert config.content_picks is False and config.tail_rule == "calibrated"
    monkeypatch.delenv("VLM4REC_RANK_CONTENT_PICKS")
    assert build_rank_config(Settings(_env_file=None)).content_picks is RankConfig().content_picks is True
