"""Paired comparison of two variants (B - A) over seeds, as the study's pre-registration asks.

The primary endpoint is the paired difference of post-attack HS, B minus A, per harmful ratio:

- per seed, d_s = HS_B(s) - HS_A(s); the point estimate is their mean (every seed weighs the same);
- a 95 % percentile interval from a two-level (hierarchical) bootstrap: resample the seeds with
  replacement, then within each drawn seed resample its evaluation prompts with replacement -- the
  *same* prompt indices for A and B (both are evaluated on one prompt list), i.e. the per-prompt
  differences b_i - a_i are resampled -- and recompute the mean paired difference;
- the same interval from the seeds alone (secondary; the fallback when per-prompt verdicts are missing);
- a two-sided exact sign test over seeds (ties dropped), computed with ``math.comb``.

The bootstrap is reproducible: ``numpy.random.default_rng(rng_seed)`` (default seed 0) and a fixed number
of resamples (default 10,000); the interval is ``numpy.quantile`` (linear interpolation) of the resampled
means at (1 - level) / 2 and (1 + level) / 2.

The pure statistics take plain lists; ``compare`` assembles them from a study's runs and the evaluation
directories' ``samples.jsonl`` (``<run dir>/eval/<variant>-s<seed>-p<ratio>/``, as ``pipeline`` writes them).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from booster_jax import files
from booster_jax.errors import BoosterInputError

N_RESAMPLES = 10_000
RNG_SEED = 0
LEVEL = 0.95


# ---------------------------------------------------------------- pure statistics

def paired_differences(a: Mapping, b: Mapping) -> tuple[list, list[float], list, list]:
    """Per seed present in both, ``b[seed] - a[seed]``; returns (seeds, differences, seeds only in a,
    seeds only in b), each sorted by seed. A seed with one variant only cannot be paired: it is left out."""
    both = sorted(a.keys() & b.keys())
    return (both, [float(b[s]) - float(a[s]) for s in both], sorted(a.keys() - b.keys()),
            sorted(b.keys() - a.keys()))


def sign_test_p(diffs: Sequence[float], tie: float = 1e-9) -> float:
    """Two-sided exact sign test: the chance under H0 (each non-tied seed is + or - with probability 1/2)
    of a split at least as uneven as the observed one. Differences within ``tie`` of 0 are dropped;
    with no seed left the test says nothing (p = 1)."""
    pos = sum(d > tie for d in diffs)
    neg = sum(d < -tie for d in diffs)
    n = pos + neg
    if n == 0:
        return 1.0
    k = min(pos, neg)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def _interval(means: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def seed_bootstrap_ci(diffs: Sequence[float], n_resamples: int = N_RESAMPLES, rng_seed: int = RNG_SEED,
                      level: float = LEVEL) -> tuple[float, float]:
    """Percentile interval of the mean of ``diffs`` (one per seed) over resamples of the seeds with replacement."""
    d = np.asarray(diffs, dtype=float)
    if d.size == 0:
        raise BoosterInputError("seed_bootstrap_ci: no paired seeds")
    rng = np.random.default_rng(rng_seed)
    picks = rng.integers(0, d.size, size=(n_resamples, d.size))
    return _interval(d[picks].mean(axis=1), level)


def hierarchical_bootstrap_ci(prompt_diffs: Sequence[Sequence[float]], n_resamples: int = N_RESAMPLES,
                              rng_seed: int = RNG_SEED, level: float = LEVEL) -> tuple[float, float]:
    """Percentile interval of the mean over seeds of the mean per-prompt paired difference, resampling seeds
    with replacement and then, within each drawn seed (each copy anew), its prompts with replacement.

    ``prompt_diffs[s]`` holds seed s's per-prompt differences b_i - a_i (e.g. 100 * (flagged_B - flagged_A)),
    so one resampled index list serves both variants. Resampling n prompts of a seed with replacement is
    drawn as multinomial counts over its distinct difference values (the same distribution as n uniform
    indices, and cheap when the verdicts are 0/1)."""
    groups = [np.asarray(x, dtype=float) for x in prompt_diffs]
    if not groups:
        raise BoosterInputError("hierarchical_bootstrap_ci: no paired seeds")
    if any(g.size == 0 for g in groups):
        raise BoosterInputError("hierarchical_bootstrap_ci: a seed has no prompts")
    k = len(groups)
    rng = np.random.default_rng(rng_seed)
    picks = rng.integers(0, k, size=(n_resamples, k))
    totals = np.zeros(n_resamples)
    for s, x in enumerate(groups):
        rows = np.nonzero(picks == s)[0]  # one entry per drawn copy of seed s
        if rows.size == 0:
            continue
        values, counts = np.unique(x, return_counts=True)
        draws = rng.multinomial(x.size, counts / x.size, size=rows.size)
        np.add.at(totals, rows, draws @ values / x.size)
    return _interval(totals / k, level)


def verdict(lo: float, hi: float) -> str:
    """For a lower-is-better endpoint (HS), B - A: the interval below 0 means B protects."""
    if hi < 0:
        return "protects"
    if lo > 0:
        return "harms"
    return "no evidence either way"


# ---------------------------------------------------------------- a study's runs and samples

# metric -> (summary field, samples.jsonl kind, per-row field, label, has a verdict: an interval below 0 means
# B protects). Over-refusal is lower-is-better too, but "protects" is HS's word: it gets intervals, no verdict.
METRICS = {"hs": ("hs_after", "harmful", "flagged", "post-attack HS", True),
           "fa": ("fa", "task", "correct", "post-attack FA", False),
           "refused": ("refused_after", "benign", "refused", "post-attack over-refusal", False)}


def samples_path(run_dir: str, method: str, seed, ratio: float) -> str:
    """Where ``pipeline`` writes the attack cell's per-prompt verdicts (``eval/<variant>-s<seed>-p<p>``)."""
    if os.path.isfile(run_dir):  # a summaries.json given instead of its directory
        run_dir = os.path.dirname(run_dir) or "."
    return os.path.join(run_dir, "eval", f"{method}-s{seed}-p{ratio:g}", "samples.jsonl")


