"""Does the blend find fresh targets that content finds, on a stream where users often take them?

A small stream like the held-out case of issue 19: 400 items with random unit vectors, 30 users
walking hidden chains over 100 of them, and 15 % of the time taking instead one of the three
untouched items nearest their profile (so content finds new items well, not perfectly). The
first 900 rows are fed to the ranker (`vlm4rec bench`-free: `BlendRanker` with the tests'
`Replay`; the stream is `tests/test_fresh_slots.py`'s `fresh_mix`), then each of the last 300 is ranked just before it is fed. Printed per seed: targets
found in the first ten, all and fresh (nobody had touched the item), by the blend under each
tail rule and by content alone (cosine to the profile over the items the user has not taken).
Run: .venv/bin/python docs/fresh-mix/fresh_mix.py (about a minute); output beside it."""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from test_fresh_slots import fresh_mix_found


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
            counts, ranker, fresh_n = fresh_mix_found(seed, overrides)
            rule = ranker.config.tail_rule
            picks = ranker.picks[rule].kept() if rule in ranker.picks and ranker.config.content_picks else 0
            found.append(f"blend, {name} {counts['blend'][0]} ({counts['blend'][1]} fresh; {ranker.tail_places(10)} places earned, {picks} of content's picks kept)")
        print(f"seed {seed}: of 300 targets ({fresh_n} fresh) found in the first ten: " + "; ".join(found)
              + f"; content alone {counts['content'][0]} ({counts['content'][1]} fresh)", flush=True)


if __name__ == "__main__":
    main()
