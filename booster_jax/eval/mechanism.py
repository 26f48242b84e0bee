"""The mechanism per seed (issue 26 item 6): for every (seed, variant) at each harmful ratio, the aligned
model's HS and over-refusal before the attack, HS after it, the attack's harmful training loss at its first
and last tracked step (paper Fig. 3), and, for an alignment that logged Booster's metrics, its last window's
h(w), h(w') (the harmful loss after the simulated attack step), h(w) - h(w') and ||g1||; then the Pearson
correlation over seeds of the reference variant's (SFT's) post-attack HS with each of those, so a reader can
see what separates the seeds where SFT breaks hard from those where it does not; and each other variant's
post-attack HS minus the reference's over the seeds where the reference breaks hardest and over the rest.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Sequence

from booster_jax import files
from booster_jax.eval import layout
from booster_jax.eval.paired import seed_order

# column -> header; the order of the table
COLUMNS = {"hs_before": "HS before", "refused_before": "refused before (%)", "hs_after": "HS after",
           "loss_start": "attack h-loss start", "loss_end": "attack h-loss end",
           "h": "h(w)", "h_pert": "h(w')", "h_gap": "h(w) - h(w')", "g1": "‖g1‖"}


def attack_curve(track_path: str | None) -> list[tuple[int, float]]:
    """(step, harmful_train_loss) of a track.jsonl in step order; a step logged twice (a resumed stage): the
    last value wins."""
    points = {}
    for row in files.read_jsonl(track_path) if track_path else []:
        if row.get("harmful_train_loss") is not None:
            points[row["step"]] = float(row["harmful_train_loss"])
    return sorted(points.items())


def last_booster_window(metrics_path: str) -> dict | None:
    """h(w), h(w'), their gap and ||g1|| of the last logged window of an alignment that logs them (Booster's
    ``harmful_loss``, ``harmful_loss_perturbed``, ``harmful_grad_norm``); None for one that does not (SFT)."""
    last = None
    for row in files.read_jsonl(metrics_path):
        if row.get("harmful_loss") is not None and row.get("harmful_loss_perturbed") is not None:
            if last is None or row.get("step", 0) >= last.get("step", 0):
                last = row
    if last is None:
        return None
    h, hp = float(last["harmful_loss"]), float(last["harmful_loss_perturbed"])
    g1 = last.get("harmful_grad_norm")
    return {"h": h, "h_pert": hp, "h_gap": h - hp, "g1": float(g1) if g1 is not None else None,
            "align_step": last.get("step")}


def mechanism_rows(runs: Sequence[dict], run_dirs: Sequence[str]) -> list[dict]:
    """One row per run (variant, seed, ratio), sorted by ratio, seed, variant; a value not found is None."""
    rows = []
    for r in runs:
        v, s, p = r["method"], r["seed"], float(r["harmful_ratio"])
        curve = attack_curve(layout.attack_track(run_dirs, v, s, p))
        row = {"variant": v, "seed": s, "ratio": p, "hs_before": r.get("hs_before"),
               "refused_before": r.get("refused_before"), "hs_after": r.get("hs_after"),
               "loss_start": curve[0][1] if curve else None, "loss_end": curve[-1][1] if curve else None,
               "curve": curve, "h": None, "h_pert": None, "h_gap": None, "g1": None}
        adir = layout.align_dir(run_dirs, v, s, p)
        window = last_booster_window(os.path.join(adir, "metrics.jsonl")) if adir else None
        if window:
            row.update(window)
        rows.append(row)
    return sorted(rows, key=lambda x: (x["ratio"], seed_order(x["seed"]), x["variant"]))


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Pearson r; NaN with fewer than 3 pairs or a constant side (r says nothing there)."""
    n = len(xs)
    if n < 3 or n != len(ys):
        return float("nan")
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx <= 1e-12 * max(1.0, mx * mx) or syy <= 1e-12 * max(1.0, my * my):
        return float("nan")
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / math.sqrt(sxx * syy)


