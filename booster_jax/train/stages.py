"""The training stages: align (optionally after an SFT warm start) and fine-tune (the attack).

Each stage is: data -> streams -> the method's pure step -> ``run_stage`` -> an Orbax stage
directory that the next stage restores. A stage whose ``DONE`` marker matches its config
fingerprint is not run again; an unfinished one resumes from its last step checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp

from booster_jax import parallel
from booster_jax.config import Config, config_fingerprint, config_to_dict
from booster_jax.data import formats, mixture
from booster_jax.data.batches import BatchStream
from booster_jax.data.template import tokenize_examples
from booster_jax.methods.base import Forward, StepContext, get_method, init_state, make_optimizer, method_config
from booster_jax.models import hf
from booster_jax.models.llama import LlamaConfig, LoraSpec, make_model
from booster_jax.models.lora import init_lora, merge_lora
from booster_jax.train.checkpoint import StageStore
from booster_jax.train.loop import run_stage

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
    """Cheap identity of a model directory: its config and the safetensors headers (not the gigabytes)."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(model_dir)):
        path = os.path.join(model_dir, name)
        if name.endswith(".json"):
            h.update(open(path, "rb").read())
        elif name.endswith(".safetensors"):
            with open(path, "rb") as f:
                head = f.read(8)
                h.update(head + f.read(int.from_bytes(head, "little")))
    return h.hexdigest()[:16]


def lora_spec(cfg: Config) -> LoraSpec:
    return LoraSpec(r=cfg.lora.r, alpha=cfg.lora.alpha, targets=tuple(cfg.lora.targets), dropout=cfg.lora.dropout)


def forward_for(cfg: Config, base: Base) -> Forward:
    model = make_model(base.llama, lora_spec(cfg), cfg.model.dtype, cfg.model.param_dtype,
                       deterministic=cfg.lora.dropout == 0, scan_layers=cfg.model.scan_layers,
                       remat=cfg.model.remat)
    return Forward(model)


def stream(items, batch_size: int, seed: int, cfg: Config, tokenizer, infinite: bool = False,
           pack: bool = False) -> BatchStream:
    return BatchStream(items, batch_size, seed=seed, pad_id=tokenizer.pad_token_id,
                       buckets=cfg.data.bucket_lengths, infinite=infinite,
                       group_by_length=cfg.data.group_by_length, pack=pack,
                       pack_length=cfg.data.pack_length if pack else 0)


def batching_sections(cfg: Config, *names: str) -> list[str]:
    """The batching options among ``names`` that are on (off ones leave older fingerprints unchanged)."""
    return [f"data.{n}" for n in names if getattr(cfg.data, n)]


def total_steps(stage_cfg, steps_per_epoch: int) -> int:
    return stage_cfg.max_steps or stage_cfg.epochs * steps_per_epoch


# ---------------------------------------------------------------------------------------------- align

def alignment_examples(cfg: Config, tokenizer):
    rows = formats.read_refusal_rows(cfg.data.alignment_file, skip_bad_rows=cfg.data.skip_bad_rows)
    align, harmful = mixture.alignment_sets(rows, cfg.data.align_start, cfg.data.align_end)
    if cfg.align.benign_mix > 0:
        if not cfg.data.benign_file:
            raise ValueError("align.benign_mix > 0 needs data.benign_file (an instruction file)")
        benign = formats.read_instructions(cfg.data.benign_file)
        align = mixture.benign_mix(align, list(benign), cfg.align.benign_mix, cfg.data.seed)
    tok_align = tokenize_examples(tokenizer, align, cfg.data.max_length)
    tok_harm = tokenize_examples(tokenizer, harmful, cfg.data.max_length)
    return tok_align, tok_harm


def align_fingerprint(cfg: Config, base: Base) -> str:
    sections = ["lora", "data.alignment_file", "data.align_start", "data.align_end", "data.max_length",
                "data.bucket_lengths", "data.benign_file", "data.seed", "align", "run.seed", "model.dtype",
                "model.param_dtype", "model.add_pad_token"] + batching_sections(cfg, "group_by_length")
    return hashlib.sha256((base.fingerprint + config_fingerprint(cfg, sections)).encode()).hexdigest()[:16]


