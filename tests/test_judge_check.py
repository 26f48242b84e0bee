"""The blind judge check kit (issue 26 item 4): stratified, paired, shuffled sampling that hides the method,
and the scoring of hand labels against the keyword judge, on hand-made run directories and files."""

import json
from collections import Counter

import pytest

from booster_jax.errors import BoosterInputError
from booster_jax.eval import judge_check as jc
from booster_jax.eval.studies import load_runs
from tests import run_tree as rt

N_ANSWERS = 20
CELLS = [(v, s, p) for p, seeds in ((0.1, (0, 1, 2)), (0.2, (0, 1))) for s in seeds for v in ("sft", "booster_paper")]


def _answer(v, s, p, i):
    # every third answer refuses; the text names its cell so a test can check where it came from
    return (f"i cannot do that ({v} {s} {p:g} {i})" if i % 3 == 0 else f"sure, here is how ({v} {s} {p:g} {i})")


def _study(root):
    d = root / "run"
    runs = []
    for v, s, p in CELLS + [("booster_warm", 0, 0.1), ("sft", 0, 0.0)]:   # the last two are not asked for
        answers = [_answer(v, s, p, i) for i in range(N_ANSWERS)]
        runs.append(rt.summary(v, s, p, hs_after=rt.hs(answers)))
        rt.samples(d / "eval" / f"{v}-s{s}-p{p:g}", answers)
    rt.write_summaries(d, runs)
    return d


def _sample(d, n=30, seed=0):
    _, runs = load_runs([str(d)])
    return jc.sample(jc.cells(runs, [str(d)], ["sft", "booster_paper"], [0.1, 0.2]), n, seed)


def test_sample_is_blind_stratified_paired_and_reproducible(tmp_path):
    d = _study(tmp_path)
    to_label, key = _sample(d)
    assert len(to_label) == len(key) == 30 and [r["id"] for r in to_label] == [r["id"] for r in key]
    assert [r["id"] for r in key] == [f"a{i:02d}" for i in range(1, 31)]
    assert all(set(r) == {"id", "prompt", "response"} for r in to_label)          # nothing names the method
    assert set(key[0]) == {"id", "run_dir", "variant", "seed", "ratio", "prompt_index", "keyword_flagged"}
    assert Counter((k["variant"], k["seed"], k["ratio"]) for k in key) == {c: 3 for c in CELLS}
    for t, k in zip(to_label, key):                                                # the key describes the answer
        assert t["response"] == _answer(k["variant"], k["seed"], k["ratio"], k["prompt_index"])
        assert t["prompt"] == f"harm {k['prompt_index']}" and k["keyword_flagged"] == rt.flagged(t["response"])
        assert k["run_dir"] == str(d)
    picks = {}
    for k in key:                                                                  # same prompts for both variants
        picks.setdefault((k["seed"], k["ratio"], k["variant"]), set()).add(k["prompt_index"])
    for s, p in {(k["seed"], k["ratio"]) for k in key}:
        assert picks[(s, p, "sft")] == picks[(s, p, "booster_paper")]
    variants = [k["variant"] for k in key]
    assert variants != sorted(variants) and variants[:10].count("sft") not in (0, 10)   # shuffled
    assert _sample(d) == (to_label, key) and _sample(d, seed=1) != (to_label, key)
    assert len(_sample(d, n=31)[0]) == 40                                          # ceil(31 / 10) = 4 per cell


def test_sample_cli_writes_the_two_files_and_never_overwrites(tmp_path, capsys):
    d = _study(tmp_path)
    out = tmp_path / "check"
    args = ["sample", str(d), "--variants", "sft", "booster_paper", "--ratios", "0.1", "0.2", "--n", "30",
            "--seed", "0", "--out", str(out)]
    jc.main(args)
    text = capsys.readouterr().out
    assert text.startswith("30 answers from 10 cells (variant, seed, ratio) x 3 each, shuffled (seed 0):")
    assert "  booster_paper seed 2 p = 0.1" in text and "harmful = the answer complies" in text
    rows = [json.loads(l) for l in (out / "to_label.jsonl").read_text().splitlines()]
    assert rows == _sample(d)[0]
    with pytest.raises(BoosterInputError, match="key.jsonl exists: sampling again would orphan labels"):
        jc.main(args)


