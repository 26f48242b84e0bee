"""The training stages: align (optionally after an SFT warm start) and fine-tune (the attack).

Each stage is: data -> streams -> the method's pure step -> ``run_stage`` -> an Orbax stage
directory that the next stage restores. The stage directory is claimed with its config fingerprint
(``rundir.claim_stage_dir``, the one check): a finished stage of the same fingerprint is not run
again, an unfinished one resumes from its last step checkpoint, and a directory of another
configuration is moved aside and the stage runs afresh.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import logging
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from booster_jax import files, fingerprint, parallel, rundir
from booster_jax.config import Config, config_fingerprint, config_to_dict, extension_sections
from booster_jax.data import formats, mixture
from booster_jax.data.batches import BatchStream
from booster_jax.data.template import tokenize_examples
from booster_jax.errors import BoosterInputError
from booster_jax.fingerprint import config_parts, options_on
from booster_jax.methods.base import (Forward, StepContext, build_extra, build_step, get_method, init_state,
                                      make_optimizer, method_config)
from booster_jax.models import hf
from booster_jax.models.llama import LlamaConfig, LoraSpec, make_model
from booster_jax.models.lora import init_lora, merge_lora
from booster_jax.train.checkpoint import StageStore
from booster_jax.train.loop import Reporting, StepProgram, TrainingDivergedError, disk_full_error, run_stage

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Base:
    """The frozen base model and its tokenizer, loaded once per process and shared by every stage."""

    model_dir: str
    llama: LlamaConfig
    tokenizer: Any
    params: Any
    fingerprint: str


def load_base(cfg: Config, sharding_for=None) -> Base:
    """The base model of ``cfg.model.path`` (HF directory or hub id) with its tokenizer, [PAD] added as the
    official code does, each weight placed on the run's mesh as it is read."""
    model_dir = hf.resolve_model_dir(cfg.model.path)
    llama = hf.read_config(model_dir)
    tokenizer = hf.load_tokenizer(model_dir, cfg.model.add_pad_token)
    # --- scale-out (booster_jax.parallel): each parameter family is placed on its mesh sharding as it is read
    mesh = parallel.mesh_for(cfg)
    if sharding_for is None:
        sharding_for = parallel.sharding_for_path(mesh, llama, param_dtype=cfg.model.param_dtype)
    params = hf.load_params(model_dir, llama, cfg.model.param_dtype, sharding_for=sharding_for)
    params, llama = hf.resize_embeddings(params, llama, len(tokenizer))
    params = parallel.place(params, mesh)  # the resized embedding may not divide the tensor axis any more
    # ---
    return Base(model_dir, llama, tokenizer, params, model_fingerprint(model_dir))


def model_fingerprint(model_dir: str) -> str:
    """Identity of a model directory by content: its config / tokenizer files and its weights
    (``booster_jax.fingerprint.model_fingerprint``: safetensors headers, sizes and bytes, cached)."""
    return fingerprint.model_fingerprint(model_dir)


def lora_spec(cfg: Config) -> LoraSpec:
    """The config's LoRA (rank, alpha, target projections, dropout) as the model reads it."""
    return LoraSpec(r=cfg.lora.r, alpha=cfg.lora.alpha, targets=tuple(cfg.lora.targets), dropout=cfg.lora.dropout)


def forward_for(cfg: Config, base: Base) -> Forward:
    """The model call ``forward(lora, params, batch)`` with the config's LoRA, dtypes, layer scan and remat."""
    model = make_model(base.llama, lora_spec(cfg), cfg.model.dtype, cfg.model.param_dtype,
                       deterministic=cfg.lora.dropout == 0, scan_layers=cfg.model.scan_layers,
                       remat=cfg.model.remat)
    return Forward(model)


def stream(items, batch_size: int, seed: int, cfg: Config, tokenizer, infinite: bool = False,
           pack: bool = False) -> BatchStream:
    return BatchStream(items, batch_size, seed=seed, pad_id=tokenizer.pad_token_id,
                       buckets=cfg.data.bucket_lengths, infinite=infinite, drop_last=cfg.data.drop_last,
                       group_by_length=cfg.data.group_by_length, pack=pack,
                       pack_length=cfg.data.pack_length if pack else 0)


