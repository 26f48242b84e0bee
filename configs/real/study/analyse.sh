#!/usr/bin/env bash
# Issue 26's pre-registered analysis (docs/results/real_study.md), every command of its table in one go, over
# the seeds under $STUDY_DIR (default runs/real/study) whose grid has finished. Writes the outputs to $OUT
# (default docs/results/real_study/): the paired table, test and plot at 64 and at 24 tokens, the mechanism table
# and the per-seed Fig. 3 curves. Safe to rerun at any point of the study: unfinished seeds are left out.
# A seed's summaries-*.json files (cells run in parts, docs/results/real_study.md's log) join its summaries.json.
#   bash configs/real/study/analyse.sh                  # from the checkout that holds the cells
#   STUDY_DIR=/root/booster-study2/code/runs/real/study bash configs/real/study/analyse.sh
set -euo pipefail
cd "$(dirname "$0")/../../.."
STUDY=${STUDY_DIR:-runs/real/study}
OUT=${OUT:-docs/results/real_study}
TOKENIZER=${TOKENIZER:-data/real/smollm2-135m-instruct}
mkdir -p "$OUT"
shopt -s nullglob
DIRS=()
for d in "$STUDY"/s1?; do  # a seed counts once its grid has finished (run.py writes summaries.json last)
  if [ ! -f "$d/summaries.json" ]; then echo "analyse.sh: $d not finished yet, left out" >&2; continue; fi
  DIRS+=("$d")
  # Cells run in parts (run_parts.sh: on a machine without the earlier stages' checkpoints) keep each part's
  # summaries as summaries-<part>.json beside the seed's own; studies merges them, and a (variant, seed, ratio)
  # found twice must carry the same numbers.
  for f in "$d"/summaries-*.json; do DIRS+=("$f"); done
done
if [ ${#DIRS[@]} -eq 0 ]; then
  echo "analyse.sh: no finished seed directory (s1?/summaries.json) under $STUDY: run configs/real/study/run_study.sh first" >&2
  exit 2
fi
# the pre-registered design: the verdict at a ratio is withheld until each of these seeds is paired there
EXPECT="--expect 0.1:10-17 --expect 0:10-13 --expect 0.2:10-13"
python -m booster_jax.eval.studies "${DIRS[@]}" --paired sft booster_paper $EXPECT --plot "$OUT" | tee "$OUT/paired_64.txt"
python -m booster_jax.eval.studies "${DIRS[@]}" --paired sft booster_paper $EXPECT --max-tokens 24 \
  --tokenizer "$TOKENIZER" --plot "$OUT" | tee "$OUT/paired_24.txt"
python -m booster_jax.eval.studies "${DIRS[@]}" --mechanism --plot "$OUT" | tee "$OUT/mechanism.txt"
