"""Offline evaluation, exactly as ../shared/EVAL.md says: a prequential leave-last-out replay.

The sorted interaction stream is walked once. State (interaction counts, a trailing window,
every user's distinct history, the user-item pairs behind item co-occurrence) grows one row at
a time; when the walk reaches a target row, every method scores every published item from the
state *before* that row, and the target's rank is recorded. Content methods rank with the
profile and ranking code of `streams.profile` (`mean_profile`, `Ranker`), the code the stream
processor runs.

Adding a method is one function `(state, target) -> scores over stream.item_ids` (higher is
better) and one entry in `METHODS`. A method that defines a fallback returns
`lexicographic(primary, fallback)`; the ranker breaks the remaining ties by item_id.
"""


from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from streams.profile import Ranker
from streams.rank import RankConfig
from streams.variants import Variant
from vlm4rec.evaluation.blas import single_threaded_blas
from vlm4rec.extras import MissingExtra, require
from vlm4rec.evaluation.methods import BLEND_STRATEGIES, METHODS, Scorer, method_of
from vlm4rec.evaluation.stream import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, ContentIndex, DEFAULT_IS, DEFAULT_STRATEGY, KS, LATER_VISIT_S, Stream, StreamState, Target, WINDOW_DAYS, previous_ts, select_targets

log = logging.getLogger(__name__)

# --- the walk ----------------------------------------------------------------------------


def states(
    stream: Stream, content_indexes: Mapping[str, ContentIndex], window_days: float = WINDOW_DAYS
) -> Iterator[tuple[StreamState, Target]]:
    """Walk the stream once; at each target, yield the state just before it (every earlier row,
    same-ts rows included: EVAL.md step 4) and the target."""
    state = StreamState(stream, content_indexes, window_days)
    previous = previous_ts(stream)
    for row in select_targets(stream).tolist():
        state.advance(row)
        item, ts = int(stream.items[row]), float(stream.ts[row])
        state.at(ts)
        later = bool(ts - previous[row] > LATER_VISIT_S)  # a target always has earlier rows
        yield state, Target(row, int(stream.users[row]), item, ts, cold=bool(state.counts[item] == 0), later=later)


def recommend(
    state: StreamState, target: Target, method: str, ranker: Ranker, k: int = max(KS), scorer: Scorer | None = None
) -> list[str]:
    """The method's top k for the target: items published up to and including the target's ts,
    the user's own history excluded, ties by item_id (the `Ranker`). A stateful method passes
    its walk's `scorer`."""
    stream = state.stream
    candidates = stream.published_at <= target.ts
    history = state.history[target.user]
    k = min(k, int(candidates.sum()) - int(candidates[history].sum()))
    score = scorer if scorer is not None else METHODS[method].scorer(stream, state.content)
    scores = np.where(candidates, score(state, target), -np.inf)
    return [item_id for item_id, _ in ranker.top_k(scores, k, [stream.item_ids[i] for i in history])]


@dataclass
class MethodResult:
    ranks: list[int]  # per target: 1-based rank in the top 20, 0 when not in it
    recommended: set[str]  # distinct items in any top 10
    tops: list[list[str]] = field(default_factory=list)  # per target: the top 10 (for subsets' coverage)


def walk(
    stream: Stream,
    methods: Sequence[str],
    content_indexes: Mapping[str, ContentIndex],
    window_days: float = WINDOW_DAYS,
    progress: bool = False,
    variants: Sequence[Variant] = (),
    rank: RankConfig | None = None,
) -> tuple[list[Target], dict[str, MethodResult]]:
    """Every target scored by every method (`variant:NAME` methods from `variants`); the
    product's blend ranks with `rank` (default: `RankConfig()`)."""
    ranker = Ranker(stream.item_ids)
    shared: dict[str, Any] = {"rank": rank or RankConfig()}
    scorers = {m: method_of(m, variants, shared["rank"]).scorer(stream, content_indexes, shared) for m in methods}
    results = {m: MethodResult([], set()) for m in methods}
    targets: list[Target] = []
    n_targets = len(select_targets(stream)) if progress else None
    walked = tqdm(states(stream, content_indexes, window_days), total=n_targets, desc="score", unit="target", disable=not progress)
    for state, target in walked:
        targets.append(target)
        wanted = stream.item_ids[target.item]
        for name in methods:
            top = recommend(state, target, name, ranker, scorer=scorers[name])
            results[name].ranks.append(top.index(wanted) + 1 if wanted in top else 0)
            results[name].recommended.update(top[: KS[0]])
            results[name].tops.append(top[: KS[0]])
    return targets, results


