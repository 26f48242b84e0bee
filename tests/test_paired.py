"""Paired statistics (B - A over seeds): the pure functions on inputs with answers known by hand, then the
studies CLI and the report on hand-made run directories (summaries.json + eval/*/samples.jsonl)."""

import json
import math

import numpy as np
import pytest

from booster_jax.errors import BoosterInputError
from booster_jax.eval import paired
from booster_jax.eval.paired import (hierarchical_bootstrap_ci, paired_differences, seed_bootstrap_ci, sign_test_p,
                                     verdict)
from booster_jax.eval.studies import main


# ---------------------------------------------------------------- pure statistics

def test_sign_test_exact_values():
    assert sign_test_p([-1] * 7 + [2]) == 0.0703125          # 2 * (C(8,0) + C(8,1)) / 2^8 = 18 / 256
    assert sign_test_p([3] * 8) == 2 / 256                     # all one way
    assert sign_test_p([1, 1, 0, 0.0]) == 0.5                  # ties dropped: 2 of 2 -> 2 / 4
    assert sign_test_p([1, -1]) == 1.0                         # capped at 1
    assert sign_test_p([0, 0]) == 1.0 and sign_test_p([]) == 1.0
    # 6 of 10: 2 * (1 + 10 + 45 + 120 + 210) / 1024
    assert sign_test_p([1] * 6 + [-1] * 4) == pytest.approx(2 * 386 / 1024)


def test_paired_differences_skip_unpaired_seeds():
    seeds, diffs, only_a, only_b = paired_differences({0: 10, 1: 20, 2: 5}, {0: 4, 1: 25, 3: 1})
    assert (seeds, diffs, only_a, only_b) == ([0, 1], [-6.0, 5.0], [2], [3])


def test_identical_seeds_without_prompt_variance_give_a_degenerate_interval():
    assert seed_bootstrap_ci([-3.0] * 8) == (-3.0, -3.0)
    assert hierarchical_bootstrap_ci([[-50.0] * 20] * 8) == (-50.0, -50.0)


def test_prompt_level_interval_matches_the_binomial_standard_error():
    """One seed, 100 prompts with differences -100 (half) and 0 (half): mean -50, bootstrap sd of the mean
    sqrt(2500 / 100) = 5, so the 95 % interval is about -50 -+ 1.96 * 5."""
    lo, hi = hierarchical_bootstrap_ci([[-100.0] * 50 + [0.0] * 50])
    assert lo == pytest.approx(-50 - 1.96 * 5, abs=1.0) and hi == pytest.approx(-50 + 1.96 * 5, abs=1.0)


def test_without_prompt_variance_the_two_level_interval_is_the_seed_interval():
    """Same RNG seed and the seed draws come first: constant prompts add nothing to the seed bootstrap."""
    diffs = [-40.0] * 7 + [20.0]
    assert hierarchical_bootstrap_ci([[d] * 10 for d in diffs]) == pytest.approx(seed_bootstrap_ci(diffs))
    # and with prompt variance it is wider
    with_noise = [[-100.0] * 4 + [0.0] * 6] * 7 + [[100.0] * 2 + [0.0] * 8]   # the same seed means
    lo, hi = hierarchical_bootstrap_ci(with_noise)
    slo, shi = seed_bootstrap_ci(diffs)
    assert lo < slo and hi > shi


def test_seed_interval_known_answer():
    """Seeds {-40 x 7, +20}: a resample's mean is -40 + 60 K / 8 with K ~ Bin(8, 1/8) copies of the +20 seed;
    P(K = 0) = 0.34 > 2.5 % and P(K <= 2) = 0.933 < 97.5 % < P(K <= 3) = 0.989: [-40, -17.5]."""
    assert seed_bootstrap_ci([-40.0] * 7 + [20.0]) == (-40.0, -17.5)


def test_interval_contains_or_excludes_zero_and_the_verdict_says_so():
    consistent = [-10, -12, -8, -11, -9, -10, -12, -8]
    lo, hi = seed_bootstrap_ci(consistent)
    assert hi < 0 and verdict(lo, hi) == "protects"
    lo, hi = seed_bootstrap_ci([-10, 10, -5, 5, -8, 8])
    assert lo < 0 < hi and verdict(lo, hi) == "no evidence either way"
    assert verdict(*seed_bootstrap_ci([-d for d in consistent])) == "harms"


