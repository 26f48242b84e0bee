#!/usr/bin/env bash
# Issue 26's study: copy every FINISHED stage's record (no checkpoint) from $STUDY_DIR into $CELLS, so that the
# finished cells can be committed and outlive the machine that ran them. The study takes ~20 hours of CPU over
# several sessions, and a session's machine can be replaced between sessions, taking the run directories with it.
#
# Copied, per seed directory s1? and for the shared base evaluation (cache/eval-base):
#   the run directory's own files (config.yaml, inputs.json, summaries.json once its grid has finished);
#   eval/<tag>/        once summary.json exists: summary.json, samples.jsonl (every prompt's answer), fingerprint
#                      (not generations.jsonl, the resume log that samples.jsonl repeats, and not eval/base, the
#                      copy of cache/eval-base every seed holds);
#   align/<fp>/, finetune/<tag>/   once DONE exists: metrics.jsonl, track.jsonl, variants.txt, DONE, fingerprint.
# Only a stage directory's plain files are copied, never its sub-directories (the Orbax checkpoints, ~MBs
# each); locks and XLA's compilation cache are left out. An unfinished stage is left out whole. Rerunning is
# safe: it adds the stages that finished since and copies the others again, unchanged.
# That is everything configs/real/study/analyse.sh and judge_check read, so both run on $CELLS as on the study.
# On a new machine, configs/real/study/restore_cells.sh puts the finished evaluations back into a new study.
#   STUDY_DIR=/root/booster-study3/code/runs/real/study bash configs/real/study/save_cells.sh
set -euo pipefail
cd "$(dirname "$0")/../../.."
STUDY=${STUDY_DIR:-runs/real/study}
CELLS=${CELLS:-docs/results/real_study/cells}
if [ ! -d "$STUDY" ]; then
  echo "save_cells.sh: STUDY_DIR $STUDY is not a directory (the study's runs/real/study)" >&2
  exit 2
fi
shopt -s nullglob dotglob

copy_files() {  # copy_files SRC_DIR DEST_DIR: the plain files directly in SRC_DIR, no locks
  local src=$1 dest=$2 f
  mkdir -p "$dest"
  for f in "$src"/*; do
    case "$(basename "$f")" in *.lock|generations.jsonl) continue ;; esac
    if [ -f "$f" ]; then cp -p "$f" "$dest/"; fi
  done
}

n=0
for run in "$STUDY"/s1?; do
  name=$(basename "$run")
  copy_files "$run" "$CELLS/$name"
  for stage in "$run"/eval/*/; do
    stage=${stage%/}
    if [ "$(basename "$stage")" != base ] && [ -f "$stage/summary.json" ]; then
      copy_files "$stage" "$CELLS/$name/eval/$(basename "$stage")"; n=$((n + 1))
    fi
  done
  for kind in align finetune; do
    for stage in "$run/$kind"/*/; do
      stage=${stage%/}
      if [ -f "$stage/DONE" ]; then copy_files "$stage" "$CELLS/$name/$kind/$(basename "$stage")"; n=$((n + 1)); fi
    done
  done
done
for stage in "$STUDY"/cache/eval-base/*/; do
  stage=${stage%/}
  if [ -f "$stage/summary.json" ]; then copy_files "$stage" "$CELLS/cache/eval-base/$(basename "$stage")"; n=$((n + 1)); fi
done
echo "save_cells.sh: $n finished stages of $STUDY recorded under $CELLS"
