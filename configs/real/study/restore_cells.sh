#!/usr/bin/env bash
# Issue 26's study on a new machine: put the finished evaluations recorded by save_cells.sh ($CELLS) back into
# a new study directory ($STUDY_DIR), so that they are reused rather than redone.
#
# Restored: each seed directory's own files (config.yaml, inputs.json, the run marker, and summaries.json once
# that seed's grid had finished), its finished evaluations (eval/<tag>/: fingerprint, summary.json,
# samples.jsonl) and the base evaluation (cache/eval-base). An evaluation is reused only when its recorded
# fingerprint matches the configuration (evaluate.py), so a changed setting redoes it. Not restored: the
# alignment and attack records (align/, finetune/), whose checkpoints were never saved: those stages train
# again, as deterministically as before, when a cell needs their weights; their records stay in $CELLS for the
# analysis. run_study.sh skips a seed whose p = 0.1 grid has finished (its summaries.json), so a restored
# seed is not retrained just to reach evaluations that exist. Files already in $STUDY_DIR are never replaced.
#   STUDY_DIR=/root/new/code/runs/real/study bash configs/real/study/restore_cells.sh
set -euo pipefail
cd "$(dirname "$0")/../../.."
STUDY=${STUDY_DIR:-runs/real/study}
CELLS=${CELLS:-docs/results/real_study/cells}
if [ ! -d "$CELLS" ]; then
  echo "restore_cells.sh: CELLS $CELLS is not a directory (save_cells.sh's output)" >&2
  exit 2
fi
shopt -s nullglob dotglob

restore_files() {  # restore_files SRC_DIR DEST_DIR: SRC_DIR's plain files that DEST_DIR lacks
  local src=$1 dest=$2 f
  mkdir -p "$dest"
  for f in "$src"/*; do
    if [ -f "$f" ] && [ ! -e "$dest/$(basename "$f")" ]; then cp -p "$f" "$dest/"; fi
  done
}

n=0
for cell in "$CELLS"/s1?; do
  name=$(basename "$cell")
  restore_files "$cell" "$STUDY/$name"
  for stage in "$cell"/eval/*/; do
    stage=${stage%/}
    if [ -f "$stage/summary.json" ]; then restore_files "$stage" "$STUDY/$name/eval/$(basename "$stage")"; n=$((n + 1)); fi
  done
done
for stage in "$CELLS"/cache/eval-base/*/; do
  stage=${stage%/}
  if [ -f "$stage/summary.json" ]; then restore_files "$stage" "$STUDY/cache/eval-base/$(basename "$stage")"; n=$((n + 1)); fi
done
echo "restore_cells.sh: $n finished evaluations of $CELLS restored under $STUDY"
