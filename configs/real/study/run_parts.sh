#!/usr/bin/env bash
# Issue 26's p = 0 / 0.2 cells on a machine that lacks the earlier stages' checkpoints (a new machine, after
# cells.sh restore). The study's run.py (33df4fe) trains every stage of its grid that has no checkpoint, even
# an attack whose evaluation was restored, so run_study.sh's full-grid call would retrain the p = 0.1 attacks
# just to pass them (main's run.py no longer does: a model is trained only where an evaluation needs it).
# This runs each part -- one seed, one variant, some ratios -- with the same run.py and study.yaml,
# restricting grid.variants and grid.harmful_ratios to what the part needs:
#   PARTS="10:booster_paper:0,0.2 11:sft:0,0.2" bash configs/real/study/run_parts.sh
# (seed:variant:ratios; variants sft and booster_paper, as study.yaml defines them). run.py writes the part's
# summaries to the seed's summaries.json, replacing the p = 0.1 grid's; so each part's file is kept as
# summaries-<variant>-p<ratios>.json and the seed's own is put back. analyse.sh reads both; studies merges
# them (a run found twice must carry the same numbers). A part whose file exists is skipped: rerun after a stop.
set -euo pipefail
cd "$(dirname "$0")/../../.."
OUT=${STUDY_DIR:-runs/real/study}
declare -A VARIANT=(
  [sft]='{sft: {align.method: sft}}'
  [booster_paper]='{booster_paper: {align.method: booster, align.booster.lam: 5, align.booster.alpha: 0.1}}'
)
for part in ${PARTS:-}; do
  IFS=: read -r s v r <<< "$part"
  if ! [[ "$s" =~ ^[0-9]+$ && -n "${VARIANT[$v]:-}" && "$r" =~ ^[0-9.]+(,[0-9.]+)*$ ]]; then
    echo "run_parts.sh: PARTS entry '$part' is not seed:variant:ratios (variant sft or booster_paper," \
      "ratios like 0,0.2)" >&2
    exit 2
  fi
  if [ ! -f "$OUT/s$s/summaries.json" ]; then
    echo "run_parts.sh: $OUT/s$s/summaries.json is missing: seed $s's p = 0.1 grid must finish (or be" \
      "restored by cells.sh restore) first" >&2
    exit 2
  fi
done
for part in ${PARTS:-}; do
  IFS=: read -r s v r <<< "$part"
  d=$OUT/s$s
  keep="$d/summaries-$v-p${r//,/_}.json"
  if [ -f "$keep" ]; then echo "run_parts.sh: $keep exists, skipped" >&2; continue; fi
  cp -p "$d/summaries.json" "$d/.summaries-primary.json.bak"
  echo "run_parts.sh: $(date -u +%H:%M) seed $s $v p in [$r]" >&2
  python run.py configs/real/study/study.yaml "grid.seeds=[$s]" "grid.harmful_ratios=[$r]" \
    "grid.variants=${VARIANT[$v]}" "run.output_dir=$d" --no-progress
  mv "$d/summaries.json" "$keep.tmp" && cp -p "$d/.summaries-primary.json.bak" "$d/summaries.json" \
    && mv "$keep.tmp" "$keep" && rm "$d/.summaries-primary.json.bak"
  echo "run_parts.sh: $(date -u +%H:%M) seed $s $v done -> $keep" >&2
done
