"""Does spreading the same batches over more partitions make the embedded broker's fetches cheaper?

For each case a fresh Tansu broker, one topic of 4, 16 or 64 partitions filled with 0 or 180,000
one-record batches (what the 300/s soak's `interactions` topic holds after ten minutes), then
300 records a second produced round-robin over the partitions (linger 5 ms) and read at their
end by one consumer (fetch wait 100 ms) for 15 s.
Run: .venv/bin/python docs/tansu-fetch-cost/partitions.py (about 8 minutes); output in
docs/tansu-fetch-cost/partitions.txt."""

import pathlib
import sys

from confluent_kafka import Producer
from confluent_kafka.admin import NewTopic

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import fetch_cost as fc


def run(parts: int, fill: int, wait_ms: int = 100) -> None:
    with fc.fresh_broker([NewTopic("big", parts, 1)]) as broker:
        filler = Producer({**fc.CONF, "linger.ms": 0, "batch.num.messages": 1})
        for n in range(fill):
            filler.produce("big", b"x" * 200, partition=n % parts)
            filler.flush()  # one record per produce request, so one per batch
        cpu, got = fc.tail(broker, Producer({**fc.CONF, "linger.ms": 5}), parts=parts, wait_ms=wait_ms, size=200)
        print(
            f"{fill} one-record batches over {parts} partitions, fetch wait {wait_ms} ms: serving 300/s at the end: "
            f"broker {cpu:.1f} % of a core ({got} read)",
            flush=True,
        )


def main() -> None:
    for parts, fill in [(4, 0), (16, 0), (64, 0), (4, 180_000), (16, 180_000), (64, 180_000)]:
        run(parts, fill)


if __name__ == "__main__":
    main()