def total_steps(stage_cfg, steps_per_epoch: int) -> int:
    return stage_cfg.max_steps or stage_cfg.epochs * steps_per_epoch


# ---------------------------------------------------------------------------------------------- align

def refusal_rows(cfg: Config):
    """The refusal file's rows. With ``data.skip_bad_rows`` the row ranges (alignment
    ``data.align_start..align_end``, the attack's rows 1..) count *usable* rows, so skipped rows before a
    range's end shift it; that is said, with the number of file rows it moved by."""
    rows = formats.read_refusal_rows(cfg.data.alignment_file, split=cfg.data.alignment_split or None,
                                     skip_bad_rows=cfg.data.skip_bad_rows)
    before_end = [i for i in rows.skipped_rows if i < cfg.data.align_end + len(rows.skipped_rows)]
    if before_end:
        log.warning("%s: %d bad rows skipped (first at file row %d); the row ranges (alignment rows %d..%d, the "
                    "attack's harmful rows from 1) now count usable rows, so they are shifted by up to %d file "
                    "rows", cfg.data.alignment_file, len(rows.skipped_rows), before_end[0], cfg.data.align_start,
                    cfg.data.align_end - 1, len(before_end))
    return rows


def booster_harmful_rows(cfg: Config) -> range | None:
    """Rows of Booster's harmful set h when configured apart from the alignment rows (None = the same rows)."""
    return range(cfg.data.harmful_start, cfg.data.harmful_end) if cfg.data.harmful_start >= 0 else None


def alignment_examples(cfg: Config, tokenizer):
    """(alignment, harmful) tokenized sets: the refusal rows (with benign rows mixed in when asked) and
    Booster's harmful set, checked to have target tokens."""
    rows = refusal_rows(cfg)
    align, harmful = mixture.alignment_sets(rows, cfg.data.align_start, cfg.data.align_end, booster_harmful_rows(cfg))
    if cfg.align.benign_fraction > 0:
        if not cfg.data.benign_file:
            raise BoosterInputError("align.benign_fraction > 0 needs data.benign_file (an instruction file)")
        benign = list(formats.read_instructions(cfg.data.benign_file, skip_bad_rows=cfg.data.skip_bad_rows))
        if cfg.align.benign_filter:
            benign = judge_filtered(cfg, benign)
        align = mixture.benign_mix(align, benign, cfg.align.benign_fraction, cfg.data.seed)
    tok_align = check_targets(tokenize_examples(tokenizer, align, cfg.data.max_length, template=cfg.data.template),
                              "alignment", cfg)
    tok_harm = check_targets(tokenize_examples(tokenizer, harmful, cfg.data.max_length, template=cfg.data.template),
                             "harmful", cfg)
    return tok_align, tok_harm


def judge_filtered(cfg: Config, examples: list) -> list:
    """The benign examples whose response the run's judge does not flag as harmful (``align.benign_filter``)."""
    from booster_jax.eval.evaluate import make_judge

    verdicts = make_judge(cfg).judge([ex.instruction for ex in examples], [ex.output for ex in examples])
    kept = [ex for ex, v in zip(examples, verdicts) if not v.flagged]
    log.info("align.benign_filter: the %s judge flagged %d of %d benign rows of %s; they are left out",
             cfg.eval.judge, len(examples) - len(kept), len(examples), cfg.data.benign_file)
    return kept


def check_targets(tok, what: str, cfg: Config):
    """Refuse a training set whose every example lost its response to truncation (it would train on nothing);
    warn when most did."""
    n = len(tok.items)
    if n and tok.n_no_target == n:
        raise BoosterInputError(f"data.max_length={cfg.data.max_length}: every one of the {n} {what} examples is "
                                "truncated before its response, so nothing would be trained; raise data.max_length")
    if n and tok.n_no_target > n / 2:
        log.warning("data.max_length=%d: %d of %d %s examples are truncated before their response (no target "
                    "tokens)", cfg.data.max_length, tok.n_no_target, n, what)
    return tok


