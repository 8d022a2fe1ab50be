"""Prometheus metrics of the embedding worker (served on /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

ITEMS = Counter(
    "vlm4rec_worker_items_total",
    "Items handled by the embedding worker, by outcome",
    ["outcome"],  # embedded | unchanged | dead_letter
)
FAILURES = Counter(
    "vlm4rec_worker_failures_total",
    "Items sent to the dead-letter topic, by reason class",
    ["reason"],  # bad_event | bad_image | refused | model_error
)
RETRIES = Counter(
    "vlm4rec_worker_retries_total",
    "Batches retried because a dependency (model server, Milvus, broker) failed",
    ["dependency"],
)
BATCH_SIZE = Histogram(
    "vlm4rec_worker_batch_size",
    "Items per processed batch",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
STAGE_SECONDS = Histogram(
    "vlm4rec_worker_stage_seconds",
    "Time per batch in each stage",
    ["stage"],  # fetch | image_model | text_model | upsert | publish
    buckets=LATENCY_BUCKETS,
)
ITEM_LATENCY = Histogram(
    "vlm4rec_worker_item_latency_seconds",
    "From the item's publish on items.new (Kafka timestamp) to its vector upserted",
    buckets=LATENCY_BUCKETS,
)
