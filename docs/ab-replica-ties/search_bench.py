# Replica search micro-benchmark (docs/streaming.md): python search_bench.py CHECKOUT_DIR
"""Replica search on hm's real duplicate structure: 17k items, 256 queries, k=64."""
import sys, time, numpy as np
sys.path.insert(0, sys.argv[1])
from vectorstore import MemoryVectorStore, ReplicaVectorStore, VectorRecord
import vectorstore.replica as rep
print(rep.__file__)
rng = np.random.default_rng(0)
base = rng.standard_normal((12000, 384)).astype(np.float32)
rows = np.concatenate([base, base[rng.choice(12000, 5000)]])  # 5,000 exact duplicates, as hm's repeated pictures
store = MemoryVectorStore(); store.open(384, "m", "text")
store.upsert([VectorRecord(f"i{n:05d}", v) for n, v in enumerate(rows)])
replica = ReplicaVectorStore(store); replica.load()
queries = rows[rng.choice(len(rows), 256)] + 0.05 * rng.standard_normal((256, 384)).astype(np.float32)
out = replica.search(queries, 64)
best = []
for rep_ in range(7):
    t = time.perf_counter(); out = replica.search(queries, 64); best.append(time.perf_counter() - t)
print(f"search 256 x 17000, k=64: median {1000*sorted(best)[3]:.1f} ms")
import hashlib; print(hashlib.md5(repr(out).encode()).hexdigest())