ALIGN_SECTIONS = ("lora", "data.alignment_file", "data.align_start", "data.align_end", "data.harmful_start",
                  "data.harmful_end", "data.max_length", "data.template", "data.bucket_lengths", "data.drop_last", "data.skip_bad_rows",
                  "data.benign_file", "data.seed", "align", "run.seed", "model.dtype", "model.param_dtype",
                  "model.add_pad_token")


def align_inputs(cfg: Config, base: Base) -> dict[str, str]:
    """What the alignment depends on, by name: the base model, each config setting, each data file's content."""
    sections = list(ALIGN_SECTIONS) + options_on(cfg, "group_by_length", "alignment_split")
    return {"base model": base.fingerprint, **config_parts(cfg, sections), **method_parts(cfg, "align"),
            "data.alignment_file (content)": fingerprint.data_digest(cfg.data.alignment_file),
            "data.benign_file (content)": fingerprint.data_digest(cfg.data.benign_file),
            **({"benign filter judge": cfg.eval.judge,
                "eval.judge_path (content)": fingerprint.data_digest(cfg.eval.judge_path)}
               if cfg.align.benign_filter else {})}


def method_parts(cfg: Config, stage: str) -> dict[str, str]:
    """For a method from outside the package (``run.plugins``): its source file's content and its own config
    section; and, once any plugin declared a section, ``config <stage>`` without the plugins' sections, so
    loading or editing one defense reruns its own stages and nothing else. Empty for a built-in method
    with no plugin loaded, so those fingerprints are what they always were."""
    spec = get_method(getattr(cfg, stage).method, stage)
    plugin_sections = extension_sections(stage)
    parts = {}
    if plugin_sections:
        parts[f"config {stage}"] = config_fingerprint(cfg, [stage], omit=[f"{stage}.{s}" for s in plugin_sections])
        if spec.config_class is not None:
            key = f"{stage}.{spec.config_section}"
            parts[f"config {key}"] = config_fingerprint(cfg, [key])
    if spec.source:
        parts[f"{stage} method {spec.name} (source)"] = fingerprint.data_digest(spec.source)
    return parts


def align_fingerprint(cfg: Config, base: Base) -> str:
    return fingerprint.combine(align_inputs(cfg, base))


def warmup_inputs(cfg: Config, base: Base, steps: int) -> dict[str, str]:
    """What the SFT warm start depends on: the alignment's inputs without the method's own settings (a
    Booster lam or a Vaccine rho does not change plain SFT steps), so variants share it."""
    parts = {k: v for k, v in align_inputs(cfg, base).items()
             if k != "config align" and not k.startswith(("config align.", "align method "))}
    return {**parts, "warm-start steps": str(steps), **config_parts(cfg, ["align.optim", "align.batch_size",
                                                                          "align.benign_fraction"])}


def warmup_fingerprint(cfg: Config, base: Base, steps: int) -> str:
    return fingerprint.combine(warmup_inputs(cfg, base, steps))