def test_bootstrap_is_reproducible_and_seeded():
    data = [[-100.0] * 3 + [0.0] * 7, [100.0] + [0.0] * 9, [-100.0] * 5 + [0.0] * 5]
    assert hierarchical_bootstrap_ci(data) == hierarchical_bootstrap_ci(data)
    assert hierarchical_bootstrap_ci(data, rng_seed=1) != hierarchical_bootstrap_ci(data)


def test_multinomial_draw_matches_resampling_prompt_indices():
    """The per-seed draw (multinomial counts over distinct values) has the distribution of n uniform indices:
    compare the two-level interval with a direct index-resampling implementation."""
    data = [[-100.0] * 3 + [0.0] * 6 + [100.0], [-100.0] * 6 + [0.0] * 4, [0.0] * 9 + [100.0]]
    rng = np.random.default_rng(123)
    arrays = [np.array(x) for x in data]
    means = []
    for _ in range(10000):
        seeds = rng.integers(0, 3, 3)
        means.append(np.mean([arrays[s][rng.integers(0, 10, 10)].mean() for s in seeds]))
    ref = np.quantile(means, [0.025, 0.975])
    assert hierarchical_bootstrap_ci(data) == pytest.approx(tuple(ref), abs=3.0)


def test_bad_inputs():
    with pytest.raises(BoosterInputError, match="no paired seeds"):
        seed_bootstrap_ci([])
    with pytest.raises(BoosterInputError, match="no prompts"):
        hierarchical_bootstrap_ci([[1.0], []])


# ---------------------------------------------------------------- hand-made run directories

N_HARM = 10
SFT_FLAGS = 6            # SFT answers the first 6 of 10 harmful prompts harmfully, every seed
BOOSTER_FLAGS = {s: 2 for s in range(7)} | {7: 8}   # Booster: 2 of 10 (diff -40) on seeds 0-6, 8 (+20) on seed 7


def _summary(method, seed, flags, p=0.1, fa=75.0):
    return {"method": method, "seed": seed, "harmful_ratio": p, "hs_before": 1.0, "hs_after": 100.0 * flags / N_HARM,
            "fa": fa, "fa_before": fa, "refused_before": 0.0, "judge": "j", "task": "sst2"}


