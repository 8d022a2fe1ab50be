"""Bare aiokafka consumer of interactions: mean (receive - CreateTime) per 4 s window."""
import asyncio, time, sys, uuid
from aiokafka import AIOKafkaConsumer, TopicPartition

async def main():
    c = AIOKafkaConsumer(bootstrap_servers="127.0.0.1:9092", group_id=None, enable_auto_commit=False, fetch_max_wait_ms=100, auto_offset_reset="latest")
    await c.start()
    parts = c.partitions_for_topic("interactions") or set()
    while not parts:
        await asyncio.sleep(0.5); parts = c.partitions_for_topic("interactions") or set()
    tps = [TopicPartition("interactions", p) for p in parts]
    c.assign(tps); await c.seek_to_end(*tps)
    window, lat, sizes = time.time(), [], []
    while True:
        got = await c.getmany(timeout_ms=200, max_records=10000)
        now = time.time()
        n = 0
        for tp, msgs in got.items():
            for m in msgs:
                lat.append(now - m.timestamp / 1000); n += 1
        if n: sizes.append(n)
        if now - window >= 4:
            if lat:
                lat.sort(); print(f"{time.strftime('%H:%M:%S')} n={len(lat)} mean={1000*sum(lat)/len(lat):.0f} p50={1000*lat[len(lat)//2]:.0f} p99={1000*lat[int(len(lat)*0.99)]:.0f} getmany_batches={len(sizes)} mean_size={sum(sizes)/max(1,len(sizes)):.0f}", flush=True)
            window, lat, sizes = now, [], []
asyncio.run(main())
