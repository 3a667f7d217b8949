"""Statistics and outputs of a benchmark run: intervals, per-condition summaries, Markdown, JSON, a plot.

Pure functions over the rows of results.jsonl (dicts), except the writers at the bottom.
The unit of the statistics is the passage: a condition's accuracy on one passage is the mean over its
samples (never the best of them), and the table's mean and intervals are over passages.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

Z_95 = 1.96
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
INTERVALS_NOTE = (
    "95 % intervals over passages: normal = mean ± 1.96·sd/√n (sample sd); "
    f"bootstrap = 2.5th–97.5th percentile of {BOOTSTRAP_RESAMPLES:,} resampled means (seed {BOOTSTRAP_SEED})"
)


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def sample_sd(values: Sequence[float]) -> float:
    """Standard deviation with n - 1 in the denominator; NaN below two values."""
    if len(values) < 2:
        return math.nan
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def normal_interval(values: Sequence[float], z: float = Z_95) -> tuple[float, float]:
    """mean ± z·sd/√n; NaN ends below two values (no spread to estimate)."""
    m, sd = mean(values), sample_sd(values)
    half = z * sd / math.sqrt(len(values)) if values else math.nan
    return m - half, m + half


def bootstrap_interval(
    values: Sequence[float],
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile interval of the mean from `resamples` seeded resamples with replacement."""
    import numpy as np

    if len(values) < 2:
        return math.nan, math.nan  # as the normal interval: one passage has no spread to resample
    data = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, len(data), size=(resamples, len(data)))].mean(axis=1)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


@dataclass(frozen=True)
class Plan:
    """What a complete passage of one condition looks like: its rows carry this digest and these samples."""

    name: str
    label: str
    digest: str
    samples: int
    self_edits: bool
    policy: str = ""


@dataclass
class ConditionSummary:
    name: str
    label: str
    passages: int
    accuracy: float
    normal_95: tuple[float, float]
    bootstrap_95: tuple[float, float]
    seconds_per_passage: float
    edit_chars: float
    edit_lines: float
    samples_per_passage: int
    policy: str = ""
    per_passage: dict[int, float] = field(default_factory=dict)


def passage_accuracies(rows: Iterable[dict[str, Any]], plan: Plan) -> dict[int, list[dict[str, Any]]]:
    """The rows of each passage on which `plan` is complete (all its samples in, with its digest)."""
    by_passage: dict[int, dict[int, dict[str, Any]]] = defaultdict(dict)
    for row in rows:
        if row["condition"] == plan.name and row["digest"] == plan.digest:
            by_passage[row["passage"]][row["sample"]] = row
    return {
        p: [samples[s] for s in range(plan.samples)]
        for p, samples in sorted(by_passage.items())
        if all(s in samples for s in range(plan.samples))
    }


def summarize(rows: Sequence[dict[str, Any]], plan: Plan) -> ConditionSummary:
    complete = passage_accuracies(rows, plan)
    # The mean over a passage's samples: every sample counts, the best one gets no say of its own.
    per_passage = {p: mean([r["accuracy"] for r in rs]) for p, rs in complete.items()}
    values = list(per_passage.values())
    all_rows = [r for rs in complete.values() for r in rs]
    seconds = [
        sum(r["generation_seconds"] + r["train_seconds"] + r["eval_seconds"] for r in rs)
        for rs in complete.values()
    ]
    return ConditionSummary(
        name=plan.name,
        label=plan.label,
        passages=len(values),
        accuracy=mean(values),
        normal_95=normal_interval(values),
        bootstrap_95=bootstrap_interval(values),
        seconds_per_passage=mean(seconds),
        edit_chars=mean([r["edit_chars"] for r in all_rows]) if plan.self_edits else math.nan,
        edit_lines=mean([r["edit_lines"] for r in all_rows]) if plan.self_edits else math.nan,
        samples_per_passage=plan.samples,
        policy=plan.policy,
        per_passage=per_passage,
    )


def summarize_multidoc(row: dict[str, Any], name: str, label: str) -> ConditionSummary:
    """One multi-document row: one adapter, scored per passage; the interval is over its passages."""
    per_passage = {int(p["passage"]): float(p["accuracy"]) for p in row["per_passage"]}
    values = list(per_passage.values())
    return ConditionSummary(
        name=name,
        label=label,
        passages=len(values),
        accuracy=mean(values),
        normal_95=normal_interval(values),
        bootstrap_95=bootstrap_interval(values),
        seconds_per_passage=(row["generation_seconds"] + row["train_seconds"] + row["eval_seconds"])
        / max(1, len(values)),
        edit_chars=row["edit_chars"] if row["self_edits"] else math.nan,
        edit_lines=row["edit_lines"] if row["self_edits"] else math.nan,
        samples_per_passage=1,
        per_passage=per_passage,
    )


@dataclass
class PairedDifference:
    """A row against a baseline row on the passages both finished: the mean of per-passage differences."""

    name: str
    label: str
    against: str
    passages: int
    difference: float
    bootstrap_95: tuple[float, float]


