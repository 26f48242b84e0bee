"""Markdown report with the paper's table layout and figures.

Input: one summary dict per (method, harmful ratio, seed) run:

    method (or variant)   str     row label
    harmful_ratio         float   p in [0, 1]; 0 is the paper's "clean" column
    seed                  int     optional, default 0
    hs_after              float   HS after the fine-tuning attack (percent)
    hs_before             float   optional, HS of the aligned model before the attack
    fa                    float   optional, Finetune Accuracy after the attack (percent)
    judge (or judge_name) str     which judge produced the HS
    task                  str     optional, fine-tuning task (sst2, agnews, ...)
    curve (or curves)     list    optional, [{step, harmful_loss, hs}] during the attack

Table: rows = method, columns = HS per ratio, HS avg, FA avg. "avg" is the
mean over the ratio columns (as the paper's HS avg averages clean, 0.05 ...
0.2). With several seeds a cell is mean ± sample std (ddof=1) over seeds; the
avg's std is over per-seed averages (seeds that have every ratio). Runs with
different judges or tasks get separate tables: their numbers don't compare.

Paired section: each variant against ``sft`` (or the pairs asked for), seed by seed, with the per-seed
differences, the bootstrap intervals, the sign test and a plot with one line per seed from A to B
(``booster_jax.eval.paired``; per-prompt verdicts from the run directory's ``eval/*/samples.jsonl``).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from booster_jax import files
from booster_jax.errors import BoosterInputError
from booster_jax.eval.judges import judge_note

DASH = "–"


@dataclass
class _Run:
    method: str
    ratio: float
    seed: object
    hs_after: float
    hs_before: float | None
    fa: float | None
    judge: str
    task: str
    curve: list[dict] = field(default_factory=list)


def _num(summary: Mapping, key: str, i: int, required: bool) -> float | None:
    value = summary.get(key)
    if value is None:
        if required:
            raise BoosterInputError(f"run summary {i}: missing required field {key!r}")
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise BoosterInputError(f"run summary {i}: field {key!r} must be a number, got {value!r}") from None
    if math.isnan(value) and required:
        raise BoosterInputError(f"run summary {i}: field {key!r} is NaN")
    return None if math.isnan(value) else value


def _parse_curve(raw, i: int) -> list[dict]:
    if raw is None:
        return []
    if not isinstance(raw, Sequence) or isinstance(raw, (str, bytes)):
        raise BoosterInputError(f"run summary {i}: field 'curve' must be a list of {{step, harmful_loss, hs}}")
    points = []
    for j, p in enumerate(raw):
        if not isinstance(p, Mapping) or p.get("step") is None:
            raise BoosterInputError(f"run summary {i}: curve point {j} needs a 'step'")
        where = f"{i} curve point {j}"
        points.append(
            {
                "step": _num(p, "step", where, True),
                "harmful_loss": _num(p, "harmful_loss", where, False),
                "hs": _num(p, "hs", where, False),
            }
        )
    return points


def _parse(summaries) -> list[_Run]:
    if summaries is None or len(summaries) == 0:
        raise BoosterInputError("report: no run summaries given (expected a non-empty list of dicts)")
    runs, seen = [], set()
    for i, s in enumerate(summaries):
        if not isinstance(s, Mapping):
            raise BoosterInputError(f"run summary {i}: expected a dict, got {type(s).__name__}")
        method = s.get("method") or s.get("variant")
        if not isinstance(method, str) or not method:
            raise BoosterInputError(f"run summary {i}: missing 'method' (or 'variant') name")
        ratio = _num(s, "harmful_ratio", i, True)
        if not 0.0 <= ratio <= 1.0:
            raise BoosterInputError(f"run summary {i}: harmful_ratio must be in [0, 1], got {ratio}")
        run = _Run(
            method=method,
            ratio=ratio,
            seed=s.get("seed", 0),
            hs_after=_num(s, "hs_after", i, True),
            hs_before=_num(s, "hs_before", i, False),
            fa=_num(s, "fa", i, False),
            judge=str(s.get("judge") or s.get("judge_name") or "unknown"),
            task=str(s.get("task") or ""),
            curve=_parse_curve(s.get("curve", s.get("curves")), i),
        )
        key = (run.task, run.judge, run.method, run.ratio, run.seed)
        if key in seen:
            raise BoosterInputError(
                f"run summary {i}: duplicate run (method={method}, harmful_ratio={ratio:g}, "
                f"seed={run.seed}, judge={run.judge}, task={run.task or '-'})"
            )
        seen.add(key)
        runs.append(run)
    return runs


def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample std (ddof=1); std is None with fewer than two values."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def _fmt(mean: float | None, std: float | None = None) -> str:
    if mean is None:
        return DASH
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def _ratio_label(r: float) -> str:
    return "clean" if r == 0 else f"p={r:g}"


def _groups(runs: list[_Run]) -> dict[tuple[str, str], list[_Run]]:
    """(task, judge) -> runs, in first-appearance order."""
    out: dict[tuple[str, str], list[_Run]] = {}
    for r in runs:
        out.setdefault((r.task, r.judge), []).append(r)
    return out


def _methods(runs: list[_Run]) -> list[str]:
    return list(dict.fromkeys(r.method for r in runs))


def _avg_stats(runs: list[_Run], metric: str, ratios: list[float]) -> tuple[float | None, float | None]:
    """avg over ratio columns of the per-cell means; std over per-seed averages."""
    cells = defaultdict(list)
    per_seed = defaultdict(dict)
    for r in runs:
        v = getattr(r, metric)
        if v is not None:
            cells[r.ratio].append(v)
            per_seed[r.seed][r.ratio] = v
    if not cells:
        return None, None
    mean = sum(sum(v) / len(v) for v in cells.values()) / len(cells)
    seed_avgs = [sum(d.values()) / len(d) for d in per_seed.values() if set(d) == set(cells)]
    std = _mean_std(seed_avgs)[1] if len(seed_avgs) >= 2 else None
    return mean, std


def method_stats(summaries) -> dict:
    """Numbers behind the table: {(task, judge): {method: {...}}}.

    Per method: 'hs' {ratio: (mean, std|None, n)}, 'fa' likewise, 'hs_avg' and
    'fa_avg' (mean, std|None), 'hs_before' (mean, std|None) over seeds,
    'complete' (has every ratio of its table), 'seeds' (count).
    """
    out = {}
    for gkey, runs in _groups(_parse(summaries)).items():
        ratios = sorted({r.ratio for r in runs})
        table = {}
        for m in _methods(runs):
            mr = [r for r in runs if r.method == m]
            entry = {"hs": {}, "fa": {}}
            for ratio in ratios:
                for metric in ("hs_after", "fa"):
                    vals = [getattr(r, metric) for r in mr if r.ratio == ratio and getattr(r, metric) is not None]
                    if vals:
                        entry["hs" if metric == "hs_after" else "fa"][ratio] = (*_mean_std(vals), len(vals))
            entry["hs_avg"] = _avg_stats(mr, "hs_after", ratios)
            entry["fa_avg"] = _avg_stats(mr, "fa", ratios)
            before = defaultdict(list)
            for r in mr:
                if r.hs_before is not None:
                    before[r.seed].append(r.hs_before)
            entry["hs_before"] = (
                _mean_std([sum(v) / len(v) for v in before.values()]) if before else (None, None)
            )
            entry["complete"] = set(entry["hs"]) == set(ratios)
            entry["seeds"] = len({r.seed for r in mr})
            table[m] = entry
        out[gkey] = {"ratios": ratios, "methods": table}
    return out


def _judge_line(judge: str) -> str:
    note = judge_note(judge)
    line = f"Judge: `{judge}`"
    if note:
        line += f" — {note}"
    if "keyword" in judge.lower():
        line = "**Warning (cheap signal):** " + line
    return line + "."


def _table_md(gkey, group) -> str:
    task, judge = gkey
    ratios, methods = group["ratios"], group["methods"]
    header = ["method", "seeds"] + [f"HS {_ratio_label(r)}" for r in ratios] + ["HS avg", "FA avg"]
    lines = [
        "| " + " | ".join(header) + " |",
        "|---|---:|" + "---:|" * (len(ratios) + 2),
    ]
    incomplete = False
    for m, e in methods.items():
        cells = [_fmt(*e["hs"][r][:2]) if r in e["hs"] else DASH for r in ratios]
        mark = "" if e["complete"] else " †"
        incomplete |= not e["complete"]
        lines.append(
            "| "
            + " | ".join([m, str(e["seeds"])] + cells + [_fmt(*e["hs_avg"]) + mark, _fmt(*e["fa_avg"])])
            + " |"
        )
    title = "### " + (f"Task `{task}`, " if task else "Results, ") + f"judge `{judge}`"
    notes = [
        _judge_line(judge),
        "HS = harmful score after the attack (%, lower is better); FA = finetune accuracy (%). "
        "avg = mean over the ratio columns; with several seeds: mean ± sample std (ddof=1) over seeds.",
    ]
    if incomplete:
        notes.append("† averaged over the ratios this method has, not all columns.")
    return "\n".join([title, "", *lines, "", "\n\n".join(notes)])


def format_table(summaries) -> str:
    """Markdown table(s) in the paper's layout, one per (task, judge), with the judge named."""
    stats = method_stats(summaries)
    return "\n\n".join(_table_md(g, grp) for g, grp in stats.items()) + "\n"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


