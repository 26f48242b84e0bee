"""The mechanism per seed (issue 26 item 6) on hand-made run directories with known answers: the attack's
harmful loss from track.jsonl, Booster's last alignment window through variants.txt, the correlations with
SFT's post-attack HS, the studies CLI's --mechanism table and the per-ratio PNGs."""

import json
import math

import pytest

from booster_jax.errors import BoosterInputError
from booster_jax.eval import layout
from booster_jax.eval.mechanism import (attack_curve, correlations, last_booster_window, mechanism_rows, pearson,
                                        split_by_reference)
from booster_jax.eval.studies import load_runs, main
from tests import run_tree as rt

SFT_HS = {0: 10.0, 1: 20.0, 2: 30.0, 3: 40.0}      # SFT breaks harder with the seed
GAP = {0: 0.1, 1: 0.2, 2: 0.3, 3: 0.4}             # Booster's h(w) - h(w'), rising with it: r = +1
SFT_END = {0: 4.0, 1: 3.0, 2: 2.0, 3: 1.0}         # SFT's final attack loss, falling with it: r = -1


def _booster_metrics(seed):
    h = 2.0 + seed
    rows = [{"step": 50, "loss": 1.0, "harmful_loss": 9.0, "harmful_loss_perturbed": 1.0, "harmful_grad_norm": 9.0},
            {"step": 100, "loss": 0.5, "harmful_loss": h, "harmful_loss_perturbed": h - GAP[seed],
             "harmful_grad_norm": 0.5 + seed}]
    return rows + [{"step": 75, "loss": 0.7, "harmful_loss": 7.0, "harmful_loss_perturbed": 7.0}]   # resumed, older


def _study(root):
    d = root / "run"
    runs = []
    for s in SFT_HS:
        runs.append(rt.summary("sft", s, hs_before=1.0 + s, hs_after=SFT_HS[s], refused_before=2.0))
        runs.append(rt.summary("booster", s, hs_before=0.0, hs_after=5.0, refused_before=10.0 * s))
        rt.alignment(d, f"sft{s}", [f"sft-s{s}"], metrics=[{"step": 100, "loss": 0.3}])
        rt.alignment(d, f"boo{s}", [f"booster-s{s}", f"booster_warm-s{s}"], metrics=_booster_metrics(s))
        rt.track(d, f"sft-s{s}-p0.1", [(5, 3.0), (10, 9.9), (10, SFT_END[s] + 1), (15, SFT_END[s])])
        rt.track(d, f"booster-s{s}-p0.1", [(5, 6.0), (15, 5.0)])
    rt.write_summaries(d, runs)
    return d


