#!/usr/bin/env bash
# Issue 26's pre-registered study (configs/real/study/study.yaml, docs/results/real_study.md), in its
# pre-registered order: the primary endpoint's cells (p = 0.1) at all eight seeds first, then p = 0 and 0.2
# at seeds 10-13. Every cell is a finished stage under $STUDY_DIR/s<seed>: rerunning this script resumes
# where it stopped (the stage store) and redoes nothing that finished.
#   bash configs/real/study/run_study.sh              # STUDY_DIR defaults to runs/real/study
#   python -m booster_jax.eval.studies runs/real/study/s1? --paired sft booster_paper
#
# Lanes: one process keeps ~1.55 of 2 cores busy, and an evaluation beside a training stage loses little,
# so the seeds can be split over LANES processes started side by side, LANE = 0 .. LANES-1:
#   for l in 0 1; do LANES=2 LANE=$l bash configs/real/study/run_study.sh > lane$l.log 2>&1 & done
# Lane l takes every LANES-th seed from the l-th, in order. The same commands run, with the same output
# directories (the run-directory lock refuses two processes on one seed). No lane starts a p = 0 / 0.2 cell
# before every seed's p = 0.1 grid has finished (its summaries.json), so the primary endpoint still comes
# first. Without LANES the script runs every seed in one process, as before. A seed whose summaries.json exists
# is not run again at p = 0.1 (cells.sh restore puts finished seeds back on a new machine, without checkpoints).
set -euo pipefail
cd "$(dirname "$0")/../../.."
OUT=${STUDY_DIR:-runs/real/study}
LANES=${LANES:-1}
LANE=${LANE:-0}
if ! [[ "$LANES" =~ ^[1-9][0-9]*$ && "$LANE" =~ ^[0-9]+$ ]] || (( LANE >= LANES )); then
  echo "run_study.sh: LANES must be a positive integer and LANE one of 0..LANES-1 (got LANES=$LANES LANE=$LANE)" >&2
  exit 2
fi
PRIMARY_SEEDS=(10 11 12 13 14 15 16 17)
SECONDARY_SEEDS=(10 11 12 13)

mine() {  # the seeds of this lane: every LANES-th from the LANE-th
  local i=0 s
  for s in "$@"; do
    if (( i % LANES == LANE )); then echo "$s"; fi
    i=$((i + 1))
  done
}

for s in $(mine "${PRIMARY_SEEDS[@]}"); do
  if [ -f "$OUT/s$s/summaries.json" ]; then  # finished here, or restored by cells.sh restore on a new machine
    echo "run_study.sh lane $LANE: seed $s's p = 0.1 grid has finished ($OUT/s$s/summaries.json): skipped" >&2
    continue
  fi
  python run.py configs/real/study/study.yaml "grid.seeds=[$s]" "run.output_dir=$OUT/s$s" --no-progress
done
for s in "${PRIMARY_SEEDS[@]}"; do  # every seed's p = 0.1 grid, the other lanes' too (one lane: all done)
  if [ ! -f "$OUT/s$s/summaries.json" ]; then echo "run_study.sh lane $LANE: waiting for seed $s's p = 0.1 grid" >&2; fi
  while [ ! -f "$OUT/s$s/summaries.json" ]; do sleep "${LANE_POLL_S:-60}"; done
done
for s in $(mine "${SECONDARY_SEEDS[@]}"); do
  python run.py configs/real/study/study.yaml "grid.seeds=[$s]" "grid.harmful_ratios=[0.1,0,0.2]" \
    "run.output_dir=$OUT/s$s" --no-progress
done
