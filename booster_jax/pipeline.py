"""The stage graph: (world) -> align -> evaluate aligned -> fine-tune per harmful ratio -> evaluate -> report.

The grid (variants x seeds x harmful ratios) expands into plain ``Config`` objects, one per run;
every stage is keyed by a directory name and a config fingerprint, so a rerun reuses what is
finished and resumes what is not. A model is trained (or restored) only when an unfinished evaluation
or a later stage needs it: finished evaluations copied to a new machine do not retrain their models.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
from dataclasses import dataclass

import jax

from booster_jax import files, rundir
from booster_jax.config import Config, apply_overrides, cache_dir, save_config
from booster_jax.eval.evaluate import benign_prompts, eval_inputs, eval_sets, evaluate, finished, make_judge
from booster_jax.fingerprint import InputLog, combine, set_cache_file
from booster_jax.train import stages

log = logging.getLogger(__name__)

STAGES = ("align", "finetune", "evaluate")


@dataclass(frozen=True)
class AlignRun:
    variant: str
    seed: int
    cfg: Config

    @property
    def name(self) -> str:
        return f"{self.variant}-s{self.seed}"


def expand_grid(cfg: Config) -> list[AlignRun]:
    """One alignment run per (variant, seed); each variant is a set of dotted overrides of the base config."""
    variants = cfg.grid.variants or {cfg.align.method: {}}
    runs = []
    for name, overrides in variants.items():
        for seed in cfg.grid.seeds:
            runs.append(AlignRun(name, seed, apply_overrides(cfg, {**overrides, "run.seed": seed,
                                                                  "data.seed": seed})))
    return runs


def with_ratio(cfg: Config, p: float) -> Config:
    return apply_overrides(cfg, {"data.harmful_ratio": p})


def check_inputs(cfg: Config) -> None:
    """Find every model and read every data file the grid will need before any model is loaded, so bad
    input fails fast (a hub id is downloaded here, before minutes of loading a 7B base model)."""
    from booster_jax.data import formats

    from booster_jax.models import hf

    hf.resolve_model_dir(cfg.model.path)  # every model directory or hub id, before anything heavy loads
    if cfg.eval.enabled and cfg.eval.judge == "beaver_dam":
        hf.read_config_json(hf.resolve_model_dir(cfg.eval.judge_path, option="eval.judge_path"),
                            "eval.judge_path (the BeaverDam judge)")
    formats.read_refusal_rows(cfg.data.alignment_file, split=cfg.data.alignment_split or None,
                              skip_bad_rows=cfg.data.skip_bad_rows)
    stages.task_train_examples(cfg)
    if cfg.eval.enabled:
        eval_sets(cfg)
        benign_prompts(cfg)


def run_pipeline(cfg: Config, only: str | None = None, progress: bool = True) -> list[dict]:
    """Run the grid; ``only`` limits to one stage kind (earlier stages must then be finished or are run).

    The run directory is checked and locked for the whole run (``rundir.claim_run_dir``)."""
    with rundir.claim_run_dir(cfg.run.output_dir):
        return _run_pipeline(cfg, only, progress)


def _run_pipeline(cfg: Config, only: str | None, progress: bool) -> list[dict]:
    out = cfg.run.output_dir
    if jax.process_index() == 0:
        _keep_aside_if_changed(os.path.join(out, "config.yaml"), lambda path: save_config(cfg, path))
    check_inputs(cfg)
    cache = cache_dir(cfg)
    set_cache_file(os.path.join(cache, "file_digests.json") if cache else None)
    base = stages.load_base(cfg)
    inputs = InputLog(out, write=jax.process_index() == 0)  # names the input that changed when a stage reruns
    judge = make_judge(cfg) if cfg.eval.enabled else None
    do_eval = cfg.eval.enabled and only in (None, "evaluate")
    summaries = []
    base_eval = None
    if do_eval:
        forward = stages.forward_for(cfg, base)
        inputs.check("evaluate base", eval_inputs(cfg, base.fingerprint))
        base_eval = evaluate_base(cfg, base, forward, judge, os.path.join(out, "eval", "base"), cache)
    for run in expand_grid(cfg):
        rc = run.cfg
        forward = stages.forward_for(rc, base)
        # Alignment is keyed by its fingerprint: variants that differ only after alignment share it.
        inputs.check(f"align {run.name}", stages.align_inputs(rc, base))
        afp = stages.align_fingerprint(rc, base)
        align_dir = os.path.join(out, "align", afp)
        # Trained (or restored) on first use only: where every evaluation that needs the aligned model is
        # finished (a rerun whose checkpoints are gone, e.g. evaluations copied to a new machine), it is not.
        align_lora = functools.cache(functools.partial(_align, rc, base, align_dir, run.name, progress, cache))
        if not do_eval:
            align_lora()
        before = None
        if do_eval:
            inputs.check(f"evaluate {run.name} aligned", eval_inputs(rc, afp))
            aligned_dir = os.path.join(out, "eval", f"aligned-{afp}")
            done = finished(rc, aligned_dir, afp)
            before = evaluate(rc, base, forward, base.params, None if done else align_lora(), aligned_dir,
                              f"{run.name} aligned", judge, afp, reuse_only=done)
        if only == "align":
            continue
        for p in cfg.grid.harmful_ratios:
            pc = with_ratio(rc, p)
            tag = f"{run.name}-p{p:g}"
            inputs.check(f"finetune {tag}", stages.finetune_inputs(pc, afp))
            ffp = stages.finetune_fingerprint(pc, afp)
            eval_dir, ft_dir = os.path.join(out, "eval", tag), os.path.join(out, "finetune", tag)
            skipped = do_eval and finished(pc, eval_dir, ffp)
            if skipped:
                log.info("finetune %s: not run: its evaluation is finished (%s)", tag, eval_dir)
                frozen = lora = None
            else:
                frozen, lora = stages.run_finetune(pc, base, align_lora(), afp, ft_dir, progress)
            if not do_eval:
                continue
            inputs.check(f"evaluate {tag}", eval_inputs(pc, ffp))
            after = evaluate(pc, base, forward, frozen, lora, eval_dir, tag, judge, ffp, reuse_only=skipped)
            # a skipped attack's directory was not claimed: its curve counts only if it finished under this config
            curve = _curve(os.path.join(ft_dir, "track.jsonl")) if not skipped or _finished_stage(ft_dir, ffp) else []
            summaries.append({
                "method": run.variant, "seed": run.seed, "harmful_ratio": p, "judge": after["judge"],
                "task": after["task"], "hs_before": before["hs"], "hs_after": after["hs"], "fa": after["fa"],
                "fa_before": before["fa"], "refused_before": before.get("refused_benign"),
                "refused_after": after.get("refused_benign"),
                "curve": curve,
                "warnings": (base_eval or {}).get("warnings", []) + before.get("warnings", [])
                + after.get("warnings", []),
            })
            summaries[-1]["missing"] = _missing(summaries[-1], before, after)
        if not align_lora.cache_info().currsize:
            log.info("align %s: not run: every evaluation that needs it is finished", run.name)
    if summaries and jax.process_index() == 0:
        files.write_json_atomic(os.path.join(out, "summaries.json"), {"base": base_eval, "runs": summaries}, indent=2)
    return summaries


# a run summary's numbers -> (which evaluation, which of its fields) they come from
RUN_NUMBERS = {"hs_before": ("before", "hs"), "hs_after": ("after", "hs"), "fa": ("after", "fa"),
               "fa_before": ("before", "fa"), "refused_before": ("before", "refused_benign"),
               "refused_after": ("after", "refused_benign")}


def _missing(run: dict, before: dict, after: dict) -> dict[str, str]:
    """Why each of the run summary's numbers that is NaN / None (null in summaries.json) is missing, from
    the evaluation it comes from (``evaluate.missing_reasons``)."""
    evals = {"before": before, "after": after}
    out = {}
    for key, (which, field) in RUN_NUMBERS.items():
        value = run.get(key)
        if value is None or value != value:
            why = (evals[which].get("missing") or {}).get(field, "not recorded by its evaluation")
            out[key] = f"{why} (the evaluation {which} the attack, its {field!r})"
    return out


def _keep_aside_if_changed(path: str, write) -> None:
    """``write(path)``; a different earlier version (another config run here before) is kept as
    ``<path>.old-<utc>`` rather than overwritten."""
    if not os.path.exists(path):
        write(path)
        return
    tmp = f"{path}.new-{os.getpid()}"
    write(tmp)
    if open(tmp, "rb").read() == open(path, "rb").read():
        os.remove(tmp)
        return
    aside = f"{path}.old-{rundir._utc_stamp()}"
    os.replace(path, aside)
    os.replace(tmp, path)
    log.warning("%s: the run directory held another configuration; the old file is kept as %s", path, aside)


def evaluate_base(cfg: Config, base, forward, judge, out_dir: str, cache: str | None) -> dict:
    """The base model's evaluation, shared through ``cache`` by every output directory that evaluates the
    same model on the same prompts with the same judge (it is the slowest evaluation: long answers)."""
    if not cache:
        return evaluate(cfg, base, forward, base.params, None, out_dir, "base", judge, base.fingerprint)
    where = os.path.join(cache, "eval-base", combine(eval_inputs(cfg, base.fingerprint)))
    with rundir.shared_dir_lock(where):  # another run evaluating the same base model: wait, then reuse
        summary = evaluate(cfg, base, forward, base.params, None, where, "base", judge, base.fingerprint)
    if jax.process_index() == 0:
        shutil.copytree(where, out_dir, dirs_exist_ok=True)
    return summary


def _align(cfg: Config, base, align_dir: str, name: str, progress: bool, cache: str | None):
    """The aligned LoRA: trained, resumed or restored from ``align_dir``."""
    lora = stages.run_align(cfg, base, align_dir, progress, cache_dir=cache)
    _note_variant(align_dir, name)  # after the stage claimed its directory
    return lora


def _finished_stage(stage_dir: str, fingerprint: str) -> bool:
    """A training stage finished under ``fingerprint`` (its DONE record and fingerprint file both say so)."""
    from booster_jax.train.checkpoint import StageStore

    done = StageStore(stage_dir).read_done()
    return (done is not None and done.get("fingerprint") == fingerprint
            and rundir.recorded_fingerprint(stage_dir)[0] == fingerprint)


def _note_variant(stage_dir: str, name: str) -> None:
    """Record which grid variants use a fingerprint-named directory (for people browsing runs/)."""
    if jax.process_index() != 0:
        return
    path = os.path.join(stage_dir, "variants.txt")
    names = open(path).read().split() if os.path.exists(path) else []
    if name not in names:
        files.write_text_atomic(path, "".join(n + "\n" for n in names + [name]))


def _curve(track_path: str) -> list[dict]:
    """The attack's harmful training loss over steps (the paper's Fig. 3), when it was tracked.
    A resumed stage may have logged a step twice; the last value wins."""
    points = {}
    for row in files.read_jsonl(track_path):  # a torn last line (killed while writing) is dropped
        points[row["step"]] = {"step": row["step"], "harmful_loss": row["harmful_train_loss"], "hs": row.get("hs")}
    return [points[k] for k in sorted(points)]


def load_summaries(out_dir: str) -> list[dict]:
    """The per-run summaries a finished pipeline wrote (for ``run.py report``)."""
    from booster_jax.errors import BoosterInputError

    path = os.path.join(out_dir, "summaries.json")
    data, why = files.read_json(path)
    if why == "missing":
        raise BoosterInputError(f"{path}: missing; run the pipeline first (python run.py CONFIG)")
    if not isinstance(data, dict) or not isinstance(data.get("runs"), list):
        raise BoosterInputError(f"{path}: unreadable ({why or 'no list of runs'}); run the pipeline again "
                                "(python run.py CONFIG): it rebuilds the file from the finished evaluations")
    return [files.nan_for_null(r, RUN_NUMBERS) if isinstance(r, dict) else r for r in data["runs"]]
