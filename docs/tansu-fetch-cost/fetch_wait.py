"""Does a longer fetch wait make the embedded broker's fetches cheaper?

The same partition (20,000 one-record batches, as `partitions.py` fills it) read at its end at
300 records a second with a consumer fetch wait of 25, 100 and 500 ms.
Run: .venv/bin/python docs/tansu-fetch-cost/fetch_wait.py (about 2 minutes); output in
docs/tansu-fetch-cost/fetch_wait.txt."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import partitions


def main() -> None:
    for wait_ms in (25, 100, 500):
        partitions.run(1, 20_000, wait_ms)


if __name__ == "__main__":
    main()