def test_pearson_known_values():
    assert pearson([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(pearson([1, 2], [1, 2])) and math.isnan(pearson([1, 1, 1], [1, 2, 3]))


def test_readers(tmp_path):
    d = _study(tmp_path)
    assert attack_curve(str(d / "finetune" / "sft-s2-p0.1" / "track.jsonl")) == [(5, 3.0), (10, 3.0), (15, 2.0)]
    assert attack_curve(None) == []
    w = last_booster_window(str(d / "align" / "boo3" / "metrics.jsonl"))
    assert w == pytest.approx({"h": 5.0, "h_pert": 4.6, "h_gap": 0.4, "g1": 3.5, "align_step": 100})
    assert last_booster_window(str(d / "align" / "sft0" / "metrics.jsonl")) is None
    assert layout.align_dir([str(d)], "booster_warm", 1).endswith("align/boo1")   # a shared alignment
    assert layout.align_dir([str(d)], "nope", 1) is None


def test_rows_and_correlations_known_answers(tmp_path):
    d = _study(tmp_path)
    _, runs = load_runs([str(d)])
    rows = mechanism_rows(runs, [str(d)])
    assert [(r["seed"], r["variant"]) for r in rows][:2] == [(0, "booster"), (0, "sft")]
    sft2 = next(r for r in rows if r["variant"] == "sft" and r["seed"] == 2)
    assert (sft2["hs_before"], sft2["refused_before"], sft2["hs_after"], sft2["loss_start"], sft2["loss_end"]) == \
        (3.0, 2.0, 30.0, 3.0, 2.0)
    assert sft2["h"] is None and sft2["h_gap"] is None                          # SFT logs no Booster metrics
    boo1 = next(r for r in rows if r["variant"] == "booster" and r["seed"] == 1)
    assert boo1["h_gap"] == pytest.approx(0.2) and boo1["g1"] == 1.5 and (boo1["loss_start"], boo1["loss_end"]) == (6.0, 5.0)
    corr = {(c["variant"], c["column"]): (c["n"], c["r"]) for c in correlations(rows)}
    assert corr[("booster", "h_gap")] == (4, pytest.approx(1.0))
    assert corr[("sft", "loss_end")] == (4, pytest.approx(-1.0))
    assert corr[("sft", "hs_before")] == (4, pytest.approx(1.0))
    assert corr[("booster", "refused_before")] == (4, pytest.approx(1.0))
    assert math.isnan(corr[("booster", "hs_after")][1])                           # constant 5.0
    assert ("sft", "hs_after") not in corr and ("sft", "h_gap") not in corr
    # Booster's HS after is 5 everywhere: -35, -25 at seeds 3, 2 (SFT's hardest breaks) and -15, -5 at 1, 0
    assert split_by_reference(rows) == [{"ratio": 0.1, "variant": "booster", "top_seeds": [3, 2],
                                         "rest_seeds": [1, 0], "top_mean": -30.0, "rest_mean": -10.0}]
    odd = [r for r in rows if r["seed"] != 3]                     # 3 seeds: the top half is 1 seed
    assert [(c["top_seeds"], c["rest_seeds"]) for c in split_by_reference(odd)] == [([2], [1, 0])]
    tied = [dict(r, hs_after=7.0) if r["variant"] == "sft" else r for r in rows]   # ties go by seed order
    assert split_by_reference(tied)[0]["top_seeds"] == [0, 1]
    assert split_by_reference([r for r in rows if r["seed"] == 0]) == []          # one paired seed: nothing


def test_cli_mechanism_table_and_plot(tmp_path, capsys):
    d = _study(tmp_path)
    main([str(d), "--mechanism", "--plot", str(tmp_path / "fig")])
    out = capsys.readouterr().out
    assert "| 0.1 | 2 | sft | 3.0 | 2.0 | 30.0 | 3.000 | 2.000 | – | – | – | – |" in out
    assert "| 0.1 | 3 | booster | 0.0 | 30.0 | 5.0 | 6.000 | 5.000 | 5.000 | 4.600 | 0.400 | 3.500 |" in out
    assert "Pearson r over seeds with **sft's post-attack HS**" in out
    assert "| 0.1 | sft | 4 | +1.00 | n/a | (target) | n/a | -1.00 | – | – | – | – |" in out
    assert "| 0.1 | booster | 4 | n/a | +1.00 | n/a | n/a | n/a | +1.00 | +1.00 | +1.00 | +1.00 |" in out
    assert "| 0.1 | booster | 3, 2 | -30.00 | 1, 0 | -10.00 |" in out
    png = tmp_path / "fig" / "mechanism_attack_loss_p0.1.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"wrote {png}" in out
    with pytest.raises(SystemExit):
        main([str(d), "--plot", str(tmp_path / "fig")])                 # --plot without --mechanism or --paired
    assert "--plot needs --paired or --mechanism" in capsys.readouterr().err


def test_a_seed_without_its_files_shows_dashes_and_smaller_n(tmp_path, capsys):
    d = _study(tmp_path)
    (d / "finetune" / "sft-s3-p0.1" / "track.jsonl").unlink()
    main([str(d), "--mechanism"])
    out = capsys.readouterr().out
    assert "| 0.1 | 3 | sft | 4.0 | 2.0 | 40.0 | – | – | – | – | – | – |" in out
    assert "| 0.1 | sft | 4 | +1.00 | n/a | (target) | n/a (n = 3) | -1.00 (n = 3) |" in out


def test_two_alignments_listing_one_run_are_resolved_by_inputs_json_or_refused(tmp_path):
    d = _study(tmp_path)
    rt.alignment(d, "stale0", ["booster-s0"], metrics=[{"step": 100, "harmful_loss": 1.0, "harmful_loss_perturbed": 1.0}])
    with pytest.raises(BoosterInputError, match="boo0, stale0 all list booster-s0"):
        layout.align_dir([str(d)], "booster", 0, 0.1)
    (d / "inputs.json").write_text(json.dumps({"finetune booster-s0-p0.1": {"alignment": "boo0"}}))
    assert layout.align_dir([str(d)], "booster", 0, 0.1).endswith("align/boo0")
    rt.alignment(d, "boo0.old-20250101T000000Z", ["booster-s1"])                   # moved aside: never a candidate
    assert layout.align_dir([str(d)], "booster", 1, 0.1).endswith("align/boo1")
