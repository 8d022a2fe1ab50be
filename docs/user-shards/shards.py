"""Quality on ten smaller streams of real users: `vlm4rec eval --user-shard I/10` for each shard
of a dataset, then the hits of every method (and ranking variant) summed over the shards.

Why: ml100k has few targets on items nobody had touched (13 of 943), the held-out MovieLens set
of issue 19 has 14 %; a tenth of ml100k's users is a stream of the same real users and items in
which 9-16 % of the targets are such new items (128 of 943 over the ten shards). Summing
the ten gives as many targets as the whole dataset, with ten times its new-item targets.

Run (about 15 minutes with every content method, 5 with `default` alone; embeddings cached):
    .venv/bin/python docs/user-shards/shards.py ../shared/data/ml100k OUT_DIR [eval options]
e.g. `--methods default,text,image,describe,fused,item_knn`, or `--methods default --variants`
with VLM4REC_RANK_VARIANTS set. Writes OUT_DIR/shard-I.json (and .md) and OUT_DIR/summary.md."""

import json
import pathlib
import subprocess
import sys

SHARDS = 10


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    dataset, out, options = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3:]
    out.mkdir(parents=True, exist_ok=True)
    vlm4rec = pathlib.Path(sys.executable).with_name("vlm4rec")
    for shard in range(SHARDS):
        report = out / f"shard-{shard}.json"
        command = [str(vlm4rec), "eval", dataset, "--user-shard", f"{shard}/{SHARDS}", "--out", str(report), *options]
        print(f"shard {shard}/{SHARDS}: {' '.join(command[1:])}", flush=True)
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        (out / f"shard-{shard}.png").unlink(missing_ok=True)  # ten charts say less than the sum
    summary = summarise([json.loads((out / f"shard-{n}.json").read_text()) for n in range(SHARDS)])
    (out / "summary.md").write_text(summary)
    print(summary)


def summarise(reports: list[dict]) -> str:
    """Hits (not rates) summed over the shards, per method and variant: all targets at 10 and
    20, NDCG@10 summed, and the new-item ("cold") targets at 10."""
    targets = sum(r["targets"] for r in reports)
    cold = sum(r["cold_targets"] for r in reports)
    totals: dict[str, list[float]] = {}
    for report in reports:
        n, c = report["targets"], report["cold_targets"]
        rows = {**report["methods"], **{f"variant {name}": m for name, m in report.get("variants", {}).items()}}
        for name, m in rows.items():
            t = totals.setdefault(name, [0.0, 0.0, 0.0, 0.0])
            t[0] += m["HR@10"] * n
            t[1] += m["NDCG@10"] * n
            t[2] += m["HR@20"] * n
            t[3] += m["HR@10_cold"] * c
    lines = [
        f"{len(reports)} user shards of {reports[0]['dataset']}: {targets} targets, {cold} of them on new items",
        "",
        "| method | hits@10 | HR@10 | NDCG@10 | HR@20 | new-item hits@10 |",
        "|---|---|---|---|---|---|",
    ]
    for name, (hits, ndcg, hits20, cold_hits) in totals.items():
        lines.append(f"| {name} | {round(hits)} | {hits / targets:.3f} | {ndcg / targets:.3f} | {hits20 / targets:.3f} | {round(cold_hits)} of {cold} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
