"""Does the embedded broker's fetch cost follow the records or the batches a partition holds?

For each case a fresh Tansu broker (the binary `vlm4rec up` runs), one partition filled first,
then 300 records a second produced (linger 5 ms: about one record per batch, as producers at
that rate send) and read at its end by one consumer for 15 s (`fetch_cost.tail`):
- empty;
- 100,000 records of 200 bytes in large batches (linger 50 ms, up to 10,000 records a batch);
- 20,000 and 40,000 records of 200 bytes, one record per batch.
Run: .venv/bin/python docs/tansu-fetch-cost/batch_cost.py (about 3 minutes); output in
docs/tansu-fetch-cost/batch_cost.txt."""

import pathlib
import sys

from confluent_kafka import Producer
from confluent_kafka.admin import NewTopic

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import fetch_cost as fc


def run(label: str, fill: int, conf: dict) -> None:
    with fc.fresh_broker([NewTopic("big", 1, 1), NewTopic("small", 1, 1)]) as broker:
        filler = Producer({**fc.CONF, **conf})
        for n in range(fill):
            filler.produce("big", b"x" * 200)
            if conf.get("batch.num.messages") == 1:
                filler.flush()  # one record per produce request, so one per batch
            elif n % 10_000 == 0:
                filler.poll(0)
        filler.flush()
        cpu, got = fc.tail(broker, Producer({**fc.CONF, "linger.ms": 5}))
        print(f"{label}: serving 300/s at the end: broker {cpu:.1f} % of a core ({got} read); RSS {broker.memory_info().rss >> 20} MB", flush=True)


def main() -> None:
    run("empty", 0, {"linger.ms": 5})
    run("100k records in large batches", 100_000, {"linger.ms": 50, "batch.num.messages": 10_000})
    run("20k records one per batch", 20_000, {"linger.ms": 0, "batch.num.messages": 1})
    run("40k records one per batch", 40_000, {"linger.ms": 0, "batch.num.messages": 1})


if __name__ == "__main__":
    main()
