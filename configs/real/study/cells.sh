#!/usr/bin/env bash
# Issue 26's study outlives its machine: the study takes ~20 hours of CPU over several sessions, and a session's
# machine can be replaced between sessions, taking the run directories with it.
#   bash configs/real/study/cells.sh save      # $STUDY_DIR -> $CELLS: every finished stage's record, committed
#   bash configs/real/study/cells.sh restore   # $CELLS -> $STUDY_DIR (a new machine): the finished evaluations
# STUDY_DIR defaults to runs/real/study, CELLS to docs/results/real_study/cells.
#
# save copies, per seed directory s1? and for the shared base evaluation (cache/eval-base):
#   the run directory's own files (config.yaml, inputs.json, the run marker, summaries.json once its grid ended);
#   eval/<tag>/        once summary.json exists: summary.json, samples.jsonl (every prompt's answer), fingerprint
#                      (not generations.jsonl, the resume log that samples.jsonl repeats, nor eval/base, the copy
#                      of cache/eval-base that every seed holds);
#   align/<fp>/, finetune/<tag>/   once DONE exists: metrics.jsonl, track.jsonl, variants.txt, DONE, fingerprint.
#                      A stage saved before keeps its first record: the evaluations saved with it came from it.
#                      Retrained on a new machine (no checkpoints), the same weights are not copied again, and
#                      other weights (another CPU rounds float32 differently) go to reruns/s1?/<kind>/<stage>-
#                      <checksum>/, the record of what the later evaluations of that seed were computed from.
# Only a stage directory's plain files are copied, never its sub-directories (the Orbax checkpoints, ~28 MB
# each); locks and XLA's compilation cache are left out, and so is an unfinished stage, whole. Rerunning adds
# what finished since. That is everything analyse.sh and judge_check read, so both run on $CELLS as on the study.
#
# restore copies back the run directories' own files and the finished evaluations, never replacing a file the
# study directory has. An evaluation is reused only when its fingerprint matches the configuration
# (evaluate.py). The training records are not restored (their checkpoints were never saved): those stages
# train again, deterministically, when a cell needs their weights. run_study.sh skips a seed whose p = 0.1 grid
# has finished (its summaries.json), so a restored seed is not retrained just to reach evaluations that exist.
set -euo pipefail
cd "$(dirname "$0")/../../.."
STUDY=${STUDY_DIR:-runs/real/study}
CELLS=${CELLS:-docs/results/real_study/cells}
MODE=${1:-}
case "$MODE" in
  save) FROM=$STUDY; TO=$CELLS; FROM_NAME="STUDY_DIR (the study's runs/real/study)" ;;
  restore) FROM=$CELLS; TO=$STUDY; FROM_NAME="CELLS (what cells.sh save wrote)" ;;
  *) echo "cells.sh: the first argument must be save or restore (got '${MODE}')" >&2; exit 2 ;;
esac
if [ ! -d "$FROM" ]; then
  echo "cells.sh $MODE: $FROM_NAME $FROM is not a directory" >&2
  exit 2
fi
shopt -s nullglob dotglob

copy_files() {  # copy_files SRC_DIR DEST_DIR: SRC_DIR's plain files; restore never replaces one
  local src=$1 dest=$2 f
  mkdir -p "$dest"
  for f in "$src"/*; do
    case "$(basename "$f")" in *.lock|*.bak|generations.jsonl) continue ;; esac
    if [ ! -f "$f" ] || { [ "$MODE" = restore ] && [ -e "$dest/$(basename "$f")" ]; }; then continue; fi
    cp -p "$f" "$dest/"
  done
}

checksum() {  # the weights' checksum a training stage's DONE records (empty when it records none)
  sed -n 's/.*"checksum": *"\([0-9a-f]*\)".*/\1/p' "$1" 2>/dev/null | head -n 1
}

n=0
copy_stages() {  # copy_stages PARENT DEST_PARENT MARKER [RERUNS]: each PARENT/<stage>/ holding MARKER (finished)
  local stage dest ck
  for stage in "$1"/*/; do
    stage=${stage%/}
    if [ "$(basename "$stage")" != base ] && [ -f "$stage/$3" ]; then
      dest=$2/$(basename "$stage")
      if [ -n "${4:-}" ] && [ -f "$dest/DONE" ]; then  # a training stage saved before: keep that record
        ck=$(checksum "$stage/DONE")
        [ "$ck" = "$(checksum "$dest/DONE")" ] && continue  # the same weights trained again
        dest=$4/$(basename "$stage")-${ck:0:8}  # retrained to other weights (another machine's rounding)
      fi
      copy_files "$stage" "$dest"; n=$((n + 1))
    fi
  done
}

for run in "$FROM"/s1?; do
  name=$(basename "$run")
  copy_files "$run" "$TO/$name"
  copy_stages "$run/eval" "$TO/$name/eval" summary.json
  if [ "$MODE" = save ]; then
    copy_stages "$run/align" "$TO/$name/align" DONE "$TO/reruns/$name/align"
    copy_stages "$run/finetune" "$TO/$name/finetune" DONE "$TO/reruns/$name/finetune"
  fi
done
copy_stages "$FROM/cache/eval-base" "$TO/cache/eval-base" summary.json
echo "cells.sh $MODE: $n finished stages copied from $FROM to $TO"
