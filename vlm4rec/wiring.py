"""Build the parts from the settings: the only place where settings meet constructors."""

from __future__ import annotations

import functools

from pymilvus import MilvusClient

from vectorstore import MilvusVectorStore
from vectorstore.milvus import milvus_client
from vlm4rec.settings import Settings
from workers.backends.base import EmbeddingBackend
from workers.embedder import Embedder
from images.loader import ImageLimits, ImageLoader
from workers.worker import EmbeddingWorker, WorkerConfig


def build_backend(settings: Settings) -> EmbeddingBackend:
    if settings.embed_backend == "cpu":
        from workers.backends.cpu import CpuBackend

        return CpuBackend(
            device=settings.embed_device,
            cache_dir=settings.model_cache_dir,
            threads=settings.embed_threads or None,
        )
    prompt = {"prompt": settings.vllm_prompt} if settings.vllm_prompt else {}
    if settings.embed_backend == "vllm-http":
        from workers.backends.vllm_http import VllmHttpBackend

        return VllmHttpBackend(
            describer_url=settings.vllm_describer_url,
            describer_model=settings.vllm_describer_model,
            text_url=settings.vllm_text_url,
            text_model=settings.vllm_text_model,
            image_url=settings.vllm_image_url or None,
            image_model=settings.vllm_image_model or None,
            api_key=settings.vllm_api_key.get_secret_value() or None,
            max_concurrency=settings.vllm_max_concurrency,
            **prompt,
        )
    from workers.backends.vllm_engine import VllmEngineBackend

    return VllmEngineBackend(
        describer_model=settings.vllm_describer_model,
        text_model=settings.vllm_text_model,
        image_model=settings.vllm_image_model or None,
        **prompt,
    )


def build_embedder(settings: Settings) -> Embedder:
    return Embedder(build_backend(settings), settings.embed_strategy)


def build_store(settings: Settings, collection: str | None = None, timeout_s: float = 30.0) -> MilvusVectorStore:
    """The vector store of the product's Milvus: the items collection unless another is named
    (the benchmarks write their own, so that a measurement never touches the product's items)."""
    return MilvusVectorStore(
        settings.milvus_uri,
        collection=collection or settings.milvus_collection,
        token=settings.milvus_token.get_secret_value(),
        timeout_s=timeout_s,
    )


def build_milvus_client(settings: Settings, timeout_s: float = 30.0) -> MilvusClient:
    """A bare client of the product's Milvus, for checks that read collections as they are
    (statistics, raw rows) rather than through the vector-store interface."""
    return milvus_client(settings.milvus_uri, settings.milvus_token.get_secret_value(), timeout_s)


def build_loader(settings: Settings) -> ImageLoader:
    return ImageLoader(
        ImageLimits(
            connect_timeout_s=settings.image_connect_timeout_s,
            read_timeout_s=settings.image_read_timeout_s,
            max_bytes=settings.image_max_bytes,
            max_pixels=settings.image_max_pixels,
            allowed_hosts=tuple(settings.image_allowed_hosts),
            file_roots=tuple(settings.image_file_roots),
        )
    )


def build_streams_config(settings: Settings):  # noqa: ANN201 - streams.app.StreamsConfig, imported lazily (faust is heavy)
    from streams.app import StreamsConfig
    from streams.profile import ProfileRule
    from streams.variants import parse_variants

    return StreamsConfig(
        topics=settings.topics,
        connection=settings.kafka_connection,
        item_replica=settings.streams_item_replica,
        ranking_process=settings.streams_ranking_process,
        learn_from_all=settings.streams_learn_from_all,
        app_id=settings.streams_app_id,
        store=settings.streams_store,
        data_dir=str(settings.data_dir / "streams"),
        session_timeout_s=settings.kafka_session_timeout_ms / 1000,
        partitions=settings.topic_partitions,
        replication=settings.topic_replication,
        web_host=settings.web_host,
        web_port=settings.web_port,
        k=settings.streams_k,
        fanout_users=settings.streams_fanout_users,
        batch_max=settings.streams_batch_max,
        batch_within_s=settings.streams_batch_ms / 1000,
        refresh_max=settings.streams_refresh_max,
        fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms,
        broker_shims=settings.streams_broker_shims,
        producer_batch_bytes=settings.streams_producer_batch_bytes,
        learn_max=settings.streams_learn_max,
        learn_every_s=settings.streams_learn_every_s,
        neighbour_ttl_s=settings.streams_neighbour_ttl_s,
        rule=ProfileRule(
            weights=settings.profile_weights,
            rating_neutral=settings.profile_rating_neutral,
            half_life_s=settings.profile_half_life_s,
        ),
        popularity_half_life_s=settings.popularity_half_life_s,
        rank=build_rank_config(settings),
        variants=parse_variants(settings.rank_variants),
    )



def build_rank_config(settings: Settings):  # noqa: ANN201 - streams.rank.RankConfig, imported lazily
    """The ranker's settings (`VLM4REC_RANK_*`): the stream processor's, and the offline
    evaluation's, so that `vlm4rec eval` measures the ranker as it is configured to run."""
    from streams.rank import RankConfig

    return RankConfig(
        content_k=settings.rank_content_k,
        interests=settings.rank_interests,
        cooc_window=settings.rank_cooc_window,
        cooc_neighbours=settings.rank_cooc_neighbours,
        train_rate=settings.rank_train_rate,
        negatives=settings.rank_negatives,
        buffer=settings.rank_buffer,
        refit_every=settings.rank_refit_every,
        min_groups=settings.rank_min_groups,
        tail_slots=settings.rank_tail_slots,
        tail_rule=settings.rank_tail_rule,
        content_picks=settings.rank_content_picks,
        sequence_steps=settings.rank_sequence_steps,
        sequence_k=settings.rank_sequence_k,
        fanout_places=settings.rank_fanout_places,
    )


def build_streams(settings: Settings):  # noqa: ANN201 - streams.app.StreamsApp, imported lazily (faust is heavy)
    from streams.app import StreamsApp
    from streams.web import register_ui

    # the ranking process makes its own client of the items collection (`streams.ranking_process`)
    service = StreamsApp(build_streams_config(settings), build_store(settings), functools.partial(build_store, settings))
    register_ui(service, build_loader(settings))
    return service


def build_worker(settings: Settings) -> EmbeddingWorker:
    topics = settings.topics
    config = WorkerConfig(
        consumer=settings.consumer_config(settings.worker_group),
        producer=settings.kafka_config(),
        items_topic=topics.items_new,
        embedded_topic=topics.items_embedded,
        dlq_topic=topics.items_new_dlq,
        batch_size=settings.worker_batch_size,
        batch_ms=settings.worker_batch_ms,
        fetch_threads=settings.worker_fetch_threads,
    )
    return EmbeddingWorker(config, build_embedder(settings), build_store(settings), build_loader(settings))
