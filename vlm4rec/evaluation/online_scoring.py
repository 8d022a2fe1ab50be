"""How the pushes of an online evaluation are scored against the offline methods on the same
targets: ranks in each target user's last push, the paired bootstrap of the difference, the
reasons they can differ, the per-variant rows and their Markdown."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from topics import Recs
from streams.variants import Assignment, Variant
from vlm4rec.evaluation.evaluate import MethodResult, bootstrap_resamples, summarise
from vlm4rec.evaluation.stream import KS, Stream, Target
from vlm4rec.settings import Settings

if TYPE_CHECKING:  # the waiting lives with the run (online_eval), which imports this module
    from vlm4rec.evaluation.online_eval import Quiescence

# --- scoring and agreement ---------------------------------------------------------------


@dataclass
class OnlineScore:
    ranks: list[int]  # per target: 1-based rank in the push's top 20, 0 when not in it
    recommended: set[str] = field(default_factory=set)
    tops: list[list[str]] = field(default_factory=list)  # per target: the push's top 10 (none: no push)
    pushed: int = 0  # targets whose user had a push
    k: Counter = field(default_factory=Counter)  # push lengths
    triggers: Counter = field(default_factory=Counter)
    future_share: float = 0.0  # of the pushed top-10 items: published after the target's ts
    unpublished_share: float = 0.0  # of them: not in the dataset's catalogue at all


def score_pushes(stream: Stream, targets: Sequence[Target], pushes: Mapping[str, Recs]) -> OnlineScore:
    score = OnlineScore([])
    index = {item_id: n for n, item_id in enumerate(stream.item_ids)}
    future = unknown = shown = 0
    for target in targets:
        recs = pushes.get(stream.user_ids[target.user])
        if recs is None:
            score.ranks.append(0)
            score.tops.append([])
            continue
        top = [r.item_id for r in recs.items][: max(KS)]
        wanted = stream.item_ids[target.item]
        score.ranks.append(top.index(wanted) + 1 if wanted in top else 0)
        score.recommended.update(top[: KS[0]])
        score.tops.append(top[: KS[0]])
        score.pushed += 1
        score.k[len(recs.items)] += 1
        score.triggers[recs.trigger] += 1
        for item_id in top[: KS[0]]:
            shown += 1
            n = index.get(item_id)
            if n is None:
                unknown += 1
            elif stream.published_at[n] > target.ts:
                future += 1
    score.future_share = future / shown if shown else 0.0
    score.unpublished_share = unknown / shown if shown else 0.0
    return score


def hits10(ranks: Sequence[int]) -> np.ndarray:
    rank = np.asarray(ranks)
    return ((rank > 0) & (rank <= 10)).astype(np.float64)


def agreement(
    online: Sequence[int], online_summary: Mapping[str, Any], offline: Mapping[str, Sequence[int]],
    offline_summaries: Mapping[str, Mapping[str, Any]], resamples: np.ndarray,
) -> dict[str, Any]:
    """Per offline method: is online HR@10 inside its 95% interval, and the paired bootstrap
    interval (the same resamples of the same targets) of online minus offline HR@10. They
    agree when that interval contains 0."""
    out: dict[str, Any] = {}
    on = hits10(online)
    for name, ranks in offline.items():
        diff = on - hits10(ranks)
        low, high = np.percentile(diff[resamples].mean(axis=1), [2.5, 97.5])
        ci = offline_summaries[name]["HR@10_ci"]
        out[name] = {
            "offline_HR@10": offline_summaries[name]["HR@10"],
            "offline_HR@10_ci": ci,
            "online_HR@10": online_summary["HR@10"],
            "online_in_offline_ci": bool(ci[0] <= online_summary["HR@10"] <= ci[1]),
            "difference": float(diff.mean()),
            "difference_ci": [float(low), float(high)],
            "agree": bool(low <= 0.0 <= high),
            "same_top10_hit": float((on == hits10(ranks)).mean()),
        }
    return out


def explain(
    report: Mapping[str, Any], score: OnlineScore, quiet: Quiescence, settings: Settings, n_targets: int
) -> list[str]:
    """Reasons the online figures can differ from the offline ones, with this run's numbers."""
    reasons = []
    if score.future_share > 0:
        reasons.append(
            f"{score.future_share:.1%} of the pushed top-10 items were published after their target's ts: "
            "phase 1 replays every non-target row, so the online catalogue (and other users' interactions, "
            "which feed popularity and fan-out) includes the future; offline candidates stop at the target's ts"
        )
    if score.unpublished_share > 0:
        reasons.append(f"{score.unpublished_share:.1%} of the pushed top-10 items are not in this dataset's catalogue (a stack that was not fresh)")
    if score.pushed < n_targets:
        reasons.append(f"{n_targets - score.pushed} of {n_targets} target users got no push (scored as misses)")
    if quiet.behind:
        reasons.append(
            f"{len(quiet.behind)} target users had not applied all their rows when the stack went quiet "
            "(interactions on items that were never embedded stay pending; rows lost in the stack would show here too)"
        )
    short = sum(n for k, n in score.k.items() if k < max(KS))
    if short or settings.streams_k < max(KS):
        reasons.append(f"pushes carry VLM4REC_STREAMS_K = {settings.streams_k} items; {short} pushes had fewer than {max(KS)} (HR@20 counts only what was pushed)")
    if score.triggers.get("fresh_item"):
        reasons.append(
            f"{score.triggers['fresh_item']} last pushes were fresh-item fan-outs (trigger fresh_item), "
            "recomputed after later items arrived"
        )
    reasons.append(
        f"the stack ranks with its own item space (VLM4REC_EMBED_STRATEGY = {settings.embed_strategy}) and "
        "approximate/online state (recency, decayed popularity for users without a profile vector); "
        "the offline methods rank exactly from the state just before the target"
    )
    return reasons