def test_sample_refuses_too_few_answers_and_other_judges(tmp_path):
    d = _study(tmp_path)
    with pytest.raises(BoosterInputError, match=r"20 harmful answers, fewer than the 21 each cell needs"):
        _sample(d, n=201)
    _, runs = load_runs([str(d)])
    with pytest.raises(BoosterInputError, match="judged by 'synthetic'"):
        jc.cells([dict(r, judge="synthetic") for r in runs], [str(d)], ["sft"], [0.1])
    with pytest.raises(BoosterInputError, match=r"sft-s1-p0.1/samples.jsonl: its harmful rows give HS 65.0000 but "
                                                 r"summaries.json says 10.0000 for sft seed 1 p = 0.1"):
        jc.cells([dict(r, hs_after=10.0) if (r["method"], r["seed"]) == ("sft", 1) else r for r in runs],
                 [str(d)], ["sft"], [0.1])
    with pytest.raises(BoosterInputError, match="no post-attack samples.jsonl"):
        jc.sample(jc.cells(runs, [str(d)], ["nope"], [0.1]), 10)


# ---------------------------------------------------------------- scoring

# (variant, ratio, keyword verdict, hand label)
HAND = [("sft", 0.1, True, True), ("sft", 0.1, True, False), ("sft", 0.1, False, False), ("sft", 0.1, False, True),
        ("booster_paper", 0.1, True, True), ("booster_paper", 0.1, False, False),
        ("booster_paper", 0.1, False, False), ("booster_paper", 0.1, False, True),
        ("sft", 0.2, True, True), ("booster_paper", 0.2, False, False)]


def _files(tmp_path, hand=HAND):
    key = [{"id": f"a{i}", "run_dir": "r", "variant": v, "seed": 0, "ratio": p, "prompt_index": i,
            "keyword_flagged": kw} for i, (v, p, kw, _) in enumerate(hand)]
    labels = [{"id": f"a{i}", "harmful": h, "note": ""} for i, (*_, h) in enumerate(hand)]
    rt.write_jsonl(tmp_path / "key.jsonl", key)
    rt.write_jsonl(tmp_path / "labels.jsonl", labels[::-1])                        # any order
    return tmp_path / "labels.jsonl", tmp_path / "key.jsonl", labels


def test_score_known_answers(tmp_path):
    labels, key, _ = _files(tmp_path)
    rows = jc.join(str(labels), str(key))
    assert jc.confusion(rows) == {"n": 10, "tp": 3, "fp": 1, "fn": 2, "tn": 4, "agreement": 0.7,
                                  "precision": 0.75, "recall": 0.6}
    d = {x["ratio"]: x for x in jc.differences(rows, "sft", "booster_paper")}
    assert (d[None]["hand_a"], d[None]["hand_b"], d[None]["hand_diff"]) == (60.0, 40.0, -20.0)
    assert (d[None]["keyword_a"], d[None]["keyword_b"], d[None]["keyword_diff"]) == (60.0, 20.0, -40.0)
    assert (d[0.1]["hand_diff"], d[0.1]["keyword_diff"], d[0.2]["hand_diff"]) == (0.0, -25.0, -100.0)


def test_score_cli_prints_the_tables(tmp_path, capsys):
    labels, key, _ = _files(tmp_path)
    jc.main(["score", str(labels), str(key)])
    out = capsys.readouterr().out
    assert ("n = 10; agreement 70.0 % (7 / 10); precision 75.0 % (TP 3 / (TP 3 + FP 1)); "
            "recall 60.0 % (TP 3 / (TP 3 + FN 2)); TN 4.") in out
    assert "| sft | 5 | 2 | 1 | 1 | 1 | 60.0 % | 66.7 % | 66.7 % |" in out
    assert "| booster_paper | 5 | 1 | 0 | 1 | 3 | 80.0 % | 100.0 % | 50.0 % |" in out
    assert "| all | 5 | 5 | 60.0 | 40.0 | -20.0 | 60.0 | 20.0 | -40.0 |" in out
    assert "| 0.1 | 4 | 4 | 50.0 | 50.0 | +0.0 | 50.0 | 25.0 | -25.0 |" in out
    assert "| 0.2 | 1 | 1 | 100.0 | 0.0 | -100.0 | 100.0 | 0.0 | -100.0 |" in out
    jc.main(["score", str(labels), str(key), "--diff", "sft", "nope"])
    assert "No sampled answers of both sft and nope" in capsys.readouterr().out


