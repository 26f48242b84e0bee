#!/usr/bin/env bash
# Issue 26's pre-registered study (configs/real/study/study.yaml, docs/results/real_study.md), in its
# pre-registered order: the primary endpoint's cells (p = 0.1) at all eight seeds first, then p = 0 and 0.2
# at seeds 10-13. Every cell is a finished stage under $STUDY_DIR/s<seed>: rerunning this script resumes
# where it stopped (the stage store) and redoes nothing that finished.
#   bash configs/real/study/run_study.sh              # STUDY_DIR defaults to runs/real/study
#   python -m booster_jax.eval.studies runs/real/study/s1? --paired sft booster_paper
set -euo pipefail
cd "$(dirname "$0")/../../.."
OUT=${STUDY_DIR:-runs/real/study}
for s in 10 11 12 13 14 15 16 17; do
  python run.py configs/real/study/study.yaml "grid.seeds=[$s]" "run.output_dir=$OUT/s$s" --no-progress
done
for s in 10 11 12 13; do
  python run.py configs/real/study/study.yaml "grid.seeds=[$s]" "grid.harmful_ratios=[0.1,0,0.2]" \
    "run.output_dir=$OUT/s$s" --no-progress
done
