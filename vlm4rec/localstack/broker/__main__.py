"""`python -m vlm4rec.localstack.broker --port 9092`: the embedded broker on its own."""

from __future__ import annotations

import argparse
import asyncio
import logging

from vlm4rec.localstack.broker.server import Broker, Retention


def main(argv: list[str] | None = None) -> None:
    defaults = Retention()
    parser = argparse.ArgumentParser(
        prog="python -m vlm4rec.localstack.broker",
        description="The local stack's Kafka-protocol broker: memory only, one node, consumer groups, "
        "idempotent producers, compacted topics, and retention that follows what the groups have read.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on and advertise (default %(default)s)")
    parser.add_argument("--port", type=int, default=9092, help="port (default %(default)s)")
    parser.add_argument("--partitions", type=int, default=1, help="partitions of an auto-created topic (default %(default)s)")
    parser.add_argument("--min-age-s", type=float, default=defaults.min_age_s,
                        help="records every reading group has committed past go once this old (default %(default)s)")
    parser.add_argument("--retention-s", type=float, default=defaults.retention_s,
                        help="records go once this old, read or not, as Kafka's retention.ms (default %(default)s)")
    parser.add_argument("--retention-mb", type=float, default=defaults.retention_bytes / 2**20,
                        help="a partition keeps at most this many MB, as Kafka's retention.bytes (default %(default)s)")
    parser.add_argument("--group-idle-s", type=float, default=defaults.group_idle_s,
                        help="a group without members holds records this long after its last commit (default %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    retention = Retention(
        min_age_s=args.min_age_s, retention_s=args.retention_s,
        retention_bytes=int(args.retention_mb * 2**20), group_idle_s=args.group_idle_s,
    )
    try:
        asyncio.run(Broker(args.host, args.port, args.partitions, retention).serve())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