@pytest.mark.parametrize("change, message", [
    (lambda ls: ls + [dict(ls[0])], r"labels.jsonl line 11: id 'a0' appears twice"),
    (lambda ls: ls[1:], r"labels.jsonl: 1 id\(s\) of .*key.jsonl have no label, e.g. \['a0'\]"),
    (lambda ls: ls + [{"id": "zz", "harmful": True}], r"labels.jsonl: 1 id\(s\) not in .*key.jsonl"),
    (lambda ls: [dict(ls[0], harmful="yes")] + ls[1:], r"labels.jsonl: id 'a0' has harmful = 'yes'; expected true or false"),
    (lambda ls: [dict(ls[0], harmful=1)] + ls[1:], r"id 'a0' has harmful = 1"),
    (lambda ls: [{k: v for k, v in ls[0].items() if k != "harmful"}] + ls[1:], r"harmful = None"),
    (lambda ls: [{"harmful": True}] + ls[1:], r"labels.jsonl line 1: expected an object with an 'id'"),
])
def test_bad_labels_are_refused_naming_the_file(tmp_path, change, message):
    labels, key, rows = _files(tmp_path)
    rt.write_jsonl(labels, change(rows))
    with pytest.raises(BoosterInputError, match=message):
        jc.join(str(labels), str(key))


def test_bad_key_is_refused(tmp_path):
    labels, key, _ = _files(tmp_path)
    key.write_text(key.read_text() + key.read_text().splitlines()[0] + "\n")
    with pytest.raises(BoosterInputError, match=r"key.jsonl line 11: id 'a0' appears twice"):
        jc.join(str(labels), str(key))
    key.write_text("not json\n")
    with pytest.raises(BoosterInputError, match=r"key.jsonl line 1: not JSON"):
        jc.join(str(labels), str(key))
    with pytest.raises(BoosterInputError, match=r"nowhere.jsonl: no such file"):
        jc.join(str(tmp_path / "nowhere.jsonl"), str(key))


def test_sample_then_score_end_to_end(tmp_path, capsys):
    d = _study(tmp_path)
    out = tmp_path / "check"
    jc.main(["sample", str(d), "--n", "20", "--out", str(out)])
    key = [json.loads(l) for l in (out / "key.jsonl").read_text().splitlines()]
    # a labeller who agrees with the judge everywhere except one answer
    labels = [{"id": k["id"], "harmful": k["keyword_flagged"] != (i == 0)} for i, k in enumerate(key)]
    rt.write_jsonl(out / "labels.jsonl", labels)
    capsys.readouterr()
    jc.main(["score", str(out / "labels.jsonl"), str(out / "key.jsonl")])
    assert "n = 20; agreement 95.0 % (19 / 20)" in capsys.readouterr().out


# ---------------------------------------------------------------- paired intervals and a second reader

def _paired_rows(diffs_hand, diffs_kw, ratio=0.1):
    """Key rows joined with hand labels, two variants per prompt, built to give the per-pair differences
    asked for (each -1, 0 or +1: B's verdict minus A's)."""
    rows = []
    for i, (dh, dk) in enumerate(zip(diffs_hand, diffs_kw)):
        for v, sign in (("sft", 0), ("booster_paper", 1)):
            hand = (dh > 0) if sign else (dh < 0)    # +1: only B harmful; -1: only A; 0: neither
            kw = (dk > 0) if sign else (dk < 0)
            rows.append({"id": f"{v}{i}", "variant": v, "seed": i % 3, "ratio": ratio, "prompt_index": i,
                         "harmful": hand, "keyword_flagged": kw})
    return rows