def bootstrap_resamples(n_targets: int, n: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """(n, n_targets) indices of targets drawn with replacement: one fixed set, shared by every
    method, so that their intervals are comparable."""
    return np.random.default_rng(seed).integers(0, n_targets, size=(n, n_targets))


def summarise(
    ranks: Sequence[int], targets: Sequence[Target], recommended: set[str], published: int, resamples: np.ndarray
) -> dict[str, Any]:
    """EVAL.md's metrics for one method: over all targets, the cold ones and the later visits
    (None for a subset without targets)."""
    cold = np.array([t.cold for t in targets], dtype=bool)
    later = np.array([t.later for t in targets], dtype=bool)
    rank = np.asarray(ranks, dtype=np.float64)
    hits = {k: (rank > 0) & (rank <= k) for k in KS}  # per target
    gains = {k: np.where(hits[k], 1.0 / np.log2(np.maximum(rank, 1) + 1), 0.0) for k in KS}
    out: dict[str, Any] = {}
    for k in KS:
        out[f"HR@{k}"] = float(hits[k].mean())
        out[f"NDCG@{k}"] = float(gains[k].mean())
    hit10 = hits[10].astype(np.float64)
    out["coverage@10"] = len(recommended) / published
    low, high = np.percentile(hit10[resamples].mean(axis=1), [2.5, 97.5])
    out["HR@10_ci"] = [float(low), float(high)]
    out["HR@10_cold"] = float(hit10[cold].mean()) if cold.any() else None
    out["HR@10_later"] = float(hit10[later].mean()) if later.any() else None
    out["NDCG@10_later"] = float(gains[10][later].mean()) if later.any() else None
    ordered = ["HR@10", "NDCG@10", "HR@20", "NDCG@20", "coverage@10", "HR@10_ci", "HR@10_cold", "HR@10_later", "NDCG@10_later"]
    return {key: out[key] for key in ordered}


def _changed(rank: RankConfig) -> dict[str, Any]:
    """The ranker's settings that differ from the defaults, so that a report says what ran."""
    defaults = dataclasses.asdict(RankConfig())
    return {key: value for key, value in dataclasses.asdict(rank).items() if value != defaults[key]}


def evaluate(
    stream: Stream,
    methods: Sequence[str],
    content_indexes: Mapping[str, ContentIndex],
    window_days: float = WINDOW_DAYS,
    progress: bool = False,
    variants: Sequence[Variant] = (),
    rank: RankConfig | None = None,
    partitions: int = 1,
) -> dict[str, Any]:
    """The report of issue 5: {"dataset", "targets", "cold_targets", "later_targets", "default",
    "methods"};
    when `default` runs, also "blend_by_strategy": the same blend with each other embedding
    strategy at hand as its semantic source (issue 6), on the same targets; with `variants`,
    "variants": `default` ranked with each ranking variant's serving settings, on the same
    targets (the offline side of the online per-variant hit rates); "rank_settings": the
    ranker's settings that differ from `RankConfig()`'s (`rank`: the stream processor's, from
    the environment); with `partitions` above 1, "partitioned": `default` when each of that
    many stream processors learns from its own partitions' users only
    (`vlm4rec.evaluation.partitioned`)."""
    compared = [s for s in BLEND_STRATEGIES if s in content_indexes] if "default" in methods else []
    extra = [f"blend:{s}" for s in compared if s != DEFAULT_STRATEGY] + [f"variant:{v.name}" for v in variants]
    with single_threaded_blas():
        targets, results = walk(stream, list(methods) + extra, content_indexes, window_days, progress, variants, rank)
    if not targets:
        raise ValueError(f"{stream.name}: no user has a target (a last interaction after 2 others, not a repeat)")
    published = int((stream.published_at <= targets[-1].ts).sum())
    resamples = bootstrap_resamples(len(targets))

    def summary(name: str) -> dict[str, Any]:
        return summarise(results[name].ranks, targets, results[name].recommended, published, resamples)

    report: dict[str, Any] = {
        "dataset": stream.name,
        "targets": len(targets),
        "cold_targets": sum(t.cold for t in targets),
        "later_targets": sum(t.later for t in targets),
        "default": DEFAULT_IS,
        "rank_settings": _changed(rank or RankConfig()),
        "methods": {m: summary(m) for m in methods},
    }
    if compared:
        report["blend_by_strategy"] = {
            s: report["methods"]["default"] if s == DEFAULT_STRATEGY else summary(f"blend:{s}") for s in compared
        }
    if variants:
        report["variants"] = {v.name: {"share": v.share, "overrides": dict(v.overrides), **summary(f"variant:{v.name}")} for v in variants}
    if partitions > 1 and "default" in methods:
        from vlm4rec.evaluation.partitioned import partitioned_ranks

        with single_threaded_blas():
            ranks, recommended = partitioned_ranks(stream, partitions, content_indexes, walk, window_days, rank)
        report["partitioned"] = {
            "partitions": partitions,
            **summarise([ranks[t.row] for t in targets], targets, recommended, published, resamples),
        }
    return report


# --- output ------------------------------------------------------------------------------


def _metric_rows(first_column: str, methods: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """A Markdown table of the report's metrics, one row per method."""

    def num(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    lines = [
        f"| {first_column} | HR@10 | HR@10 95% CI | NDCG@10 | HR@20 | NDCG@20 | coverage@10 | HR@10 cold | HR@10 later | NDCG@10 later |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in methods.items():
        low, high = m["HR@10_ci"]
        lines.append(
            f"| {name} | {num(m['HR@10'])} | {num(low)}–{num(high)} | {num(m['NDCG@10'])} | "
            f"{num(m['HR@20'])} | {num(m['NDCG@20'])} | {num(m['coverage@10'])} | {num(m['HR@10_cold'])} | "
            f"{num(m.get('HR@10_later'))} | {num(m.get('NDCG@10_later'))} |"
        )
    return lines


def markdown_table(report: Mapping[str, Any]) -> str:
    lines = [
        f"{report['dataset']}: {report['targets']} targets, {report['cold_targets']} cold, "
        f"{report.get('later_targets', 'n/a')} later visits (> 1 h after the user's previous "
        f"interaction) (`default` = `{report['default']}`)",
        "",
        *_metric_rows("method", report["methods"]),
    ]
    if report.get("rank_settings"):
        lines[1:1] = ["", f"The ranker's settings that differ from its defaults (VLM4REC_RANK_*): {json.dumps(report['rank_settings'])}"]
    if report.get("blend_by_strategy"):
        lines += [
            "",
            "The blend with each embedding strategy as its semantic source (`default` uses "
            f"`{DEFAULT_STRATEGY}`):",
            "",
            *_metric_rows("semantic source", report["blend_by_strategy"]),
        ]
    if report.get("partitioned"):
        part = report["partitioned"]
        lines += [
            "",
            f"`default` when each of {part['partitions']} stream processors learns from its own partitions' users only, on the same targets:",
            "",
            *_metric_rows("learnt from", {"the whole stream": report["methods"]["default"], f"1/{part['partitions']} of the users each": part}),
        ]
    if report.get("variants"):
        lines += [
            "",
            "`default` with each ranking variant's serving settings (VLM4REC_RANK_VARIANTS), on all targets:",
            "",
            *_metric_rows("variant", {f"{n} {json.dumps(v['overrides']) if v['overrides'] else '(no overrides)'}": v
                                      for n, v in report["variants"].items()}),
        ]
    return "\n".join(lines) + "\n"


def plot(report: Mapping[str, Any], path: Path) -> None:
    """HR@10 of every method with its 95% bootstrap interval."""
    require("matplotlib", "measure", "the chart of `vlm4rec eval`").use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["methods"])
    values = np.array([report["methods"][n]["HR@10"] for n in names])
    ci = np.array([report["methods"][n]["HR@10_ci"] for n in names]).reshape(-1, 2)
    errors = np.stack([values - ci[:, 0], ci[:, 1] - values])
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(names), 4.0))
    ax.bar(names, values, yerr=errors, capsize=4, color="#4c72b0")
    ax.set_ylabel("HR@10 (95% bootstrap CI)")
    ax.set_title(f"{report['dataset']}: {report['targets']} targets, {report['cold_targets']} cold")
    ax.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(report: Mapping[str, Any], out: Path) -> tuple[Path, Path | None]:
    """`out` (JSON), and beside it the Markdown table (.md) and the chart (.png; None, with a
    warning that says how to install it, without matplotlib: the figures are in the other two)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    table, chart = out.with_suffix(".md"), out.with_suffix(".png")
    table.write_text(markdown_table(report))
    try:
        plot(report, chart)
    except MissingExtra as exc:
        log.warning("no chart: %s", exc)
        return table, None
    return table, chart