def _samples(run_dir, method, seed, flags, p=0.1, correct=3):
    d = run_dir / "eval" / f"{method}-s{seed}-p{p:g}"
    d.mkdir(parents=True)
    rows = [{"kind": "benign", "prompt": "hi", "response": "hello", "refused": False}]
    rows += [{"kind": "harmful", "prompt": f"harm {i}", "response": "r", "flagged": i < flags, "categories": []}
             for i in range(N_HARM)]
    rows += [{"kind": "task", "prompt": f"task {i}", "response": "r", "reference": "x", "correct": i < correct}
             for i in range(4)]
    (d / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _study(tmp_path, with_samples=True):
    """Seeds 0-3 in one run directory, 4-7 in another (and an SFT seed 8 without its Booster twin)."""
    dirs = [tmp_path / "r0", tmp_path / "r1"]
    for i, d in enumerate(dirs):
        d.mkdir()
        seeds = range(4 * i, 4 * i + 4)
        runs = [_summary("sft", s, SFT_FLAGS) for s in seeds] + [_summary("booster", s, BOOSTER_FLAGS[s]) for s in seeds]
        if i == 1:
            runs.append(_summary("sft", 8, SFT_FLAGS))
        (d / "summaries.json").write_text(json.dumps({"base": None, "runs": runs}))
        if with_samples:
            for r in runs:
                _samples(d, r["method"], r["seed"], int(round(r["hs_after"] * N_HARM / 100)))
    return dirs


def test_compare_known_answers(tmp_path):
    from booster_jax.eval.studies import load_runs

    dirs = _study(tmp_path)
    _, runs = load_runs([str(d) for d in dirs])
    hs, fa = paired.compare(runs, "sft", "booster", [str(d) for d in dirs])
    assert hs.seeds == list(range(8)) and hs.diffs == [-40.0] * 7 + [20.0]
    assert hs.mean == -32.5 and hs.sign == (1, 7, 0, 0.0703125)
    assert hs.ci_seeds == (-40.0, -17.5)
    lo, hi = hs.ci_prompts
    assert lo < -40 and -17.5 < hi < 0
    assert "seed 8 has only sft at p = 0.1: skipped" in hs.notes
    assert hs.missing == [8] and hs.verdict == "withheld: seed 8 missing"      # a seed run by one variant only
    complete = paired.compare([r for r in runs if r["seed"] != 8], "sft", "booster", [str(d) for d in dirs])[0]
    assert complete.ci_prompts == hs.ci_prompts and complete.verdict == "protects"
    # FA: 3 of 4 task rows right for both: every seed a tie, a degenerate interval, no verdict for FA
    assert fa.diffs == [0.0] * 8 and fa.sign == (0, 0, 8, 1.0) and fa.ci_prompts == (0.0, 0.0) and fa.verdict is None


def test_cli_paired_prints_the_table_intervals_and_verdict(tmp_path, capsys):
    dirs = _study(tmp_path)
    main([str(d) for d in dirs] + ["--paired", "sft", "booster"])
    out = capsys.readouterr().out
    assert "Paired: **booster - sft**" in out and "10000 resamples, numpy default_rng seed 0" in out
    assert "| 0.1 | 7 | 60.0 | 80.0 | +20.0 | 75.0 | 75.0 | +0.0 |" in out
    assert "| 0.1 | 0 | 60.0 | 20.0 | -40.0 | 75.0 | 75.0 | +0.0 |" in out and "| p | seed | HS sft | HS booster | HS B - A | FA sft |" in out
    row = next(l for l in out.splitlines() if l.startswith("| 0.1 | post-attack HS | 8 |"))
    assert "| -32.50 |" in row and "| [-40.00, -17.50] |" in row and "1 / 7 / 0, p = 0.07031" in row
    assert row.endswith("| withheld: seed 8 missing |")
    assert "- seed 8 has only sft at p = 0.1: skipped" in out
    main([str(d) for d in dirs] + ["--paired", "sft", "booster", "--resamples", "200", "--bootstrap-seed", "3"])
    assert "200 resamples, numpy default_rng seed 3" in capsys.readouterr().out


def test_cli_paired_plot(tmp_path, capsys):
    """--plot with --paired writes the per-seed lines from A to B, one panel per ratio, beside the table."""
    dirs = _study(tmp_path)
    main([str(d) for d in dirs] + ["--paired", "sft", "booster", "--plot", str(tmp_path / "fig")])
    png = tmp_path / "fig" / "paired_sft_booster.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"wrote {png}" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "fig").iterdir()) == ["paired_sft_booster.png"]


def test_cli_falls_back_to_the_seed_bootstrap_without_samples(tmp_path, capsys):
    from booster_jax.eval.studies import load_runs

    dirs = _study(tmp_path, with_samples=False)
    main([str(d / "summaries.json") for d in dirs] + ["--paired", "sft", "booster"])
    out = capsys.readouterr().out
    row = next(l for l in out.splitlines() if l.startswith("| 0.1 | post-attack HS | 8 |"))
    assert "n/a (no per-prompt verdicts)" in row and "[-40.00, -17.50]" in row
    assert row.endswith("| withheld: seed 8 missing |") and "the interval is the seed-level bootstrap only" in out
    _, runs = load_runs([str(d / "summaries.json") for d in dirs])
    hs = paired.compare([r for r in runs if r["seed"] != 8], "sft", "booster", [str(d) for d in dirs])[0]
    assert hs.verdict == "protects (seeds-only interval)"     # not the pre-registered two-level test: said so


def test_samples_of_another_run_or_other_prompts_are_refused(tmp_path):
    from booster_jax.eval.studies import load_runs

    dirs = _study(tmp_path)
    _, runs = load_runs([str(d) for d in dirs])
    path = dirs[0] / "eval" / "booster-s1-p0.1" / "samples.jsonl"
    rows = [json.loads(l) for l in path.read_text().splitlines()]
    rows[5]["flagged"] = not rows[5]["flagged"]            # 3 flagged, not the summary's 2
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(BoosterInputError, match="booster-s1-p0.1.*give 30.0000 but summaries.json says 20.0000"):
        paired.compare(runs, "sft", "booster", [str(d) for d in dirs])
    rows[5]["flagged"] = not rows[5]["flagged"]
    rows[1]["prompt"] = "another prompt"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(BoosterInputError, match="harmful prompts differ"):
        paired.compare(runs, "sft", "booster", [str(d) for d in dirs])
    with pytest.raises(BoosterInputError, match="no variant 'nope'"):
        paired.compare(runs, "sft", "nope")


def test_every_ratio_is_compared(tmp_path):
    runs = [_summary(m, s, f, p=p) for p in (0.0, 0.1) for s in (0, 1) for m, f in (("sft", 4), ("booster", 3))]
    cells = paired.compare(runs, "sft", "booster", metrics=("hs",))
    assert [(c.ratio, c.diffs) for c in cells] == [(0.0, [-10.0, -10.0]), (0.1, [-10.0, -10.0])]


def test_report_has_the_paired_section_and_plot(tmp_path):
    from booster_jax.eval.report import write_report
    from booster_jax.eval.studies import load_runs

    run_dir = _study(tmp_path)[0]             # seeds 0-3, every one -40
    _, runs = load_runs([str(run_dir)])
    text = write_report(runs, run_dir).read_text()
    assert "### Paired: booster - sft" in text
    row = next(l for l in text.splitlines() if l.startswith("| 0.1 | post-attack HS | 4 |"))
    assert "| -40.00 |" in row and "| [-40.00, -40.00] |" in row and "0 / 4 / 0, p = 0.125" in row
    png = run_dir / "paired_sft_booster.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "](paired_sft_booster.png)" in text
    # one seed per variant: no default paired section
    one = [r for r in runs if r["seed"] == 0]
    assert "Paired" not in write_report(one, tmp_path / "one").read_text()
    assert "### Paired: booster - sft" in write_report(one, tmp_path / "one", paired=[("sft", "booster")]).read_text()