def by_variant(
    stream: Stream, targets: Sequence[Target], variants: Sequence[Variant], score: OnlineScore,
    offline: Mapping[str, MethodResult], published: int,
) -> dict[str, Any]:
    """Per ranking variant, on the targets of its users: the online figures of the pushes and
    the offline figures of `default` with the variant's settings (`variant:NAME`)."""
    assignment = Assignment(variants)
    out: dict[str, Any] = {}
    for v in variants:
        chosen = [n for n, t in enumerate(targets) if assignment.of(stream.user_ids[t.user]).name == v.name]
        entry: dict[str, Any] = {"share": v.share, "overrides": dict(v.overrides), "targets": len(chosen)}
        if chosen:
            subset = [targets[n] for n in chosen]
            resamples = bootstrap_resamples(len(chosen))
            result = offline[f"variant:{v.name}"]
            entry["online"] = summarise([score.ranks[n] for n in chosen], subset, {i for n in chosen for i in score.tops[n]}, published, resamples)
            entry["offline"] = summarise([result.ranks[n] for n in chosen], subset, {i for n in chosen for i in result.tops[n]}, published, resamples)
        out[v.name] = entry
    return out


def markdown_variants(report: Mapping[str, Any]) -> str:
    """The per-variant table of an online report (empty without variants)."""
    if not report.get("by_variant"):
        return ""
    lines = [
        "", "Per ranking variant, on the targets of its users (online: the pushes; offline: `default` with the variant's settings):", "",
        "| variant | overrides | targets | online HR@10 | offline HR@10 (95% CI) | online HR@20 | offline HR@20 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, v in report["by_variant"].items():
        if "online" not in v:
            lines.append(f"| {name} | {json.dumps(v['overrides'])} | 0 | n/a | n/a | n/a | n/a |")
            continue
        on, off = v["online"], v["offline"]
        lo, hi = off["HR@10_ci"]
        lines.append(
            f"| {name} | {json.dumps(v['overrides'])} | {v['targets']} | {on['HR@10']:.3f} | {off['HR@10']:.3f} ({lo:.3f}–{hi:.3f}) | "
            f"{on['HR@20']:.3f} | {off['HR@20']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def markdown_agreement(report: Mapping[str, Any]) -> str:
    lines = [
        "", "Online vs offline on the same targets (HR@10; paired bootstrap of the difference):", "",
        "| offline method | offline HR@10 (95% CI) | online HR@10 | online − offline (95% CI) | agree |",
        "|---|---|---|---|---|",
    ]
    for name, a in report["agreement"]["methods"].items():
        lo, hi = a["offline_HR@10_ci"]
        dlo, dhi = a["difference_ci"]
        lines.append(
            f"| {name} | {a['offline_HR@10']:.3f} ({lo:.3f}–{hi:.3f}) | {a['online_HR@10']:.3f} | "
            f"{a['difference']:+.3f} ({dlo:+.3f} to {dhi:+.3f}) | {'yes' if a['agree'] else 'no'} |"
        )
    lines += ["", "Why they can differ:", *[f"- {r}" for r in report["agreement"]["reasons"]]]
    return "\n".join(lines) + "\n"