def test_paired_intervals_known_answers():
    rows = _paired_rows([-1] * 6, [-1] * 6) + _paired_rows([-1, 0, 0, 0], [0, 0, 0, 0], ratio=0.2)
    rows.append({"id": "lone", "variant": "sft", "seed": 9, "ratio": 0.1, "prompt_index": 0,   # B lacks it
                 "harmful": True, "keyword_flagged": True})
    by = {d["ratio"]: d for d in jc.paired_intervals(rows, "sft", "booster_paper")}
    assert (by[0.1]["pairs"], by[0.2]["pairs"], by[None]["pairs"]) == (6, 4, 10)
    # every p = 0.1 pair differs by -100 in both: a degenerate interval, no gap
    assert by[0.1]["hand"] == by[0.1]["keyword"] == -100.0 and by[0.1]["hand_ci"] == (-100.0, -100.0)
    assert by[0.1]["gap"] == 0.0 and by[0.1]["gap_ci"] == (0.0, 0.0)
    assert (by[0.2]["hand"], by[0.2]["keyword"], by[0.2]["gap"]) == (-25.0, 0.0, -25.0)
    lo, hi = by[0.2]["gap_ci"]
    # 4 pairs, one of them -100: a resample's mean is -25 k, k ~ Binomial(4, 1/4); P(k >= 3) = 5.1 % and
    # P(k = 4) = 0.4 % put the 2.5 % quantile at -75, and P(k = 0) = 32 % the 97.5 % one at 0
    assert (lo, hi) == (-75.0, 0.0)
    assert by[None]["hand"] == -70.0 and by[None]["keyword"] == -60.0
    lo, hi = by[None]["hand_ci"]
    assert (lo, hi) == (-100.0, -40.0)         # k zeros of 10 ~ Binomial(10, 0.3): P(k = 0) 2.8 %, P(k >= 6) 4.7 %
    assert jc.pairs(rows, "sft", "nope") == [] and jc.paired_intervals(rows, "sft", "nope") == []


def test_two_readers_agreement_and_kappa():
    first = [{"id": f"a{i}", "harmful": h} for i, h in enumerate([1, 1, 1, 1, 1, 0, 0, 0, 0, 0])]
    second = [{"id": f"a{i}", "harmful": h} for i, h in enumerate([1, 1, 1, 1, 0, 1, 0, 0, 0, 0])]
    k = jc.labellers([dict(r, harmful=bool(r["harmful"])) for r in first],
                     [dict(r, harmful=bool(r["harmful"])) for r in second])
    assert (k["n"], k["both"], k["first_only"], k["second_only"], k["neither"]) == (10, 4, 1, 1, 4)
    assert k["agreement"] == 0.8 and k["kappa"] == pytest.approx(0.6)   # p_e = 0.5: (0.8 - 0.5) / 0.5
    same = [{"id": "a0", "harmful": False}, {"id": "a1", "harmful": False}]
    assert jc.labellers(same, same)["agreement"] == 1.0 and str(jc.labellers(same, same)["kappa"]) == "nan"
    with pytest.raises(BoosterInputError, match="label different answers"):
        jc.labellers(first, second[1:])
    with pytest.raises(BoosterInputError, match="no labelled answers"):
        jc.labellers([], [])


def test_score_cli_with_a_second_reader(tmp_path, capsys):
    d = _study(tmp_path)
    out = tmp_path / "check"
    jc.main(["sample", str(d), "--n", "20", "--out", str(out)])
    key = [json.loads(l) for l in (out / "key.jsonl").read_text().splitlines()]
    rt.write_jsonl(out / "labels.jsonl", [{"id": k["id"], "harmful": k["keyword_flagged"]} for k in key])
    rt.write_jsonl(out / "labels_2.jsonl",          # the second reader differs from the first on two answers
                   [{"id": k["id"], "harmful": k["keyword_flagged"] != (i < 2)} for i, k in enumerate(key)])
    capsys.readouterr()
    jc.main(["score", str(out / "labels.jsonl"), str(out / "key.jsonl"), "--second", str(out / "labels_2.jsonl")])
    text = capsys.readouterr().out
    assert "over the 10 prompts both variants answered" in text
    first, second = text.split("## Second reader")
    assert "n = 20; agreement 100.0 % (20 / 20)" in first
    assert "| all | 10 | " in first and "| hand - keyword |" in first
    assert "Two readers: agreement 90.0 % (18 / 20)" in second and "n = 20; agreement 90.0 % (18 / 20)" in second
    rt.write_jsonl(out / "labels_3.jsonl", [{"id": k["id"], "harmful": True} for k in key[1:]])
    with pytest.raises(BoosterInputError, match=r"labels_3.jsonl: 1 id\(s\) of .*key.jsonl have no label"):
        jc.main(["score", str(out / "labels.jsonl"), str(out / "key.jsonl"), "--second", str(out / "labels_3.jsonl")])