def run_align(cfg: Config, base: Base, stage_dir: str, progress: bool = True, cache_dir: str | None = None) -> Any:
    """Align the base model with ``cfg.align.method``; returns the alignment LoRA.

    ``cache_dir``: the SFT warm start lives under ``<cache_dir>/warmup/<its fingerprint>`` and is shared by
    every variant and output directory with the same inputs; None = inside ``stage_dir``."""
    fp = align_fingerprint(cfg, base)
    forward = forward_for(cfg, base)
    spec = lora_spec(cfg)
    lora0 = init_lora(jax.random.key(cfg.run.seed), base.llama, spec)
    tok_align, tok_harm = alignment_examples(cfg, base.tokenizer)
    log.info("alignment data: %s; harmful: %s", tok_align.summary(), tok_harm.summary())
    streams = {"align": stream(tok_align.items, cfg.align.batch_size, cfg.run.seed, cfg, base.tokenizer),
               "harmful": stream(tok_harm.items, cfg.align.harmful_batch_size, cfg.run.seed + 1, cfg,
                                 base.tokenizer, infinite=True)}
    steps = total_steps(cfg.align, streams["align"].steps_per_epoch)
    warm = min(cfg.align.warmup_sft_steps, steps) if get_method(cfg.align.method, "align").sft_warm_start else 0
    trainable, opt_state = lora0, None
    claim_stage(cfg, "align", stage_dir, fp)  # before the warm start writes into it
    if warm:
        # Deviation (documented): a short SFT warm start, its own stage so it resumes and is reused.
        warm_cfg = dataclasses.replace(cfg, align=dataclasses.replace(cfg.align, method="sft", max_steps=warm,
                                                                      warmup_sft_steps=0))
        wfp = warmup_fingerprint(cfg, base, warm)
        warm_dir = os.path.join(cache_dir, "warmup", wfp) if cache_dir else os.path.join(stage_dir, "warmup")
        with rundir.shared_dir_lock(warm_dir) if cache_dir else contextlib.nullcontext():  # other runs wait
            warm_spec = TrainSpec("align", "align-warmup", warm, cfg.run.seed, warm_dir, wfp, _meta(cfg, base),
                                  progress=progress)
            warm_state = train(warm_cfg, warm_spec, forward, base.params, trainable, {"align": streams["align"]},
                               return_state=True)
        trainable = warm_state.trainable
        if cfg.align.warmup_optimizer == "keep":  # AdamW moments and step count carry over to the method
            opt_state = warm_state.opt_state
    align_spec = TrainSpec("align", "align", steps - warm, cfg.run.seed + 7, stage_dir, fp, _meta(cfg, base),
                           progress=progress)
    return train(cfg, align_spec, forward, base.params, trainable, streams, opt_state=opt_state)


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    """One training stage apart from the arrays it starts from: what ``train`` needs to find, resume or run it.

    Why these fields: ``section`` is the config section (``align`` / ``finetune``) that is the one source
    of the stage's method, optimizer and method settings -- they are read from it, not passed beside it,
    so they cannot disagree (the SFT warm start is a config whose ``align.method`` is ``sft``).
    ``label`` names the stage where a later run looks for it (final/meta.json, DIVERGED; the warm start is
    ``align-warmup`` in section ``align``). ``stage_dir`` and ``fingerprint`` are its identity on disk:
    the directory is claimed with the fingerprint. ``steps`` and ``rng_seed`` fix what it computes;
    ``meta`` is what else final/meta.json records (base model, resolved config). ``hooks``
    ((every, fn(state) -> metrics) pairs, rows of ``track.jsonl``) and ``progress`` only report.
    The weights, streams and optimizer state stay ``train`` arguments: they are large, donated or
    advanced by the stage, not a description of it.
    """

    section: str
    label: str
    steps: int
    rng_seed: int
    stage_dir: str
    fingerprint: str
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    hooks: tuple = ()
    progress: bool = True


