"""The pre-registered recipe selection rule, on hand-made study results."""

import json

import pytest

from booster_jax.eval.studies import format_study, harmful_effect, main, select_recipe


def run(method, seed, hs_before, hs_after, fa, p=0.1):
    return {"method": method, "seed": seed, "harmful_ratio": p, "hs_before": hs_before, "hs_after": hs_after,
            "fa": fa, "fa_before": fa, "refused_before": 1.0}


def test_rule_filters_then_picks_lowest_then_breaks_ties():
    runs = []
    for s in (0, 1, 2):
        runs += [run("sft", s, 0, 90, 80),
                 run("booster_l5_a0.1", s, 40, 10, 80),          # not aligned before the attack
                 run("booster_l1_a0.01", s, 2, 30, 70),          # FA more than 3 points below SFT
                 run("booster_l5_a0.01_warm", s, 1, 20.3, 79),   # qualifies
                 run("booster_l1_a0.01_warm", s, 1, 20.0, 79),   # qualifies, ties with smaller lam*alpha
                 run("booster_l20_a0.1", s, 3, 20.6, 81)]        # ties, but larger lam*alpha
    chosen, notes = select_recipe(runs)
    assert chosen == "booster_l1_a0.01_warm"
    assert any("pre-attack HS 40.0 > 5" in n for n in notes) and any("FA 70.0 < sft FA 80.0" in n for n in notes)


def test_no_setting_qualifies():
    runs = [run("sft", 0, 0, 90, 80), run("booster_l5_a0.1", 0, 50, 10, 80)]
    assert select_recipe(runs)[0] is None


def test_table_shows_mean_and_spread():
    runs = [run("sft", 0, 0, 80, 70), run("sft", 1, 2, 100, 72)]
    table = format_study(runs)
    assert "| sft | 0.1 | 2 | 1.0 ± 1.4 |" in table and "90.0 ± 14.1" in table


def test_cli_bound_on_pre_attack_hs(tmp_path, capsys):
    """The real setting's bound is 10 (configs/real/smollm2_booster_selected.yaml), the embedded one's 5."""
    runs = [run("sft", 100, 1, 76, 21), run("booster_l5_a0.1", 100, 8, 50, 20)]
    (tmp_path / "summaries.json").write_text(json.dumps({"base": None, "runs": runs}))
    main([str(tmp_path), "--select"])
    assert "chosen: none qualifies" in capsys.readouterr().out
    main([str(tmp_path), "--select", "--max-hs-before", "10"])
    assert "chosen: booster_l5_a0.1" in capsys.readouterr().out


def test_directories_merge_and_conflicting_duplicates_are_refused(tmp_path, capsys):
    """Seeds run in two directories make one study; the same run with other numbers is an error naming both."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "summaries.json").write_text(json.dumps({"base": None, "runs": [run("sft", 0, 1, 40, 10), run("sft", 0, 1, 20, 12, p=0.0)]}))
    (b / "summaries.json").write_text(json.dumps({"base": None, "runs": [run("sft", 1, 3, 50, 14), run("sft", 0, 1, 40, 10)]}))
    main([str(a), str(b)])
    out = capsys.readouterr().out
    assert "| sft | 0.1 | 2 | 2.0 ± 1.4 |" in out and "45.0 ± 7.1" in out   # the duplicate counted once
    assert "sft: +20.0 (1 seed)" in out                                     # only seed 0 has both ratios
    (b / "summaries.json").write_text(json.dumps({"base": None, "runs": [run("sft", 0, 1, 41, 10)]}))
    with pytest.raises(ValueError, match="both hold sft seed 0 p = 0.1"):
        main([str(a), str(b)])
    with pytest.raises(FileNotFoundError, match="no summaries.json"):
        main([str(tmp_path / "missing")])


def test_harmful_effect_pairs_by_seed():
    runs = [run("sft", 0, 1, 41, 13), run("sft", 0, 1, 22, 12, p=0.0), run("sft", 1, 1, 60, 13),
            run("sft", 1, 1, 20, 12, p=0.0), run("sft", 2, 1, 99, 13)]   # seed 2 has no control: left out
    e = harmful_effect(runs)["sft"]
    assert e["seeds"] == 2 and e["effect"] == (19 + 40) / 2 and abs(e["effect_std"] - 14.849) < 1e-3
