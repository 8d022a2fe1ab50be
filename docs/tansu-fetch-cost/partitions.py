"""Does spreading the same batches over more partitions make the embedded broker's fetches cheaper?

For each case a fresh Tansu broker, one topic of 4, 16 or 64 partitions filled with 0 or 180,000
one-record batches (what the 300/s soak's `interactions` topic holds after ten minutes), then
300 records a second produced round-robin over the partitions (linger 5 ms) and read at their
end by one consumer (fetch wait 100 ms) for 15 s.
Run: .venv/bin/python docs/tansu-fetch-cost/partitions.py (about 8 minutes); output in
docs/tansu-fetch-cost/partitions.txt."""

import pathlib
import subprocess
import sys
import threading
import time

import psutil
from confluent_kafka import OFFSET_END, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import fetch_cost as fc


def tail(
    broker: psutil.Process, producer: Producer, parts: int, seconds: float = 15, rate: int = 300, wait_ms: int = 100
) -> tuple[float, int]:
    stop, got = threading.Event(), [0]

    def consume() -> None:
        c = Consumer({**fc.CONF, "group.id": f"tail-{time.time()}", "fetch.wait.max.ms": wait_ms, "enable.auto.commit": False})
        c.assign([TopicPartition("big", p, OFFSET_END) for p in range(parts)])
        while not stop.is_set():
            m = c.poll(0.2)
            if m is not None and not m.error():
                got[0] += 1
        c.close()

    t = threading.Thread(target=consume)
    t.start()
    time.sleep(4)
    broker.cpu_percent(None)
    start, n = time.time(), 0
    while time.time() - start < seconds:
        while n < (time.time() - start) * rate:
            producer.produce("big", b"x" * 200, partition=n % parts)
            n += 1
        producer.poll(0)
        time.sleep(0.005)
    producer.flush()
    cpu = broker.cpu_percent(None)
    stop.set()
    t.join()
    return cpu, got[0]


def run(parts: int, fill: int, wait_ms: int = 100) -> None:
    url = f"tcp://127.0.0.1:{fc.PORT}"
    proc = subprocess.Popen(
        [fc.TANSU, "broker", "--listener-url", url, "--advertised-listener-url", url],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(4)
        admin = AdminClient(fc.CONF)
        for future in admin.create_topics([NewTopic("big", parts, 1)]).values():
            future.result()
        broker = psutil.Process(proc.pid)
        filler = Producer({**fc.CONF, "linger.ms": 0, "batch.num.messages": 1})
        for n in range(fill):
            filler.produce("big", b"x" * 200, partition=n % parts)
            filler.flush()  # one record per produce request, so one per batch
        cpu, got = tail(broker, Producer({**fc.CONF, "linger.ms": 5}), parts, wait_ms=wait_ms)
        print(
            f"{fill} one-record batches over {parts} partitions, fetch wait {wait_ms} ms: serving 300/s at the end: "
            f"broker {cpu:.1f} % of a core ({got} read)",
            flush=True,
        )
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    for parts, fill in [(4, 0), (16, 0), (64, 0), (4, 180_000), (16, 180_000), (64, 180_000)]:
        run(parts, fill)


if __name__ == "__main__":
    main()