def run_align(cfg: Config, base: Base, stage_dir: str, progress: bool = True) -> Any:
    """Align the base model with ``cfg.align.method``; returns the alignment LoRA."""
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
    trainable = lora0
    if warm:
        # Deviation (documented): a short SFT warm start, its own stage so it resumes and is reused.
        warm_cfg = dataclasses.replace(cfg, align=dataclasses.replace(cfg.align, method="sft", max_steps=warm,
                                                                      warmup_sft_steps=0))
        trainable = train(warm_cfg, "align", "sft", cfg.align.optim, forward, base.params, trainable,
                          {"align": streams["align"]}, warm, os.path.join(stage_dir, "warmup"),
                          fp + "-warmup", _meta(cfg, base, "align-warmup"), progress, rng_seed=cfg.run.seed)
    return train(cfg, "align", cfg.align.method, cfg.align.optim, forward, base.params, trainable,
                 streams, steps - warm, stage_dir, fp, _meta(cfg, base, "align"), progress,
                 rng_seed=cfg.run.seed + 7)


def train(cfg: Config, stage: str, method: str, optim_cfg, forward: Forward, frozen, trainable, streams,
          steps: int, stage_dir: str, fingerprint: str, meta: dict, progress: bool, rng_seed: int,
          hooks=()) -> Any:
    """One training stage: reuse a finished one, else (re)start from its last checkpoint; returns the weights.

    A stage directory left by another configuration is cleared (with a warning) rather than resumed.
    ``hooks``: (every, fn(state) -> metrics) pairs whose results go to ``track.jsonl``.
    """
    spec = get_method(method, stage)
    store = StageStore(stage_dir, cfg.run.keep_last, cfg.run.checkpoint_every, fingerprint=fingerprint)
    optimizer = make_optimizer(optim_cfg, steps)
    section = method_config(spec, getattr(cfg, stage))
    extra = spec.init_extra(trainable, frozen, section) if spec.init_extra else ()
    state = init_state(trainable, optimizer, extra)
    # --- scale-out (booster_jax.parallel): frozen weights and state on the mesh (restores land there too)
    mesh = parallel.mesh_for(cfg)
    frozen, state = parallel.place(frozen, mesh), parallel.place(state, mesh)
    # ---
    if store.is_done(fingerprint):
        log.info("%s: finished stage found, reusing %s", stage, stage_dir)
        return store.load_final(state)[0].trainable
    _claim(store, fingerprint)
    step_fn = spec.make_step(StepContext(forward, optimizer, section, total_steps=steps))
    step_fn = parallel.shard_activations(step_fn, mesh)  # scale-out: batch-sharded activations (FSDP)
    state, summary = run_stage(name=f"{stage}:{method}", store=store, step_fn=step_fn, frozen=frozen,
                               state=state, streams={k: streams[k] for k in spec.streams}, total_steps=steps,
                               rng=jax.random.key(rng_seed), run_cfg=cfg.run,
                               metrics_path=os.path.join(stage_dir, "metrics.jsonl"), progress=progress,
                               tokens_key=spec.streams[0], on_step=_tracker(hooks, stage_dir),
                               jit_kwargs=parallel.step_jit_kwargs(mesh, frozen, state),  # scale-out
                               place_batch=parallel.batch_placer(mesh))  # scale-out
    padding = {k: round(streams[k].padding_fraction, 4) for k in spec.streams}
    log.info("%s:%s finished: %d steps, padding overhead %s (padded tokens / all tokens, per stream)",
             stage, method, steps, padding)
    store.save_final(state, {**meta, "summary": {**summary, "padding_fraction": padding}}, fingerprint)
    return state.trainable


def _claim(store: StageStore, fingerprint: str) -> None:
    """Mark the stage directory with its config fingerprint; another config's leftovers are cleared."""
    path = os.path.join(store.stage_dir, "fingerprint")
    if os.path.exists(path) and open(path).read().strip() != fingerprint:
        log.warning("%s holds a run of another configuration; clearing it and starting the stage over",
                    store.stage_dir)
        store.clear()
        for name in ("track.jsonl", "metrics.jsonl"):
            if os.path.exists(os.path.join(store.stage_dir, name)):
                os.remove(os.path.join(store.stage_dir, name))
    if jax.process_index() == 0:
        os.makedirs(store.stage_dir, exist_ok=True)
        with open(path, "w") as f:
            f.write(fingerprint)


def _tracker(hooks, stage_dir: str):
    if not hooks:
        return None

    def on_step(step, state, metrics):
        for every, fn in hooks:
            if step % every == 0:
                row = {"step": step, **fn(state)}
                if jax.process_index() == 0:
                    with open(os.path.join(stage_dir, "track.jsonl"), "a") as f:
                        f.write(json.dumps(row) + "\n")

    return on_step


def _meta(cfg: Config, base: Base, stage: str) -> dict:
    return {"stage": stage, "config": config_to_dict(cfg), "base_model": base.model_dir,
            "base_fingerprint": base.fingerprint, "tokenizer_size": len(base.tokenizer)}


# ------------------------------------------------------------------------------------------- finetune