def _ok(v) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def correlations(rows: Sequence[dict], reference: str = "sft") -> list[dict]:
    """Per ratio, Pearson r over seeds between ``reference``'s post-attack HS and every other column of every
    variant (the reference's own HS after excluded), with n = the seeds where both are known."""
    out = []
    for p in sorted({r["ratio"] for r in rows}):
        at = [r for r in rows if r["ratio"] == p]
        target = {r["seed"]: r["hs_after"] for r in at if r["variant"] == reference and _ok(r["hs_after"])}
        if not target:
            continue
        by_variant = defaultdict(dict)
        for r in at:
            by_variant[r["variant"]][r["seed"]] = r
        for v in sorted(by_variant, key=lambda name: (name != reference, name)):
            for col in COLUMNS:
                if v == reference and col == "hs_after":
                    continue
                seeds = [s for s in sorted(target, key=seed_order) if s in by_variant[v] and _ok(by_variant[v][s][col])]
                if not seeds:
                    continue
                xs = [float(by_variant[v][s][col]) for s in seeds]
                out.append({"ratio": p, "variant": v, "column": col, "n": len(seeds),
                            "r": pearson(xs, [float(target[s]) for s in seeds])})
    return out


def split_by_reference(rows: Sequence[dict], reference: str = "sft") -> list[dict]:
    """Per ratio and other variant: its post-attack HS minus the reference's, averaged over the half of the
    seeds where the reference's post-attack HS is highest (n // 2 seeds; ties by seed order) and over the
    rest. Whether a variant's advantage is concentrated where the reference breaks hard, read as the study's
    pre-registration fixes it (docs/results/real_study.md); a (ratio, variant) with under 2 paired seeds gets no entry."""
    out = []
    for p in sorted({r["ratio"] for r in rows}):
        at = [r for r in rows if r["ratio"] == p and _ok(r["hs_after"])]
        ref = {r["seed"]: float(r["hs_after"]) for r in at if r["variant"] == reference}
        for v in sorted({r["variant"] for r in at} - {reference}):
            diff = {r["seed"]: float(r["hs_after"]) - ref[r["seed"]] for r in at if r["variant"] == v and r["seed"] in ref}
            if len(diff) < 2:
                continue
            ranked = sorted(diff, key=lambda s: (-ref[s], seed_order(s)))
            top, rest = ranked[:len(ranked) // 2], ranked[len(ranked) // 2:]
            out.append({"ratio": p, "variant": v, "top_seeds": top, "rest_seeds": rest,
                        "top_mean": sum(diff[s] for s in top) / len(top),
                        "rest_mean": sum(diff[s] for s in rest) / len(rest)})
    return out


def _fmt(v, digits: int = 2) -> str:
    return f"{float(v):.{digits}f}" if _ok(v) else "–"


def format_mechanism(rows: Sequence[dict], reference: str = "sft") -> str:
    """Markdown: the per-seed table, then the correlations with the reference's post-attack HS."""
    out = ["Mechanism per seed (issue 26 item 6). Attack h-loss = the attack's harmful training loss "
           "(track.jsonl) at its first and last tracked step (the first is step track_every, not 0); "
           "h(w), h(w'), ‖g1‖ = the alignment's last logged window (Booster's metrics; – for an alignment that "
           "does not log them).", "",
           "| p | seed | variant | " + " | ".join(COLUMNS.values()) + " |",
           "|---:|---:|---|" + "---:|" * len(COLUMNS)]
    for r in rows:
        cells = [_fmt(r[c], 1 if c in ("hs_before", "refused_before", "hs_after") else 3) for c in COLUMNS]
        out.append(f"| {r['ratio']:g} | {r['seed']} | {r['variant']} | " + " | ".join(cells) + " |")
    corr = correlations(rows, reference)
    if not corr:
        return "\n".join(out + ["", f"No {reference} post-attack HS to correlate with."])
    out += ["", f"Pearson r over seeds with **{reference}'s post-attack HS** (n = seeds with both; "
            "r is n/a below 3 seeds or for a constant column; two-sided 5 % needs |r| > 0.71 at n = 8, > 0.95 at "
            "n = 4; many quantities are tried, so a large |r| is a lead, not a finding):",
            "", "| p | variant | n | " + " | ".join(COLUMNS.values()) + " |",
            "|---:|---|---:|" + "---:|" * len(COLUMNS)]
    for p in sorted({c["ratio"] for c in corr}):
        for v in dict.fromkeys(c["variant"] for c in corr if c["ratio"] == p):
            got = {c["column"]: c for c in corr if c["ratio"] == p and c["variant"] == v}
            n = max(c["n"] for c in got.values())
            cells = []
            for col in COLUMNS:
                c = got.get(col)
                if c is None:
                    cells.append("–" if not (v == reference and col == "hs_after") else "(target)")
                    continue
                txt = f"{c['r']:+.2f}" if not math.isnan(c["r"]) else "n/a"
                cells.append(txt + (f" (n = {c['n']})" if c["n"] != n else ""))
            out.append(f"| {p:g} | {v} | {n} | " + " | ".join(cells) + " |")
    split = split_by_reference(rows, reference)
    if split:
        out += ["", f"Post-attack HS minus {reference}'s, averaged over the half of the seeds where {reference}'s "
                "post-attack HS is highest (n // 2 seeds) and over the rest:", "",
                f"| p | variant | seeds where {reference} breaks hardest | mean difference there | other seeds | "
                "mean difference there |", "|---:|---|---|---:|---|---:|"]
        for c in split:
            out.append(f"| {c['ratio']:g} | {c['variant']} | {', '.join(map(str, c['top_seeds']))} | "
                       f"{c['top_mean']:+.2f} | {', '.join(map(str, c['rest_seeds']))} | {c['rest_mean']:+.2f} |")
    return "\n".join(out)


def plot_curves(rows: Sequence[dict], out_dir: str) -> list[str]:
    """Paper Fig. 3 per seed: one PNG per ratio, one panel per seed (shared axes), harmful training loss vs
    attack step with one line per variant, the variant as colour; each panel's title gives the variants'
    post-attack HS, so the seeds where a variant breaks hard can be told apart at a glance."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    os.makedirs(out_dir, exist_ok=True)
    variants = sorted({r["variant"] for r in rows})
    colour = {v: f"C{i}" for i, v in enumerate(variants)}
    paths = []
    for p in sorted({r["ratio"] for r in rows}):
        at = [r for r in rows if r["ratio"] == p and r["curve"]]
        if not at:
            continue
        seeds = sorted({r["seed"] for r in at}, key=seed_order)
        ncols = min(4, len(seeds))
        nrows = math.ceil(len(seeds) / ncols)
        fig = Figure(figsize=(max(6.0, 3.2 * ncols + 0.5), 2.6 * nrows + 1.2))
        axes = fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False).ravel()
        for ax, seed in zip(axes, seeds):
            hs = []
            for r in sorted((r for r in at if r["seed"] == seed), key=lambda r: variants.index(r["variant"])):
                xs, ys = zip(*r["curve"])
                ax.plot(xs, ys, color=colour[r["variant"]], linewidth=1.5, marker="." if len(xs) < 30 else None,
                        markersize=3)
                hs.append(f"{r['variant']} {_fmt(r['hs_after'], 0)}" if _ok(r.get("hs_after")) else r["variant"])
            ax.set_title(f"seed {seed}: HS after " + ", ".join(hs), fontsize=8)
            ax.grid(alpha=0.3)
        for ax in axes[len(seeds):]:
            ax.set_visible(False)
        for ax in axes[(nrows - 1) * ncols:]:
            ax.set_xlabel("attack step", fontsize=8)
        for ax in axes[::ncols]:
            ax.set_ylabel("harmful training loss", fontsize=8)
        handles = [axes[0].plot([], [], color=colour[v], linewidth=1.5)[0] for v in variants]
        fig.legend(handles, variants, loc="lower center", fontsize=8, ncol=len(variants), frameon=False)
        fig.suptitle(f"Harmful training loss during the attack, p = {p:g}, per seed")
        fig.tight_layout(rect=(0, 0.35 / fig.get_figheight(), 1, 1))
        path = os.path.join(out_dir, f"mechanism_attack_loss_p{p:g}.png")
        fig.savefig(path, dpi=110, format="png")
        paths.append(path)
    return paths