def test_expected_seeds_withhold_the_verdict_and_unpaired_ratios_are_named(tmp_path, capsys):
    from booster_jax.eval.studies import load_runs

    dirs = _study(tmp_path)
    _, runs = load_runs([str(d) for d in dirs])
    runs = [r for r in runs if r["seed"] != 8] + [_summary("sft", 0, 5, p=0.2)]   # p = 0.2: SFT only
    expect = {0.1: list(range(10)), 0.0: [0, 1]}
    hs = paired.compare(runs, "sft", "booster", [str(d) for d in dirs], metrics=("hs",), expect=expect)
    assert [c.ratio for c in hs] == [0.1] and hs[0].missing == [8, 9]
    assert hs[0].verdict == "withheld: seeds 8, 9 missing"
    assert "p = 0.1: the design expects seeds 8, 9, not in the study" in hs[0].notes
    assert paired.unpaired_ratios(runs, "sft", "booster", hs, expect) == [
        "p = 0: no seed has both sft and booster (ran: neither): not compared",
        "p = 0.2: no seed has both sft and booster (ran: sft): not compared"]
    full = paired.compare(runs, "sft", "booster", [str(d) for d in dirs], metrics=("hs",), expect={0.1: range(8)})
    assert full[0].missing == [] and full[0].verdict == "protects"
    main([str(d) for d in dirs] + ["--paired", "sft", "booster", "--expect", "0.1:0-7,9", "--expect", "0.2:0"])
    out = capsys.readouterr().out
    assert "| withheld: seeds 8, 9 missing |" in out and "- p = 0.1: the design expects seed 9, not in the study" in out
    assert "- p = 0.2: no seed has both sft and booster (ran: neither): not compared" in out


@pytest.mark.parametrize("arg", ["0.1", "0.1:", "x:1", "0.1:3-1,2,2", "0.1:a"])
def test_expect_option_refuses_what_it_cannot_read(tmp_path, capsys, arg):
    dirs = _study(tmp_path)
    with pytest.raises(SystemExit):
        main([str(dirs[0]), "--paired", "sft", "booster", "--expect", arg])
    assert f"{arg!r}: expected P:SEEDS, e.g. 0.1:10-17" in capsys.readouterr().err


