"""Does the blend find fresh targets that content finds, on a stream where users often take them?

A small stream like the held-out case of issue 19: 400 items with random unit vectors, 30 users
walking hidden chains over 100 of them, and 15 % of the time taking instead one of the three
untouched items nearest their profile (so content finds new items well, not perfectly). The
first 900 rows are fed to the ranker (`vlm4rec bench`-free: `BlendRanker` with the tests'
`Replay`), then each of the last 300 is ranked just before it is fed. Printed per seed: targets
found in the first ten, all and fresh (nobody had touched the item), by the blend under each
tail rule and by content alone (cosine to the profile over the items the user has not taken).
Run: .venv/bin/python docs/fresh-mix/fresh_mix.py (about a minute); output beside it."""

import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from test_rank import FAST, Replay

from streams.profile import mean_profile
from streams.rank import BlendRanker, RankConfig
from streams.recommend import StoreContent, VectorCache
from vectorstore import MemoryVectorStore, VectorRecord

ITEMS, DIM, USERS, STEPS, KNOWN = 400, 16, 30, 40, 100


def stream(seed: int, fresh_share: float = 0.15) -> tuple[StoreContent, np.ndarray, list[tuple[str, str, float]], set[int]]:
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(ITEMS, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [f"m{n:03d}" for n in range(ITEMS)]
    store = MemoryVectorStore()
    store.open(DIM, "fresh-mix", "text")
    store.upsert([VectorRecord(i, v) for i, v in zip(ids, vectors, strict=True)])
    successor = dict(zip(range(KNOWN), rng.permutation(KNOWN).tolist(), strict=True))
    at = {u: int(rng.integers(KNOWN)) for u in range(USERS)}
    history: dict[int, dict[int, None]] = {u: {} for u in range(USERS)}  # distinct, as a profile's
    untouched = set(range(KNOWN, ITEMS))
    rows, fresh, ts = [], set(), 1_700_000_000.0
    for _ in range(STEPS):
        for u in range(USERS):
            ts += 60.0
            if history[u] and rng.random() < fresh_share:
                profile = mean_profile(vectors[list(history[u])])
                near = sorted(untouched, key=lambda n: -float(vectors[n] @ profile))[:3]
                item = near[int(rng.integers(3))]
                untouched.discard(item)
                fresh.add(len(rows))
            else:
                item = at[u] = successor[at[u]]
            history[u].pop(item, None)
            history[u][item] = None
            rows.append((f"u{u}", ids[item], ts))
    return StoreContent(store, VectorCache(store)), vectors, rows, fresh


#: the rankings compared: (name, `RankConfig` overrides)
RULES = (
    ("fixed rule", {"tail_rule": "fixed"}),
    ("earned rule without content's picks", {"tail_rule": "earned", "content_picks": False}),
    ("earned rule (default)", {"tail_rule": "earned"}),
    ("calibrated rule", {"tail_rule": "calibrated"}),
)


def main() -> None:
    for seed in (2, 5):
        found, fresh_n = [], 0
        for name, overrides in RULES:
            content, vectors, rows, fresh = stream(seed)
            replay = Replay(BlendRanker(RankConfig(**{**FAST.__dict__, "content_k": 150, **overrides})), content)
            cut = len(rows) - 300
            replay.feed(rows[:cut])
            ids = [f"m{n:03d}" for n in range(ITEMS)]
            counts = {"blend": [0, 0], "content": [0, 0]}
            for n in range(cut, len(rows)):
                user, item, ts = rows[n]
                request = replay.request(user, ts)
                blend = [i for i, _ in replay.ranker.rank([request], content, 10)[0]]
                seen = set(request.history)
                by_content = [] if request.profile is None else [ids[j] for j in np.argsort(-(vectors @ request.profile)) if ids[j] not in seen][:10]
                for kind, top in (("blend", blend), ("content", by_content)):
                    counts[kind][0] += item in top
                    counts[kind][1] += n in fresh and item in top
                replay.feed([rows[n]])
            ranker = replay.ranker
            picks = ranker.picks[ranker.config.tail_rule].kept() if ranker.config.tail_rule in ranker.picks and ranker.config.content_picks else 0
            found.append(f"blend, {name} {counts['blend'][0]} ({counts['blend'][1]} fresh; {ranker.tail_places(10)} places earned, {picks} of content's picks kept)")
            fresh_n = sum(n >= cut for n in fresh)
        print(f"seed {seed}: of 300 targets ({fresh_n} fresh) found in the first ten: " + "; ".join(found)
              + f"; content alone {counts['content'][0]} ({counts['content'][1]} fresh)", flush=True)


if __name__ == "__main__":
    main()