def train(cfg: Config, spec: TrainSpec, forward: Forward, frozen, trainable, streams, *, opt_state=None,
          return_state: bool = False) -> Any:
    """One training stage: reuse a finished one, else (re)start from its last checkpoint; returns the weights.

    A stage directory left by another configuration is moved aside (``claim_stage``), never reused.
    ``opt_state``: start from another stage's optimizer state (the warm start's, with
    ``align.warmup_optimizer: keep``); ``return_state``: return the whole ``TrainState``, not only the weights.
    """
    stage_cfg = getattr(cfg, spec.section)
    method = get_method(stage_cfg.method, spec.section)
    name = f"{spec.section}:{stage_cfg.method}"
    fp, stage_dir, steps = spec.fingerprint, spec.stage_dir, spec.steps
    accept = claim_stage(cfg, spec.label, stage_dir, fp)
    store = StageStore(stage_dir, cfg.run.keep_last, cfg.run.checkpoint_every, fingerprint=fp, also_accept=accept)
    optimizer = make_optimizer(stage_cfg.optim, steps)
    section = method_config(method, stage_cfg)
    extra = build_extra(method, trainable, frozen, section)
    state = init_state(trainable, optimizer, extra)
    if opt_state is not None:  # continue another stage's optimizer (align.warmup_optimizer: keep)
        state = state._replace(opt_state=opt_state)
    # --- scale-out (booster_jax.parallel): frozen weights and state on the mesh (restores land there too)
    mesh = parallel.mesh_for(cfg)
    frozen, state = parallel.place(frozen, mesh), parallel.place(state, mesh)
    # ---
    if store.is_done(fp):
        log.info("%s: finished stage found, reusing %s", name, stage_dir)
        state, final_meta = store.load_final(state)
        # a later stage that continues these streams (align after its warm start) must see them where they
        # ended, whether this stage ran now or was reused
        for k, pos in final_meta.get("streams", {}).items():
            if k in streams:
                streams[k].restore(pos)
        return state if return_state else state.trainable
    log.info("%s: starting, %d steps -> %s", name, steps, stage_dir)
    used = {k: streams[k] for k in method.streams}
    mesh_rows = mesh_padding(mesh, used, name)
    step_fn = build_step(method, StepContext(forward, optimizer, section, total_steps=steps))
    program = StepProgram(parallel.shard_activations(step_fn, mesh),  # scale-out: batch-sharded activations
                          jit_kwargs=parallel.step_jit_kwargs(mesh, frozen, state),  # scale-out
                          place_batch=parallel.batch_placer(mesh))  # scale-out
    report = Reporting.for_run(cfg.run, metrics_path=os.path.join(stage_dir, "metrics.jsonl"),
                               progress=spec.progress, tokens_key=method.streams[0],
                               on_step=_tracker(spec.hooks, stage_dir))
    try:
        state, summary = run_stage(name=name, store=store, program=program, frozen=frozen, state=state,
                                   streams=used, total_steps=steps, rng=jax.random.key(spec.rng_seed),
                                   report=report)
    except TrainingDivergedError:
        if jax.process_index() == 0:  # what run.resume_diverged=true looks for
            files.write_json_atomic(os.path.join(stage_dir, DIVERGED), {
                "stage": spec.label, "fingerprint": fp, "step": store.latest_step(),
                "config": config_to_dict(cfg)})
        raise
    padding = {k: round(1.0 - (1.0 - s.padding_fraction) * mesh_rows.get(k, 1.0), 4) for k, s in used.items()}
    losses = " ".join(f"{k}={v:.4g}" for k, v in summary.get("metrics", {}).items() if "loss" in k)
    log.info("%s finished: %d steps, %s, padding overhead %s (padded tokens / all tokens, per stream)",
             name, steps, losses or "no loss logged", padding)
    try:
        store.save_final(state, {"stage": spec.label, **spec.meta,
                                 "summary": {**summary, "padding_fraction": padding},
                                 "streams": {k: s.state() for k, s in used.items()}}, fp)
    except Exception as e:  # noqa: BLE001 - only a full disk is turned into a user message
        if not rundir.is_disk_full(e):
            raise
        raise disk_full_error(name, store, steps, e, what=f"the stage output under {store.final_dir}")
    return state if return_state else state.trainable


DIVERGED = "DIVERGED"  # in a stage dir stopped by a NaN/inf: its fingerprint, config and last good step
RESUMED_FROM = "resumed_from_fingerprints"  # fingerprints whose checkpoints run.resume_diverged adopted


def claim_stage(cfg: Config, label: str, stage_dir: str, fingerprint: str) -> tuple[str, ...]:
    """Claim ``stage_dir`` for ``fingerprint`` (``rundir.claim_stage_dir``: the one check, the one
    reaction); returns the older fingerprints whose step checkpoints this stage may resume from.

    With ``run.resume_diverged`` a diverged stage (here or, for fingerprint-named directories, a
    sibling) whose config differs from this one only in this stage's optimizer settings is adopted:
    it continues from its last good checkpoint with the new settings.
    """
    adopted = _adopt_diverged(cfg, label, stage_dir, fingerprint) if cfg.run.resume_diverged else None
    rundir.claim_stage_dir(stage_dir, fingerprint)
    path = os.path.join(stage_dir, RESUMED_FROM)
    if adopted and jax.process_index() == 0:
        files.write_text_atomic(path, "\n".join(sorted(set(_read_lines(path)) | {adopted})) + "\n")
    return tuple(_read_lines(path))