def read_rows(path: str, kind: str) -> list[dict]:
    """The rows of ``kind`` ("harmful", "benign", "task") of a samples.jsonl, in file order."""
    return [row for _, row in files.read_jsonl_strict(path) if row.get("kind") == kind]


def read_verdicts(path: str, kind: str, key: str) -> tuple[list[str], list[float]] | None:
    """(prompts, 0/1 verdicts) of the rows of ``kind`` in a samples.jsonl; None when the rows carry no
    verdict (an evaluation judged elsewhere, e.g. AlpacaEval) or there are none."""
    rows = read_rows(path, kind)
    if not rows or any(row.get(key) is None for row in rows):
        return None
    return [row.get("prompt") for row in rows], [100.0 * bool(row[key]) for row in rows]


# The per-prompt verdicts of one samples.jsonl: ``read_verdicts`` or a substitute with its signature (e.g. the
# harmful answers re-judged at fewer tokens, booster_jax/eval/rejudge.py).
VerdictReader = Callable[[str, str, str], "tuple[list[str], list[float]] | None"]


@dataclass
class PairedCell:
    """The paired comparison of one metric at one harmful ratio."""
    ratio: float
    metric: str
    seeds: list
    a: list[float]
    b: list[float]
    diffs: list[float]
    mean: float
    ci_seeds: tuple[float, float]
    ci_prompts: tuple[float, float] | None  # the hierarchical interval; None when per-prompt verdicts are missing
    sign: tuple[int, int, int, float]        # (#B - A > 0, #< 0, #ties, two-sided p)
    notes: list[str] = field(default_factory=list)
    missing: list = field(default_factory=list)  # seeds expected (or run by one variant) but not paired here

    @property
    def primary(self) -> tuple[float, float]:
        return self.ci_prompts or self.ci_seeds

    @property
    def verdict(self) -> str | None:
        """The pre-registered reading of the interval, withheld while seeds are missing, and marked when only the
        seed-level interval exists (the per-prompt one is the pre-registered test)."""
        if not METRICS[self.metric][4]:
            return None
        if self.missing:
            return f"withheld: seed{'s' if len(self.missing) > 1 else ''} {', '.join(map(str, self.missing))} missing"
        v = verdict(*self.primary)
        return v if self.ci_prompts else f"{v} (seeds-only interval)"


def compare(runs: list[dict], a: str, b: str, run_dirs: Sequence[str] = (),
            metrics: Sequence[str] = ("hs", "fa", "refused"), n_resamples: int = N_RESAMPLES,
            rng_seed: int = RNG_SEED, level: float = LEVEL, reader: VerdictReader = read_verdicts,
            expect: Mapping[float, Sequence] | None = None) -> list[PairedCell]:
    """B - A per harmful ratio (every ratio where both variants ran) and metric, from the runs' summaries
    and, where every paired seed has them, the per-prompt verdicts under ``run_dirs`` as ``reader`` gives them
    (the stored ones by default; a substitute's verdicts must average to the runs' numbers, which the caller
    then replaces too). ``expect``: ratio -> the seeds a design calls for there; the verdict is withheld at a
    ratio while one of them is not paired (a seed run by one variant only withholds it too)."""
    methods = {r["method"] for r in runs}
    for name in (a, b):
        if name not in methods:
            raise BoosterInputError(f"--paired: no variant {name!r} in the study (it has {', '.join(sorted(methods))})")
    expect = {float(p): list(seeds) for p, seeds in (expect or {}).items()}
    cells = []
    for ratio in sorted({float(r["harmful_ratio"]) for r in runs} | set(expect)):
        at = [r for r in runs if abs(float(r["harmful_ratio"]) - ratio) < 1e-9]
        for metric in metrics:
            cell = _compare_cell(at, a, b, ratio, metric, run_dirs, n_resamples, rng_seed, level, reader,
                                 expect.get(ratio, ()))
            if cell is not None:
                cells.append(cell)
    return cells