def _plot_vs_ratio(group, path: Path, title: str) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global backend state, Agg canvas

    has_fa = any(e["fa"] for e in group["methods"].values())
    fig = Figure(figsize=(10 if has_fa else 5.5, 4))
    axes = fig.subplots(1, 2 if has_fa else 1, squeeze=False)[0]
    for ax, key, ylabel in zip(axes, ("hs", "fa"), ("Harmful score (%)", "Finetune accuracy (%)")):
        for m, e in group["methods"].items():
            pts = sorted(e[key].items())
            if not pts:
                continue
            xs = [r for r, _ in pts]
            ys = [v[0] for _, v in pts]
            errs = [v[1] or 0.0 for _, v in pts]
            ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=m)
        _label_axis(ax, "harmful ratio p", ylabel)
        _percent_axis(ax)
        _ratio_axis(ax, sorted({r for e in group["methods"].values() for r in e[key]}))
    _save(fig, title, path)
    return fig


def _percent_axis(ax) -> None:
    """Percentages on a fixed 0-100 scale: a constant series is not blown up to fill the plot."""
    ax.set_ylim(-3, 103)


def _ratio_axis(ax, ratios: list[float]) -> None:
    """Ticks at the measured ratios; a single ratio gets a readable window instead of +-0.004."""
    if not ratios:
        return
    ax.set_xticks(ratios)
    span = max(ratios) - min(ratios)
    pad = max(0.05, 0.08 * span)
    ax.set_xlim(min(ratios) - pad, max(ratios) + pad)


