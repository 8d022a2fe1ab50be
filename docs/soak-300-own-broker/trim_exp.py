"""RSS of partition logs under churn (20,000 batches of 0.6-3 KB appended per round, the last 2,000 of each of 8 partitions kept), with and without `malloc_trim`: `python trim_exp.py none|trim`."""
import os, random, sys
import psutil
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from vlm4rec.localstack.broker.partition_log import PartitionLog, split_batches
from vlm4rec.localstack.broker import server
proc = psutil.Process()
rss = lambda: proc.memory_info().rss / 1e6
random.seed(1)
blobs = []
for n in range(200):
    b = DefaultRecordBatchBuilder(2, 0, 0, -1, -1, -1, 1 << 30)
    b.append(0, timestamp=1, key=b"k", value=os.urandom(random.randint(600, 3000)), headers=[])
    blobs.append(split_batches(bytes(b.build()))[0])
logs = [PartitionLog() for _ in range(8)]
print("start", round(rss(), 1))
for rnd in range(40):
    for i in range(20000):
        logs[i % 8].append(*blobs[random.randrange(200)])
    for log in logs:  # keep the last 2,000 batches of each, as retention would
        if len(log.bases) > 2000:
            log.trim(log.bases[-2000])
    if rnd % 10 == 9:
        held = sum(l.bytes_held for l in logs) / 1e6
        before = rss()
        if sys.argv[1] == "trim":
            server._return_freed_memory()
        print(rnd, "held", round(held, 1), "rss", round(before, 1), "after", round(rss(), 1))