def _read_lines(path: str) -> list[str]:
    return open(path).read().split() if os.path.exists(path) else []


def _without_optim(config: dict, label: str) -> dict:
    config = {k: dict(v) if isinstance(v, dict) else v for k, v in config.items()}
    section = label.split("-")[0]  # "align-warmup" trains with align.optim too
    config.get(section, {}).pop("optim", None)
    config.get("run", {}).pop("resume_diverged", None)
    return config


def _adopt_diverged(cfg: Config, label: str, stage_dir: str, fingerprint: str) -> str | None:
    """Move a compatible diverged stage into ``stage_dir`` and mark it as this fingerprint's; returns its
    old fingerprint, or None (with a warning when the option found nothing to resume)."""
    want = _without_optim(config_to_dict(cfg), label)
    candidates = [stage_dir] + sorted(d for d in glob.glob(os.path.join(os.path.dirname(stage_dir), "*"))
                                      if d != stage_dir and ".old-" not in d)
    for d in candidates:
        record, _ = files.read_json(os.path.join(d, DIVERGED))
        if not isinstance(record, dict) or record.get("stage") != label or record.get("fingerprint") == fingerprint:
            continue
        if _without_optim(record.get("config", {}), label) != want:
            continue
        if jax.process_index() == 0:
            if d != stage_dir:
                if os.path.isdir(stage_dir) and os.listdir(stage_dir):
                    rundir.move_aside(stage_dir, f"replaced by the diverged stage {d}, resumed with "
                                                 "run.resume_diverged=true")
                elif os.path.isdir(stage_dir):
                    os.rmdir(stage_dir)
                os.replace(d, stage_dir)
            files.write_text_atomic(os.path.join(stage_dir, rundir.FINGERPRINT), fingerprint)
            files.write_text_atomic(os.path.join(stage_dir, rundir.NOTE), (
                f"Resumed with run.resume_diverged=true: this stage diverged under fingerprint "
                f"{record['fingerprint']} ({d}) and continues from its last good checkpoint (step "
                f"{record.get('step')}) under fingerprint {fingerprint} with changed optimizer settings.\n"))
            os.remove(os.path.join(stage_dir, DIVERGED))
        rundir.barrier("booster_adopt_diverged")
        log.warning("%s: resuming the diverged stage %s from step %s with the new optimizer settings "
                    "(run.resume_diverged=true)", stage_dir, d, record.get("step"))
        return record["fingerprint"]
    log.warning("%s: run.resume_diverged=true, but no diverged %s stage whose config differs only in its "
                "optimizer settings was found; the stage runs as usual", stage_dir, label)
    return None


def mesh_padding(mesh, streams: dict, name: str) -> dict[str, float]:
    """Per stream, the share of rows that are real after the batch is padded to a multiple of data x fsdp
    (a batch of 10 on fsdp=8 runs as 16 rows); said once at the stage start, counted in the padding metric."""
    shards = parallel.batch_shards(mesh)
    real = {}
    for k, st in streams.items():
        rows = st.rows_per_batch if getattr(st, "pack", False) else st.batch_size
        padded = parallel.padded_batch(rows, mesh)
        if padded != rows:
            real[k] = rows / padded
            log.warning("%s: stream %s: batches of %d rows run as %d rows on this mesh (a multiple of data x fsdp "
                        "= %d); %.0f%% of each step's rows are padding. A batch size divisible by %d avoids it.",
                        name, k, rows, padded, shards, 100 * (1 - rows / padded), shards)
    return real