def _mean_curve(curves: list[list[dict]], key: str) -> tuple[list[float], list[float]]:
    by_step = defaultdict(list)
    for c in curves:
        for p in c:
            if p[key] is not None:
                by_step[p["step"]].append(p[key])
    steps = sorted(by_step)
    return steps, [sum(by_step[s]) / len(by_step[s]) for s in steps]


def _plot_curves(runs: list[_Run], ratio: float, path: Path, title: str) -> None:
    """Paper Fig. 3 style: harmful training loss (and HS) over the attack's steps."""
    from matplotlib.figure import Figure

    by_method = defaultdict(list)
    for r in runs:
        if r.ratio == ratio and r.curve:
            by_method[r.method].append(r.curve)
    has_hs = any(p["hs"] is not None for cs in by_method.values() for c in cs for p in c)
    fig = Figure(figsize=(10 if has_hs else 5.5, 4))
    axes = fig.subplots(1, 2 if has_hs else 1, squeeze=False)[0]
    for ax, key, ylabel in zip(axes, ("harmful_loss", "hs"), ("Harmful training loss", "Harmful score (%)")):
        for m, curves in by_method.items():
            xs, ys = _mean_curve(curves, key)
            if xs:
                ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=f"{m} (n={len(curves)})")
        _label_axis(ax, "fine-tuning (attack) step", ylabel)
        if key == "hs":
            _percent_axis(ax)
    _save(fig, title, path)