def continues_alignment_lora(cfg: Config) -> bool:
    mode = cfg.finetune.continue_alignment_lora
    return mode == "always" or (mode == "auto" and get_method(cfg.align.method, "align").continues_lora)


def finetune_examples(cfg: Config, tokenizer):
    rows = formats.read_refusal_rows(cfg.data.alignment_file, skip_bad_rows=cfg.data.skip_bad_rows)
    task = task_train_examples(cfg)
    mix = mixture.finetune_mixture(rows, list(task), cfg.data.n_finetune, cfg.data.harmful_ratio, cfg.data.seed,
                                   alignment_range=range(cfg.data.align_start, cfg.data.align_end))
    return mix, tokenize_examples(tokenizer, mix.examples, cfg.data.max_length)


def task_train_examples(cfg: Config):
    return formats.READERS[cfg.data.task](cfg.data.task_file, skip_bad_rows=cfg.data.skip_bad_rows)


def finetune_weights(cfg: Config, base: Base, align_lora) -> tuple[Any, Any]:
    """(frozen, initial trainable) for the attack: continue the alignment LoRA, or merge it and start fresh."""
    if continues_alignment_lora(cfg):
        return base.params, jax.tree.map(jnp.copy, align_lora)  # the loop donates its state; keep ours
    merged = merge_lora(base.params, align_lora, lora_spec(cfg))
    return merged, init_lora(jax.random.key(cfg.run.seed + 1000), base.llama, lora_spec(cfg))


def run_finetune(cfg: Config, base: Base, align_lora, align_fp: str, stage_dir: str,
                 progress: bool = True) -> tuple[Any, Any]:
    """The attack: n user samples with a fraction p harmful. Returns (frozen, fine-tuned LoRA)."""
    fp = hashlib.sha256((align_fp + config_fingerprint(
        cfg, ["finetune", "data.task", "data.task_file", "data.n_finetune", "data.harmful_ratio", "data.seed",
              "run.seed"] + batching_sections(cfg, "group_by_length", "pack", "pack_length"))).encode()).hexdigest()[:16]
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
    lora = train(cfg, "finetune", cfg.finetune.method, cfg.finetune.optim, forward, frozen, trainable, streams,
                 steps, stage_dir, fp, _meta(cfg, base, "finetune"), progress, rng_seed=cfg.run.seed + 11,
                 hooks=hooks)
    return frozen, lora


def harmful_loss_hook(cfg: Config, base: Base, forward: Forward, frozen, mix, tok):
    """Every ``track_every`` steps: the LM loss on the attack's harmful samples and, if asked, the HS on
    the first ``track_hs_prompts`` unseen harmful prompts (the paper's Fig. 3)."""
    from booster_jax.data.batches import collate
    from booster_jax.methods.base import lm_loss

    items = [it for it, harmful in zip(tok.items, mix.is_harmful) if harmful][:64]
    batch = {k: jnp.asarray(v) for k, v in collate(items, base.tokenizer.pad_token_id,
                                                    cfg.data.bucket_lengths).items()}
    loss_fn = jax.jit(lambda lora, params, b: lm_loss(forward(lora, params, b), b))  # weights as arguments,
                                                                                   # not baked-in constants
    hs_fn = harmful_score_probe(cfg, base, forward, frozen) if cfg.finetune.track_hs_prompts else None

    def hook(state):
        row = {"harmful_train_loss": float(loss_fn(state.trainable, frozen, batch))}
        if hs_fn is not None:
            row["hs"] = hs_fn(state.trainable)
        return row

    return cfg.finetune.track_every, hook


def harmful_score_probe(cfg: Config, base: Base, forward: Forward, frozen):
    """lora -> HS (%) on the first ``track_hs_prompts`` evaluation prompts, greedy, with the run's judge."""
    from booster_jax.data.template import format_prompt
    from booster_jax.eval import judges, tasks
    from booster_jax.eval.evaluate import make_judge
    from booster_jax.eval.generate import generate_text

    prompts = list(formats.read_beavertails_eval_prompts(cfg.data.eval_harmful_file, n=cfg.finetune.track_hs_prompts,
                                                         split=None, allow_fewer=True))
    judge = make_judge(cfg)

    def hs(lora) -> float:
        outs = generate_text(base.tokenizer, forward.model, frozen, lora,
                             [format_prompt(ex.instruction) for ex in prompts],
                             max_new_tokens=cfg.eval.max_new_tokens_harmful, batch_size=cfg.eval.batch_size,
                             full_text=True)
        answers = [tasks.extract_answer(o) for o in outs]
        return judges.harmful_score(judge.judge([ex.instruction for ex in prompts], answers))

    return hs