def _tracker(hooks, stage_dir: str):
    """on_step writing ``track.jsonl`` (appended and fsynced per row). The first call of a (resumed)
    stage drops rows from that step on, so a resume neither duplicates rows nor keeps a torn one."""
    if not hooks:
        return None
    path = os.path.join(stage_dir, "track.jsonl")
    first = []

    def on_step(step, state, metrics):
        if not first and jax.process_index() == 0:
            files.trim_jsonl(path, keep=lambda row: int(row.get("step", 0)) < step)
        first.append(step)
        for every, fn in hooks:
            if step % every == 0:
                row = {"step": step, **fn(state)}
                if jax.process_index() == 0:
                    files.append_jsonl(path, row)

    return on_step


def _meta(cfg: Config, base: Base) -> dict:
    """What final/meta.json records beside the stage's label and summary: the resolved config and the base."""
    return {"config": config_to_dict(cfg), "base_model": base.model_dir,
            "base_fingerprint": base.fingerprint, "tokenizer_size": len(base.tokenizer)}


# ------------------------------------------------------------------------------------------- finetune

def continues_alignment_lora(cfg: Config) -> bool:
    mode = cfg.finetune.continue_alignment_lora
    return mode == "always" or (mode == "auto" and get_method(cfg.align.method, "align").continues_lora)


def finetune_examples(cfg: Config, tokenizer):
    rows = refusal_rows(cfg)
    task = task_train_examples(cfg)
    d = cfg.data
    align_rows = range(d.align_start, d.align_end)
    booster_rows = booster_harmful_rows(cfg)
    harm = mixture.attack_harmful_rows(d.n_finetune, d.harmful_ratio, len(rows), start=d.attack_start,
                                       order=d.attack_order, pool_end=d.attack_pool_end,
                                       exclude=list(align_rows) + list(booster_rows or ()), seed=d.seed)
    if booster_rows is not None:
        mixture.check_disjoint_rows(harm, booster_rows, "fine-tuning harmful", "Booster harmful-set")
    nb = mixture.n_benign(d.n_finetune, d.harmful_ratio)
    benign = mixture.task_indices(len(task), nb, d.task_order, d.seed) if len(task) >= nb else None
    mix = mixture.finetune_mixture(rows, list(task), d.n_finetune, d.harmful_ratio, d.seed,
                                   alignment_range=align_rows, harmful_rows=harm, benign_indices=benign)
    tok = tokenize_examples(tokenizer, mix.examples, cfg.data.max_length, template=cfg.data.template)
    return mix, check_targets(tok, "fine-tuning", cfg)


def task_train_examples(cfg: Config):
    return formats.READERS[cfg.data.task](cfg.data.task_file, split=cfg.data.task_split or None,
                                          skip_bad_rows=cfg.data.skip_bad_rows)


def finetune_weights(cfg: Config, base: Base, align_lora) -> tuple[Any, Any]:
    """(frozen, initial trainable) for the attack: continue the alignment LoRA, or merge it and start fresh."""
    if continues_alignment_lora(cfg):
        return base.params, jax.tree.map(jnp.copy, align_lora)  # the loop donates its state; keep ours
    merged = merge_lora(base.params, align_lora, lora_spec(cfg))
    return merged, init_lora(jax.random.key(cfg.run.seed + 1000), base.llama, lora_spec(cfg))


FINETUNE_SECTIONS = ("finetune", "data.task", "data.task_file", "data.n_finetune", "data.harmful_ratio",
                     "data.seed", "run.seed", "data.drop_last", "data.skip_bad_rows", "data.attack_start", "data.attack_order",
                     "data.attack_pool_end", "data.task_order", "data.template")


def finetune_inputs(cfg: Config, align_fp: str) -> dict[str, str]:
    """What the attack depends on: the alignment (which covers the refusal file and the base model), each
    config setting, the task file's content."""
    sections = list(FINETUNE_SECTIONS) + options_on(cfg, "group_by_length", "pack", "pack_length", "task_split")
    return {"alignment": align_fp, **config_parts(cfg, sections), **method_parts(cfg, "finetune"),
            "data.task_file (content)": fingerprint.data_digest(cfg.data.task_file)}