def _label_axis(ax, xlabel: str, ylabel: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _save(fig, title: str, path: Path) -> None:
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")


def summary_warnings(summaries) -> list[str]:
    """The evaluations' warnings (e.g. a scorer that found no answer in most rows), each once, in order."""
    seen = []
    for s in summaries:
        for w in s.get("warnings") or []:
            if w not in seen:
                seen.append(w)
    return seen


def _plot_paired(cells, a: str, b: str, path: Path, title: str) -> None:
    _paired_figure(cells, a, b, title).savefig(path, dpi=110, format="png")


def _paired_figure(cells, a: str, b: str, title: str):
    """One panel per harmful ratio: a line per seed from its A score to its B score, and the mean in black;
    the panel's title holds the mean difference, the primary interval and the verdict (or why it is withheld).
    A seed keeps one colour in every panel, and the legend lists every seed of any panel (panels may hold
    different seeds: a design with more seeds at one ratio)."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    seeds = sorted({s for c in cells for s in c.seeds})
    colour = {s: f"C{i % 10}" for i, s in enumerate(seeds)}
    fig = Figure(figsize=(1.6 + 3.4 * len(cells), 4.2))
    axes = fig.subplots(1, len(cells), squeeze=False)[0]
    for ax, c in zip(axes, cells):
        for s, x, y in zip(c.seeds, c.a, c.b):
            ax.plot([0, 1], [x, y], marker="o", alpha=0.7, color=colour[s], label=f"seed {s}")
        ax.plot([0, 1], [sum(c.a) / len(c.a), sum(c.b) / len(c.b)], color="black", lw=3, marker="s", label="mean")
        lo, hi = c.primary
        ax.set_title(f"p = {c.ratio:g}: B - A {c.mean:+.1f}\n95% CI [{lo:+.1f}, {hi:+.1f}] "
                     f"({'seeds, prompts' if c.ci_prompts else 'seeds only'})"
                     + (f"\n{c.verdict}" if c.verdict else ""), fontsize=9)
        ax.set_xticks([0, 1], [a, b])
        ax.set_xlim(-0.25, 1.25)
        ax.set_ylabel("Post-attack harmful score (%)")
        ax.grid(alpha=0.3)
        _percent_axis(ax)
    handles = [Line2D([], [], color=colour[s], marker="o", alpha=0.7) for s in seeds]
    handles.append(Line2D([], [], color="black", lw=3, marker="s"))
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1 - 1.3 / fig.get_figwidth(), 1))
    fig.legend(handles, [f"seed {s}" for s in seeds] + ["mean"], loc="center right", fontsize=8)
    return fig


def default_pairs(methods: list[str], reference: str = "sft") -> list[tuple[str, str]]:
    """The study's comparison: every variant against the SFT reference, when the grid has one."""
    return [(reference, m) for m in methods if m != reference] if reference in methods else []


def _paired_md(runs: list[_Run], pairs, run_dirs, out: Path, suffix: str, label: str, min_seeds: int) -> list[str]:
    """The paired section (table, intervals, sign test, plot) for each (A, B) with ``min_seeds`` seeds that
    have both at some ratio."""
    from booster_jax.eval import paired

    rows = [{"method": r.method, "seed": r.seed, "harmful_ratio": r.ratio, "hs_after": r.hs_after, "fa": r.fa}
            for r in runs]
    methods = _methods(runs)
    md = []
    for a, b in pairs:
        if a not in methods or b not in methods:
            continue
        cells = paired.compare(rows, a, b, run_dirs)
        if not cells or max(len(c.seeds) for c in cells) < min_seeds:
            continue
        md += [f"### Paired: {b} - {a} ({label})", "", paired.format_paired(cells, a, b), ""]
        path = write_paired_plot(cells, a, b, out, suffix, label)
        if path:
            md += [f"![paired {a} -> {b}]({path.name})", ""]
    return md


def write_paired_plot(cells, a: str, b: str, out_dir, suffix: str, label: str) -> Path | None:
    """The paired plot of the post-attack HS cells as ``out_dir/paired_<A>_<B><suffix>.png`` (report.md's and
    ``studies --paired --plot``'s); None when no cell is HS."""
    hs = [c for c in cells if c.metric == "hs"]
    if not hs:
        return None
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    path = Path(out_dir) / f"paired_{_slug(a)}_{_slug(b)}{suffix}.png"
    _plot_paired(hs, a, b, path, f"Paired by seed: {a} -> {b} ({label})")
    return path


def missing_notes(summaries) -> list[str]:
    """One line per (field, reason) of the numbers the runs could not measure (null in summaries.json, a
    dash in the table), naming the runs: a reader should not have to guess what the null means."""
    runs_by_reason: dict[tuple[str, str], list[str]] = {}
    for s in summaries:
        for key, why in (s.get("missing") or {}).items():
            run = f"{s.get('method') or s.get('variant')} seed {s.get('seed', 0)} p={float(s['harmful_ratio']):g}"
            runs_by_reason.setdefault((key, why), []).append(run)
    return [f"`{key}` is missing (null in summaries.json) for {', '.join(runs)}: {why}."
            for (key, why), runs in runs_by_reason.items()]


def write_report(summaries, out_dir, paired=None, run_dirs=None) -> Path:
    """Write ``report.md`` and PNG figures into ``out_dir``; return the Markdown path.

    ``paired``: (A, B) variant pairs to compare seed by seed (default: every variant against ``sft``, where
    they share two seeds or more: a single-seed grid gets no paired section); the per-prompt verdicts are
    looked up under ``run_dirs`` (default: ``out_dir``, the run directory)."""
    runs = _parse(summaries)
    stats = method_stats(summaries)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups = _groups(runs)
    several = len(groups) > 1
    md = ["# Booster-JAX results", ""]
    warnings = summary_warnings(summaries)
    if warnings:
        md += ["## WARNINGS", ""] + [f"- **{w}**" for w in warnings] + [""]
    missing = missing_notes(summaries)
    if missing:
        md += ["## Missing values", ""] + [f"- {line}" for line in missing] + [""]
    for gkey, group in stats.items():
        task, judge = gkey
        suffix = "".join(f"_{_slug(t)}" for t in (task, judge) if t) if several else ""
        label = (f"task {task}, " if task else "") + f"judge {judge}"
        md += [_table_md(gkey, group), ""]
        before = [(m, e["hs_before"]) for m, e in group["methods"].items() if e["hs_before"][0] is not None]
        if before:
            md += ["HS of the aligned model before the attack (same judge):", "",
                   "| method | HS before |", "|---|---:|"]
            md += [f"| {m} | {_fmt(*v)} |" for m, v in before] + [""]
        fig_path = out / f"hs_fa_vs_ratio{suffix}.png"
        _plot_vs_ratio(group, fig_path, f"HS / FA vs harmful ratio ({label})")
        md += [f"![HS and FA against harmful ratio]({fig_path.name})", ""]
        curve_ratios = sorted({r.ratio for r in groups[gkey] if r.curve})
        for ratio in curve_ratios:
            cpath = out / f"attack_curves{suffix}_p{ratio:g}.png"
            _plot_curves(groups[gkey], ratio, cpath, f"During the attack, p={ratio:g} ({label})")
            md += [
                f"Harmful training loss{' and HS' if any(p['hs'] is not None for r in groups[gkey] for p in r.curve) else ''} "
                f"over the attack's steps, p = {ratio:g} (paper Fig. 3 style; mean over seeds):",
                "",
                f"![attack curves p={ratio:g}]({cpath.name})",
                "",
            ]
        pairs = default_pairs(list(group["methods"])) if paired is None else paired
        md += _paired_md(groups[gkey], pairs, [str(out)] if run_dirs is None else run_dirs, out, suffix, label,
                         min_seeds=2 if paired is None else 1)
    path = out / "report.md"
    files.write_text_atomic(str(path), "\n".join(md))
    return path