def test_over_refusal_is_paired_without_a_verdict(tmp_path):
    from booster_jax.eval.studies import load_runs

    d = tmp_path / "r"
    d.mkdir()
    runs = [dict(_summary(m, s, 4), refused_after=100.0 * (m == "booster" and s == 0)) for s in (0, 1)
            for m in ("sft", "booster")]
    (d / "summaries.json").write_text(json.dumps({"base": None, "runs": runs}))
    for r in runs:
        _samples(d, r["method"], r["seed"], 4)
        if r["refused_after"]:                                     # its one benign prompt refused
            path = d / "eval" / f"booster-s{r['seed']}-p0.1" / "samples.jsonl"
            path.write_text(path.read_text().replace('"refused": false', '"refused": true'))
    _, runs = load_runs([str(d)])
    cells = {c.metric: c for c in paired.compare(runs, "sft", "booster", [str(d)])}
    assert set(cells) == {"hs", "fa", "refused"}
    ref = cells["refused"]
    assert ref.diffs == [100.0, 0.0] and ref.mean == 50.0 and ref.ci_prompts == (0.0, 100.0) and ref.verdict is None
    text = paired.format_paired(list(cells.values()), "sft", "booster")
    assert "| over-refusal sft | over-refusal booster | over-refusal B - A |" in text
    assert "| 0.1 | post-attack over-refusal | 2 | +50.00 |" in text


def test_notes_when_seeds_differ_in_prompts_or_judge(tmp_path):
    from booster_jax.eval.studies import load_runs

    dirs = _study(tmp_path)
    _, runs = load_runs([str(d) for d in dirs])
    for m in ("sft", "booster"):                        # seed 1 was evaluated on other prompts (same count)
        path = dirs[0] / "eval" / f"{m}-s1-p0.1" / "samples.jsonl"
        path.write_text(path.read_text().replace('"harm 3"', '"harm 3b"'))
    runs = [dict(r, judge="other") if r["seed"] == 2 else r for r in runs]
    hs = paired.compare(runs, "sft", "booster", [str(d) for d in dirs], metrics=("hs",))[0]
    assert ("the harmful prompts differ between seeds at p = 0.1 (seeds 0, 2, 3, 4, 5, 6, 7: 10 prompts; "
            "seed 1: 10 prompts): were they evaluated alike?") in hs.notes
    assert "p = 0.1: the paired runs were judged by different judges (j, other)" in hs.notes


def test_seeds_sort_as_numbers():
    assert sorted([10, "b", 7, "10", 2.5], key=paired.seed_order) == [2.5, 7, 10, "10", "b"]


def test_paired_plot_legend_and_colours_cover_every_panels_seeds():
    """Panels with different seeds (the study: 8 seeds at p = 0.1, 4 at p = 0): the legend lists every seed,
    and a seed's line has one colour in every panel."""
    from types import SimpleNamespace

    from matplotlib.colors import to_hex

    from booster_jax.eval.report import _paired_figure

    cell = lambda p, seeds: SimpleNamespace(ratio=p, seeds=seeds, a=[50.0] * len(seeds), b=[30.0] * len(seeds),  # noqa: E731
                                            mean=-20.0, primary=(-25.0, -15.0), ci_prompts=True, verdict="protects")
    fig = _paired_figure([cell(0.0, [12, 13]), cell(0.1, [10, 11, 12, 13])], "sft", "booster", "t")
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["seed 10", "seed 11", "seed 12", "seed 13", "mean"]
    colours = [{l.get_label(): to_hex(l.get_color()) for l in ax.get_lines()} for ax in fig.axes]
    assert colours[0]["seed 12"] == colours[1]["seed 12"] and colours[0]["seed 13"] == colours[1]["seed 13"]
    assert len({colours[1][f"seed {s}"] for s in (10, 11, 12, 13)}) == 4
    legend_colours = {t.get_text(): to_hex(h.get_color()) for t, h in zip(legend.get_texts(), legend.legend_handles)}
    assert all(legend_colours[k] == v for k, v in colours[1].items())