def paired_difference(row: ConditionSummary, baseline: ConditionSummary) -> PairedDifference:
    """Paired over passages, so passage difficulty (the largest spread here) cancels out of the interval."""
    shared = sorted(set(row.per_passage) & set(baseline.per_passage))
    diffs = [row.per_passage[p] - baseline.per_passage[p] for p in shared]
    return PairedDifference(
        row.name, row.label, baseline.name, len(diffs), mean(diffs), bootstrap_interval(diffs)
    )


# --- rendering ---------------------------------------------------------------------------------------


def _pct(value: float) -> str:
    return "–" if math.isnan(value) else f"{100 * value:.1f} %"


def _interval(bounds: tuple[float, float]) -> str:
    low, high = bounds
    return "–" if math.isnan(low) else f"{100 * low:.1f}–{100 * high:.1f}"


def _number(value: float, digits: int = 0) -> str:
    return "–" if math.isnan(value) else f"{value:,.{digits}f}"


def markdown_table(summaries: Sequence[ConditionSummary], title: str, notes: Sequence[str] = ()) -> str:
    """The results table: one row per condition, intervals named in the header."""
    lines = [f"## {title}", "", *notes, "", f"{INTERVALS_NOTE}.", ""]
    lines.append(
        "| condition | accuracy | 95 % CI (normal) | 95 % CI (bootstrap) | passages | samples each "
        "| self-edit chars | self-edit lines | s per passage |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for s in summaries:
        lines.append(
            f"| {s.label} | {_pct(s.accuracy)} | {_interval(s.normal_95)} | {_interval(s.bootstrap_95)} "
            f"| {s.passages} | {s.samples_per_passage} | {_number(s.edit_chars)} | {_number(s.edit_lines, 1)} "
            f"| {_number(s.seconds_per_passage, 1)} |"
        )
    return "\n".join(lines) + "\n"


def paired_table(diffs: Sequence[PairedDifference], baseline_label: str) -> str:
    """The teacher's rounds against its untrained self, paired by passage."""
    lines = [
        f"### Against {baseline_label}, paired by passage",
        "",
        "| condition | difference (points) | 95 % CI (bootstrap, paired) | passages |",
        "|---|---|---|---|",
    ]
    for d in diffs:
        diff = "–" if math.isnan(d.difference) else f"{100 * d.difference:+.1f}"
        lines.append(f"| {d.label} | {diff} | {_interval(d.bootstrap_95)} | {d.passages} |")
    return "\n".join(lines) + "\n"


def summary_dict(summary: ConditionSummary) -> dict[str, Any]:
    """JSON-ready (NaN becomes null, passage keys become strings)."""
    data = asdict(summary)
    return _nan_to_none(data)


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {str(k): _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_nan_to_none(v) for v in value]
    return value


def write_text_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a reader (or a crash) never sees half a table."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, data: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(_nan_to_none(data), indent=2, ensure_ascii=False) + "\n")


def write_plot(
    summaries: Sequence[ConditionSummary], path: Path, title: str, rounds: Sequence[str] = ()
) -> None:
    """Accuracy per condition with normal-interval error bars; with `rounds` (condition names in order),
    a second panel of accuracy per teacher round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_name = {s.name: s for s in summaries}
    round_rows = [by_name[n] for n in rounds if n in by_name]
    panels = 2 if len(round_rows) > 1 else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 + 4 * panels, 5), squeeze=False)
    _bars(axes[0][0], summaries, title)
    if panels == 2:
        _rounds(axes[0][1], round_rows)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _errors(rows: Sequence[ConditionSummary]) -> tuple[list[float], list[list[float]]]:
    values = [0.0 if math.isnan(s.accuracy) else 100 * s.accuracy for s in rows]
    low = [
        0.0 if math.isnan(s.normal_95[0]) else max(0.0, v - 100 * s.normal_95[0])
        for s, v in zip(rows, values, strict=True)
    ]
    high = [
        0.0 if math.isnan(s.normal_95[1]) else max(0.0, 100 * s.normal_95[1] - v)
        for s, v in zip(rows, values, strict=True)
    ]
    return values, [low, high]


def _bars(ax: Any, rows: Sequence[ConditionSummary], title: str) -> None:
    values, errors = _errors(rows)
    ax.bar(range(len(rows)), values, yerr=errors, capsize=4, color="#4c72b0")
    ax.set_xticks(range(len(rows)), [f"{s.label}\n(n={s.passages})" for s in rows], rotation=30, ha="right")
    ax.set_ylim(0, 100)
    ax.set_ylabel("accuracy (%), 95 % CI over passages")
    ax.set_title(title)


def _rounds(ax: Any, rows: Sequence[ConditionSummary]) -> None:
    values, errors = _errors(rows)
    ax.errorbar(range(len(rows)), values, yerr=errors, marker="o", capsize=4)
    ax.set_xticks(range(len(rows)), [s.label for s in rows], rotation=30, ha="right")
    ax.set_ylim(0, 100)
    ax.set_ylabel("accuracy (%)")
    ax.set_title("accuracy per round (teacher policy)")
