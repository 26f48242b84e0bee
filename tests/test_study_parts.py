"""configs/real/study/run_parts.sh runs a seed's p = 0 / 0.2 cells in parts (one variant, some ratios) on a
machine without the earlier stages' checkpoints, and analyse.sh reads the parts' summaries. Checked with a
stand-in ``python`` on PATH that records each call and, as run.py does last, writes the run directory's
summaries.json (no model runs):

* each part is one run.py call with the study config, the seed, the ratios and only its variant;
* the part's summaries end in summaries-<variant>-p<ratios>.json; the seed's own summaries.json (p = 0.1) is
  put back unchanged, and no backup is left behind;
* a rerun skips the parts whose file exists; a failed part keeps the seed's summaries.json;
* a malformed entry or a seed without its p = 0.1 summaries stops before any run, naming it;
* analyse.sh passes each finished seed's part files to studies after the seed's directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from tests.script_stub import install_python_stub

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDY_SCRIPTS = os.path.join(ROOT, "configs", "real", "study")

# One line per call in $CALLS; a run.py call writes {"call": <its arguments>} to its output directory's
# summaries.json, unless $FAIL names a word of its arguments (then it exits 1 before writing).
STUB = r"""#!/usr/bin/env bash
printf '%s\n' "$*" >> "$CALLS"
if [ -n "${FAIL:-}" ]; then case "$*" in *"$FAIL"*) exit 1 ;; esac; fi
dir=$(printf '%s\n' "$@" | sed -n 's/^run.output_dir=//p')
if [ -n "$dir" ]; then printf '{"call": "%s"}' "$*" | sed 's/\[/(/g; s/\]/)/g' > "$dir/summaries.json"; fi
exit 0
"""


@pytest.fixture
def tree(tmp_path):
    """The scripts in a bare tree, a study whose seeds 10 and 11 finished p = 0.1, and a stub python."""
    study_dir = tmp_path / "repo" / "configs" / "real" / "study"
    study_dir.mkdir(parents=True)
    for name in ("run_parts.sh", "analyse.sh"):
        shutil.copy(os.path.join(STUDY_SCRIPTS, name), study_dir / name)
    bin_dir = install_python_stub(tmp_path, STUB)
    study = tmp_path / "study"
    for s in (10, 11):
        (study / f"s{s}").mkdir(parents=True)
        (study / f"s{s}" / "summaries.json").write_text(f'{{"primary": {s}}}')
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", CALLS=str(tmp_path / "calls.txt"),
               STUDY_DIR=str(study))
    env.pop("PARTS", None)
    env.pop("FAIL", None)
    return study_dir, study, env, tmp_path / "calls.txt"


def _parts(tree, parts, **extra):
    study_dir, _, env, _ = tree
    return subprocess.run(["bash", str(study_dir / "run_parts.sh")], env=dict(env, PARTS=parts, **extra),
                          capture_output=True, text=True)


def _calls(tree):
    calls = tree[3]
    return calls.read_text().splitlines() if calls.exists() else []


def test_each_part_runs_its_variant_and_ratios_and_keeps_its_summaries(tree):
    _, study, _, _ = tree
    out = _parts(tree, "10:booster_paper:0,0.2 11:sft:0.2")
    assert out.returncode == 0, out.stderr
    calls = _calls(tree)
    assert len(calls) == 2
    first, second = calls
    assert first.startswith("run.py configs/real/study/study.yaml grid.seeds=[10] grid.harmful_ratios=[0,0.2] ")
    assert "grid.variants={booster_paper: {align.method: booster, align.booster.lam: 5, " \
           "align.booster.alpha: 0.1}}" in first and "sft" not in first
    assert f"run.output_dir={study}/s10" in first
    assert "grid.seeds=[11] grid.harmful_ratios=[0.2] grid.variants={sft: {align.method: sft}}" in second
    assert "booster" not in second
    # the parts' summaries are kept under their own names, the seeds' own are back, nothing else is left
    assert json.loads((study / "s10" / "summaries-booster_paper-p0_0.2.json").read_text())["call"].startswith(
        "run.py configs/real/study/study.yaml grid.seeds=(10)")
    assert "grid.seeds=(11)" in (study / "s11" / "summaries-sft-p0.2.json").read_text()
    for s in (10, 11):
        assert json.loads((study / f"s{s}" / "summaries.json").read_text()) == {"primary": s}
        assert sorted(os.listdir(study / f"s{s}")) == sorted(
            ["summaries.json", "summaries-booster_paper-p0_0.2.json" if s == 10 else "summaries-sft-p0.2.json"])


def test_a_rerun_skips_finished_parts_and_a_failed_part_keeps_the_seeds_summaries(tree):
    _, study, _, _ = tree
    assert _parts(tree, "10:sft:0,0.2").returncode == 0
    out = _parts(tree, "10:sft:0,0.2 10:booster_paper:0,0.2", FAIL="booster")
    assert out.returncode == 1
    assert "summaries-sft-p0_0.2.json exists, skipped" in out.stderr
    calls = _calls(tree)
    assert len(calls) == 2 and "grid.variants={booster_paper" in calls[1]  # the finished part was not rerun
    assert json.loads((study / "s10" / "summaries.json").read_text()) == {"primary": 10}
    assert not (study / "s10" / "summaries-booster_paper-p0_0.2.json").exists()


@pytest.mark.parametrize("parts, named", [
    ("10:vaccine:0", "'10:vaccine:0'"),
    ("10:sft", "'10:sft'"),
    ("ten:sft:0", "'ten:sft:0'"),
    ("10:sft:0;0.2", "'10:sft:0;0.2'"),
    ("10:sft:0 12:sft:0", "s12/summaries.json is missing"),
])
def test_a_bad_entry_or_an_unfinished_seed_stops_before_any_run(tree, parts, named):
    out = _parts(tree, parts)
    assert out.returncode == 2
    assert named in out.stderr
    assert _calls(tree) == []


def test_analyse_passes_each_finished_seeds_part_files(tree):
    study_dir, study, env, _ = tree
    (study / "s10" / "summaries-sft-p0_0.2.json").write_text("{}")
    (study / "s12").mkdir()  # unfinished seed: no summaries.json, so its part file is not read either
    (study / "s12" / "summaries-sft-p0_0.2.json").write_text("{}")
    out = subprocess.run(["bash", str(study_dir / "analyse.sh")], env=dict(env, OUT=str(study / "out")),
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "s12 not finished yet, left out" in out.stderr
    calls = _calls(tree)
    assert len(calls) == 3  # paired at 64 and at 24 tokens, mechanism
    for call in calls:
        assert call.startswith("-m booster_jax.eval.studies ")
        assert f"{study}/s10 {study}/s10/summaries-sft-p0_0.2.json {study}/s11 " in call
        assert "s12" not in call