def unpaired_ratios(runs: list[dict], a: str, b: str, cells: Sequence[PairedCell],
                    expect: Mapping[float, Sequence] | None = None) -> list[str]:
    """One line per harmful ratio that has runs (or expected seeds) but no paired cell: which variants ran there."""
    shown = {c.ratio for c in cells}
    out = []
    for ratio in sorted({float(r["harmful_ratio"]) for r in runs} | {float(p) for p in (expect or {})}):
        if ratio in shown:
            continue
        ran = sorted({r["method"] for r in runs if abs(float(r["harmful_ratio"]) - ratio) < 1e-9} & {a, b})
        out.append(f"p = {ratio:g}: no seed has both {a} and {b} (ran: {', '.join(ran) or 'neither'}): not compared")
    return out


def _values(runs: list[dict], method: str, key: str) -> dict:
    out = {}
    for r in runs:
        v = r.get(key)
        if r["method"] == method and v is not None and not math.isnan(float(v)):
            out[r["seed"]] = float(v)
    return out


def _compare_cell(runs, a, b, ratio, metric, run_dirs, n_resamples, rng_seed, level,
                  reader: VerdictReader = read_verdicts, expected: Sequence = ()) -> PairedCell | None:
    key, kind, row_key, label, _ = METRICS[metric]
    va, vb = _values(runs, a, key), _values(runs, b, key)
    seeds, diffs, only_a, only_b = paired_differences(va, vb)
    if not seeds:
        return None
    notes = [f"seed {s} has only {name} at p = {ratio:g}: skipped" for name, only in ((a, only_a), (b, only_b))
             for s in only]
    absent = [s for s in expected if s not in seeds and s not in only_a and s not in only_b]
    if absent:
        notes.append(f"p = {ratio:g}: the design expects seed{'s' if len(absent) > 1 else ''} "
                     f"{', '.join(map(str, absent))}, not in the study")
    unpaired = list(only_a) + list(only_b) + absent
    judges = sorted({str(r.get("judge")) for r in runs if r["method"] in (a, b) and r["seed"] in seeds})
    if len(judges) > 1:
        notes.append(f"p = {ratio:g}: the paired runs were judged by different judges ({', '.join(judges)})")
    prompt_diffs, missing, prompt_sets = [], [], {}
    for s in seeds:
        found = [_cell_verdicts(run_dirs, name, s, ratio, kind, row_key, v[s], reader)
                 for name, v in ((a, va), (b, vb))]
        if any(f is None for f in found):
            missing.append(s)
            continue
        (pa, xa, path_a), (pb, xb, path_b) = found
        if pa != pb:
            raise BoosterInputError(f"{path_a} and {path_b}: the {kind} prompts differ (count or order), so "
                                    "they cannot be paired prompt by prompt")
        prompt_diffs.append([y - x for x, y in zip(xa, xb)])
        prompt_sets.setdefault(tuple(pa), []).append(s)
    if len(prompt_sets) > 1:
        notes.append(f"the {kind} prompts differ between seeds at p = {ratio:g} ("
                     + "; ".join(f"seed{'s' if len(ss) > 1 else ''} {', '.join(map(str, ss))}: {len(ps)} prompts"
                                 for ps, ss in prompt_sets.items())
                     + "): were they evaluated alike?")
    ci_prompts = None
    if not missing:
        ci_prompts = hierarchical_bootstrap_ci(prompt_diffs, n_resamples, rng_seed, level)
    else:
        notes.append(f"no per-prompt {label} verdicts for seed{'s' if len(missing) > 1 else ''} "
                     f"{', '.join(map(str, missing))} at p = {ratio:g} (no samples.jsonl with them): "
                     "the interval is the seed-level bootstrap only")
    if len(seeds) == 1:
        notes.append(f"one paired seed at p = {ratio:g}: the interval reflects prompt noise only, not seed noise")
    pos = sum(d > 1e-9 for d in diffs)
    neg = sum(d < -1e-9 for d in diffs)
    return PairedCell(ratio=ratio, metric=metric, seeds=seeds, a=[va[s] for s in seeds], b=[vb[s] for s in seeds],
                      diffs=diffs, mean=float(np.mean(diffs)),
                      ci_seeds=seed_bootstrap_ci(diffs, n_resamples, rng_seed, level), ci_prompts=ci_prompts,
                      sign=(pos, neg, len(diffs) - pos - neg, sign_test_p(diffs)), notes=notes,
                      missing=sorted(set(unpaired), key=seed_order))