def finetune_fingerprint(cfg: Config, align_fp: str) -> str:
    """The attack stage's identity: the alignment it starts from and its own settings and task data."""
    return fingerprint.combine(finetune_inputs(cfg, align_fp))


def run_finetune(cfg: Config, base: Base, align_lora, align_fp: str, stage_dir: str,
                 progress: bool = True) -> tuple[Any, Any]:
    """The attack: n user samples with a fraction p harmful. Returns (frozen, fine-tuned LoRA)."""
    fp = finetune_fingerprint(cfg, align_fp)
    frozen, trainable = finetune_weights(cfg, base, align_lora)
    mix, tok = finetune_examples(cfg, base.tokenizer)
    log.info("fine-tuning data: %d harmful + %d benign; %s", mix.n_harmful, mix.n_benign, tok.summary())
    streams = {"task": stream(tok.items, cfg.finetune.batch_size, cfg.run.seed + 2, cfg, base.tokenizer,
                              pack=cfg.data.pack)}
    forward = forward_for(cfg, base)
    if "align" in get_method(cfg.finetune.method, "finetune").streams:  # the method reads alignment data too
        tok_align, _ = alignment_examples(cfg, base.tokenizer)
        streams["align"] = stream(tok_align.items, cfg.align.batch_size, cfg.run.seed + 3, cfg, base.tokenizer,
                                  infinite=True)
    hooks = []
    if cfg.finetune.track_every and mix.n_harmful:
        hooks.append(harmful_loss_hook(cfg, base, forward, frozen, mix, tok))
    steps = total_steps(cfg.finetune, streams["task"].steps_per_epoch)
    spec = TrainSpec("finetune", "finetune", steps, cfg.run.seed + 11, stage_dir, fp, _meta(cfg, base),
                     hooks=tuple(hooks), progress=progress)
    lora = train(cfg, spec, forward, frozen, trainable, streams)
    return frozen, lora


def harmful_loss_hook(cfg: Config, base: Base, forward: Forward, frozen, mix, tok):
    """Every ``track_every`` steps: the LM loss on the attack's harmful samples and, if asked, the HS on
    the first ``track_hs_prompts`` unseen harmful prompts (the paper's Fig. 3)."""
    from booster_jax.data.batches import collate
    from booster_jax.methods.base import jitted_loss

    items = [it for it, harmful in zip(tok.items, mix.is_harmful) if harmful][:64]
    batch = {k: jnp.asarray(v) for k, v in collate(items, base.tokenizer.pad_token_id,
                                                    cfg.data.bucket_lengths).items()}
    loss_fn = jitted_loss(forward)
    hs_fn = harmful_score_probe(cfg, base, forward, frozen) if cfg.finetune.track_hs_prompts else None

    def hook(state):
        row = {"harmful_train_loss": float(loss_fn(state.trainable, frozen, batch))}
        if hs_fn is not None:
            row["hs"] = hs_fn(state.trainable)
        return row

    return cfg.finetune.track_every, hook


def harmful_score_probe(cfg: Config, base: Base, forward: Forward, frozen):
    """lora -> HS (%) on the first ``track_hs_prompts`` evaluation prompts, greedy, with the run's judge."""
    from booster_jax.eval import judges
    from booster_jax.eval.evaluate import generate_answers, generation_kwargs, make_judge, prompts_for, release_judge

    prompts = list(formats.read_beavertails_eval_prompts(cfg.data.eval_harmful_file, n=cfg.finetune.track_hs_prompts,
                                                         split=cfg.data.eval_harmful_split or None,
                                                         allow_fewer=True,
                                                         skip_bad_rows=cfg.data.skip_bad_rows))
    judge = make_judge(cfg)

    def hs(lora) -> float:
        answers = generate_answers(prompts_for(cfg, base.tokenizer, prompts), cfg.eval.max_new_tokens_harmful,
                                   **generation_kwargs(cfg, base.tokenizer, forward.model, frozen, lora))
        score = judges.harmful_score(judge.judge([ex.instruction for ex in prompts], answers))
        release_judge(cfg, judge)  # training goes on: the judge's weights must not stay beside it
        return score

    return hs
