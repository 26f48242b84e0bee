"""configs/real/study/run_study.sh runs the pre-registered cells in the pre-registered order, in one process
or split over lanes. Checked with a stand-in ``python`` on PATH that records each call (no model runs):

* without LANES: the eight p = 0.1 runs (seeds 10..17), then the four full-grid runs (10..13), in order;
* with LANES=2, two lanes side by side: the same twelve calls, each exactly once, seeds split alternately;
  no full-grid call starts before every seed's p = 0.1 run has finished, even when the last of them is slow;
* a seed whose p = 0.1 grid has finished (its summaries.json, e.g. restored on a new machine) is not run again
  at p = 0.1, but still gets its p = 0 / 0.2 run;
* a bad LANE / LANES stops with a message naming them, before any run.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.script_stub import install_python_stub

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "configs", "real", "study", "run_study.sh")

# Records "start|end <args>" per call; a p = 0.1 run (no harmful_ratios override) writes its summaries.json,
# as run.py does last. Seed 17's p = 0.1 run is slow, so the other lane reaches the barrier first.
STUB = r"""#!/usr/bin/env bash
args="$*"
echo "start $args" >> "$CALLS"
case "$args" in *"grid.seeds=[17]"*) case "$args" in *harmful_ratios*) ;; *) sleep 1 ;; esac ;; esac
case "$args" in
  *harmful_ratios*) ;;
  *) dir=$(printf '%s\n' "$@" | sed -n 's/^run.output_dir=//p'); mkdir -p "$dir"; echo '{}' > "$dir/summaries.json" ;;
esac
echo "end $args" >> "$CALLS"
"""


@pytest.fixture
def tree(tmp_path):
    """A copy of the script in a bare tree, and a PATH whose python is the stub."""
    study = tmp_path / "repo" / "configs" / "real" / "study"
    study.mkdir(parents=True)
    shutil.copy(SCRIPT, study / "run_study.sh")
    bin_dir = install_python_stub(tmp_path, STUB)
    calls = tmp_path / "calls.txt"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", CALLS=str(calls), LANE_POLL_S="0.05",
               STUDY_DIR=str(tmp_path / "study"))
    env.pop("LANES", None)
    env.pop("LANE", None)
    return study / "run_study.sh", env, calls


def _events(calls):
    return [line.split(" ", 1) for line in calls.read_text().splitlines()]


def _seed(args):
    return int(args.split("grid.seeds=[", 1)[1].split("]", 1)[0])


def test_one_process_runs_the_cells_in_the_preregistered_order(tree):
    script, env, calls = tree
    subprocess.run(["bash", str(script)], env=env, check=True, timeout=60)
    starts = [args for kind, args in _events(calls) if kind == "start"]
    primary = [_seed(a) for a in starts if "harmful_ratios" not in a]
    secondary = [_seed(a) for a in starts if "harmful_ratios" in a]
    assert primary == list(range(10, 18))
    assert secondary == [10, 11, 12, 13]
    assert starts.index(next(a for a in starts if "harmful_ratios" in a)) == 8   # every p = 0.1 run first
    assert all("grid.harmful_ratios=[0.1,0,0.2]" in a for a in starts[8:])
    assert all(f"run.output_dir={env['STUDY_DIR']}/s{_seed(a)}" in a for a in starts)


def test_two_lanes_split_the_same_calls_and_wait_for_every_primary_cell(tree):
    script, env, calls = tree
    lanes = [subprocess.Popen(["bash", str(script)], env=dict(env, LANES="2", LANE=str(lane)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for lane in (0, 1)]
    outs = [p.communicate(timeout=60) for p in lanes]
    assert [p.returncode for p in lanes] == [0, 0], outs
    events = _events(calls)
    starts = [args for kind, args in events if kind == "start"]
    assert sorted((_seed(a), "harmful_ratios" in a) for a in starts) == sorted(
        [(s, False) for s in range(10, 18)] + [(s, True) for s in range(10, 14)])          # each call once
    last_primary_end = max(i for i, (kind, a) in enumerate(events) if kind == "end" and "harmful_ratios" not in a)
    first_secondary = min(i for i, (kind, a) in enumerate(events) if kind == "start" and "harmful_ratios" in a)
    assert first_secondary > last_primary_end      # the barrier held while seed 17 was still running
    assert "waiting for seed 17" in outs[0][1]     # lane 0 finished its seeds first and said what it waits on


def test_a_finished_seed_is_not_run_again_at_the_primary_ratio(tree):
    script, env, calls = tree
    finished = os.path.join(env["STUDY_DIR"], "s12")
    os.makedirs(finished)
    with open(os.path.join(finished, "summaries.json"), "w") as f:
        f.write("{}")
    r = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, check=True, timeout=60)
    starts = [args for kind, args in _events(calls) if kind == "start"]
    assert [_seed(a) for a in starts if "harmful_ratios" not in a] == [10, 11, 13, 14, 15, 16, 17]
    assert [_seed(a) for a in starts if "harmful_ratios" in a] == [10, 11, 12, 13]
    assert "seed 12's p = 0.1 grid has finished" in r.stderr


@pytest.mark.parametrize("lanes,lane", [("0", "0"), ("2", "2"), ("two", "0"), ("2", "-1")])
def test_bad_lane_settings_stop_before_any_run(tree, lanes, lane):
    script, env, calls = tree
    r = subprocess.run(["bash", str(script)], env=dict(env, LANES=lanes, LANE=lane), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2
    assert "LANES must be a positive integer and LANE one of 0..LANES-1" in r.stderr
    assert not calls.exists()