def seed_order(seed):
    """Seeds sort as numbers when they are numbers (7 before 10), else as text after them."""
    try:
        return (0, float(seed), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(seed))


def _cell_verdicts(run_dirs, method, seed, ratio, kind, row_key, summary_value, reader=read_verdicts):
    """(prompts, verdicts, path) of the first run directory holding the cell's samples.jsonl, or None. The
    verdicts must give the summary's number: otherwise the directory holds another run's evaluation."""
    for d in run_dirs:
        path = samples_path(d, method, seed, ratio)
        if not os.path.exists(path):
            continue
        got = reader(path, kind, row_key)
        if got is None:
            return None
        prompts, values = got
        check_matches_summary(path, f"{kind} rows give", sum(values) / len(values), summary_value, method, seed,
                              ratio)
        return prompts, values, path
    return None


def check_matches_summary(path: str, what: str, score: float, summary_value: float, method: str, seed,
                          ratio: float) -> None:
    """A samples.jsonl's per-row verdicts must give its summary's number: otherwise the evaluation directory
    holds another run's answers (mixed configurations)."""
    if abs(score - float(summary_value)) > 1e-6:
        raise BoosterInputError(f"{path}: its {what} {score:.4f} but summaries.json says {float(summary_value):.4f} "
                                f"for {method} seed {seed} p = {ratio:g}: the evaluation directory holds another "
                                "run (mixed configurations)")


# ---------------------------------------------------------------- text

def format_paired(cells: list[PairedCell], a: str, b: str, n_resamples: int = N_RESAMPLES,
                  rng_seed: int = RNG_SEED, level: float = LEVEL, notes: Sequence[str] = ()) -> str:
    """Markdown: the per-seed table, the summary table (mean, both intervals, sign test, verdict), notes
    (the cells' and ``notes``)."""
    pct = f"{100 * level:g} %"
    out = [f"Paired: **{b} - {a}** (B - A, percentage points; for HS < 0 means {b} is less harmful). "
           f"Bootstrap: {n_resamples} resamples, numpy default_rng seed {rng_seed}, {pct} percentile interval; "
           "primary = seeds, then prompts within each seed (the same prompts for both variants); "
           "secondary = seeds only. Sign test: two-sided exact, ties dropped.", ""]
    if not cells:
        return "\n".join(out + [f"No seed has both {a} and {b}."] + [f"- {n}" for n in notes])
    metrics = [m for m in METRICS if any(c.metric == m for c in cells)]
    short = {m: METRICS[m][3].split()[-1] for m in metrics}   # HS, FA
    out += ["| p | seed | " + " | ".join(f"{short[m]} {a} | {short[m]} {b} | {short[m]} B - A" for m in metrics)
            + " |", "|---:|---:|" + "---:|---:|---:|" * len(metrics)]
    by_cell = {(c.ratio, c.metric): dict(zip(c.seeds, zip(c.a, c.b, c.diffs))) for c in cells}
    for ratio in sorted({c.ratio for c in cells}):
        seeds = sorted({s for m in metrics for s in by_cell.get((ratio, m), {})})
        for s in seeds:
            vals = [by_cell.get((ratio, m), {}).get(s) for m in metrics]
            out.append(f"| {ratio:g} | {s} | " + " | ".join(
                f"{v[0]:.1f} | {v[1]:.1f} | {v[2]:+.1f}" if v else "– | – | –" for v in vals) + " |")
    out += ["", f"| p | metric | seeds | mean B - A | {pct} CI (seeds, then prompts) | {pct} CI (seeds only) | "
            "sign test (+ / - / tie) | verdict |", "|---:|---|---:|---:|---|---|---|---|"]
    for c in cells:
        hier = _ci(c.ci_prompts) if c.ci_prompts else "n/a (no per-prompt verdicts)"
        pos, neg, ties, p = c.sign
        out.append(f"| {c.ratio:g} | {METRICS[c.metric][3]} | {len(c.seeds)} | {c.mean:+.2f} | {hier} | "
                   f"{_ci(c.ci_seeds)} | {pos} / {neg} / {ties}, p = {p:.4g} | {c.verdict or '–'} |")
    notes = list(dict.fromkeys([n for c in cells for n in c.notes] + list(notes)))
    if notes:
        out += [""] + [f"- {n}" for n in notes]
    return "\n".join(out)


def _ci(ci: tuple[float, float]) -> str:
    return f"[{ci[0]:+.2f}, {ci[1]:+.2f}]"
