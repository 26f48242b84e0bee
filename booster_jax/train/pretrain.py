"""The embedded default's base model: the committed one when it belongs to the world, else pre-trained here.

``resolve(cfg)`` turns a config with an empty ``model.path`` into an ordinary config that names
real files: the world's data files and a Hugging Face model directory. Everything after that runs
through exactly the code a Llama-2-7B run uses. The base model for world seed 0 is committed
(``data/synthetic/base_model/``, a few MB) with its recipe; ``python run.py pretrain`` rebuilds it.
It lives in ``train/`` because pre-training is a training stage (the project's own SFT step and loop).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil

import jax

from booster_jax import files, rundir
from booster_jax.config import Config, OptimConfig, apply_overrides
from booster_jax.data.synthetic.embedded import (COMMITTED_BASE, _get, data_file_problems, ensure_world,
                                                 world_fingerprint)
from booster_jax.errors import BoosterInputError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PretrainRecipe:
    """The tiny LLaMA and how it is pre-trained (full-parameter, the project's own SFT step)."""

    hidden_size: int = 128
    intermediate_size: int = 344
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    steps: int = 1000
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    max_length: int = 64
    buckets: tuple[int, ...] = (32, 48, 64)  # the corpus is 13-40 tokens: little padding
    seed: int = 0


def resolve(cfg: Config, progress: bool = True) -> Config:
    """Fill in the embedded world's files and base model wherever the config leaves them empty."""
    if cfg.model.path:
        problems = list(data_file_problems(cfg))
        if problems:
            raise BoosterInputError("; ".join(f"{k}: {msg}" for k, msg in problems))
        return cfg
    paths = ensure_world(cfg)
    fills = {"data.alignment_file": paths["alignment"], "data.task_file": paths["task_train"],
             "data.task_eval_file": paths["task_validation"], "data.eval_harmful_file": paths["eval"],
             "data.benign_file": paths["benign"]}
    overrides = {k: v for k, v in fills.items() if not _get(cfg, k)}
    if cfg.eval.judge == "synthetic" and not cfg.eval.judge_path:
        overrides["eval.judge_path"] = paths["judge_vocab"]
    overrides["model.path"] = base_model_dir(cfg, paths, progress)
    return apply_overrides(cfg, overrides)


def base_model_dir(cfg: Config, paths: dict[str, str], progress: bool = True) -> str:
    """The committed base model if it was built from this very world, else one pre-trained here."""
    wfp = world_fingerprint(paths)
    for candidate in (COMMITTED_BASE, os.path.join(cfg.world.dir, "base_model")):
        recipe = os.path.join(candidate, "recipe.json")
        if os.path.exists(recipe) and json.load(open(recipe)).get("world_fingerprint") == wfp:
            return candidate
    log.warning("no base model was pre-trained on this world (%s); pre-training one now (about 10 min on "
                "2 CPU cores). The committed one belongs to world seed 0.", cfg.world.dir)
    return pretrain_base(cfg, progress=progress)


def pretrain_base(cfg: Config, recipe: PretrainRecipe = PretrainRecipe(), out_dir: str | None = None,
                  progress: bool = True) -> str:
    """Pre-train the tiny base model on the world's instruction corpus and save it as a HF directory.

    Resumable like every stage (its checkpoints live under ``<world.dir>/pretrain_stage``).
    """
    from booster_jax.data import formats
    from booster_jax.data.batches import BatchStream
    from booster_jax.data.synthetic.tokenizer import build_tokenizer
    from booster_jax.data.template import tokenize_examples
    from booster_jax.methods.base import Forward, StepContext, init_state, make_optimizer
    from booster_jax.methods.sft import make_sft_step
    from booster_jax.models import hf
    from booster_jax.models.llama import LlamaConfig, init_params, make_model
    from booster_jax.train.checkpoint import StageStore
    from booster_jax.train.loop import Reporting, StepProgram, run_stage

    paths = ensure_world(cfg)
    out_dir = out_dir or os.path.join(cfg.world.dir, "base_model")
    tok_dir = os.path.join(cfg.world.dir, "tokenizer")
    build_tokenizer(cfg.world.dir, tok_dir)
    tokenizer = hf.load_tokenizer(tok_dir, add_pad_token=False)
    llama = LlamaConfig(vocab_size=len(tokenizer), hidden_size=recipe.hidden_size,
                        intermediate_size=recipe.intermediate_size, num_layers=recipe.num_layers,
                        num_heads=recipe.num_heads, num_kv_heads=recipe.num_kv_heads,
                        head_dim=recipe.hidden_size // recipe.num_heads, rms_norm_eps=1e-5,
                        max_position_embeddings=256)
    model = make_model(llama)
    params = init_params(model, jax.random.key(recipe.seed))
    examples = formats.read_instructions(paths["pretrain"])
    tok = tokenize_examples(tokenizer, examples, recipe.max_length)
    stream = BatchStream(tok.items, recipe.batch_size, seed=recipe.seed, pad_id=tokenizer.pad_token_id,
                         buckets=recipe.buckets, drop_last=True)
    optim = OptimConfig(lr=recipe.lr, weight_decay=recipe.weight_decay, max_grad_norm=1.0, schedule="cosine",
                        warmup_steps=recipe.warmup_steps)
    decay_mask = jax.tree_util.tree_map_with_path(lambda p, _: p[-1].key not in ("scale", "bias"), params)
    optimizer = make_optimizer(optim, recipe.steps, decay_mask=decay_mask)
    step_fn = make_sft_step(StepContext(Forward(model, trainable_is_lora=False), optimizer))
    fingerprint = hashlib.sha256(json.dumps([dataclasses.asdict(recipe), world_fingerprint(paths)]).encode()
                                 ).hexdigest()[:16]
    stage_dir = os.path.join(cfg.world.dir, "pretrain_stage")
    rundir.claim_stage_dir(stage_dir, fingerprint)  # the one check: another recipe's stage is moved aside
    store = StageStore(stage_dir, cfg.run.keep_last, max(cfg.run.checkpoint_every, 100), fingerprint=fingerprint)
    state = init_state(params, optimizer)
    if store.is_done(fingerprint):
        state = store.load_final(state)[0]
    else:
        state, summary = run_stage(name="pretrain", store=store, program=StepProgram(step_fn), frozen=None,
                                   state=state, streams={"align": stream}, total_steps=recipe.steps,
                                   rng=jax.random.key(recipe.seed),
                                   report=Reporting.for_run(cfg.run, progress=progress,
                                                            metrics_path=os.path.join(stage_dir, "metrics.jsonl")))
        store.save_final(state, {"stage": "pretrain", "summary": summary}, fingerprint)
    if jax.process_index() == 0:
        hf.save_params(state.trainable, llama, out_dir)
        for name in os.listdir(tok_dir):
            shutil.copy(os.path.join(tok_dir, name), out_dir)
        files.write_json_atomic(os.path.join(out_dir, "recipe.json"), {  # last: it marks the model complete
            "recipe": dataclasses.asdict(recipe), "world_seed": cfg.world.seed,
            "world_fingerprint": world_fingerprint(paths),
            "command": f"python run.py pretrain world.seed={cfg.world.seed}"}, indent=2)
    log.info("base model written to %s", out_dir)
    return out_dir
