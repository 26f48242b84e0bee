"""Export a finished stage's weights for use elsewhere (vLLM, transformers, another evaluator).

``peft``: the stage's LoRA as a PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``)
for the base model it was trained on. ``merged``: the base weights with the LoRA folded in, as a
Hugging Face safetensors checkpoint with its tokenizer. Exports only read finished stages: a stage
that is missing or was finished under another configuration is an error, never a training run.
"""

from __future__ import annotations

import logging
import os

from booster_jax.config import Config
from booster_jax.errors import BoosterInputError
from booster_jax.models import hf
from booster_jax.models.lora import merge_lora, save_peft
from booster_jax.train import stages
from booster_jax.train.checkpoint import StageStore

log = logging.getLogger(__name__)

STAGES = ("align", "finetune")
FORMATS = ("peft", "merged")


def pick_run(cfg: Config, variant: str | None, seed: int | None):
    """The grid's (variant, seed) run the export names; ambiguity is an error listing the choices."""
    from booster_jax.pipeline import expand_grid

    runs = expand_grid(cfg)
    chosen = [r for r in runs if (variant is None or r.variant == variant) and (seed is None or r.seed == seed)]
    if len(chosen) != 1:
        names = ", ".join(f"--variant {r.variant} --seed {r.seed}" for r in runs)
        what = "matches no run" if not chosen else "matches several runs"
        raise BoosterInputError(f"export: --variant {variant} --seed {seed} {what} of the config's grid; "
                                f"choose one of: {names}")
    return chosen[0]


def pick_ratio(cfg: Config, ratio: float | None) -> float:
    ratios = list(cfg.grid.harmful_ratios)
    if ratio is None:
        if len(ratios) != 1:
            raise BoosterInputError(f"export --stage finetune: the grid has harmful ratios {ratios}; "
                                    "choose one with --ratio")
        return ratios[0]
    if ratio not in ratios:
        raise BoosterInputError(f"export: --ratio {ratio} is not in grid.harmful_ratios {ratios}")
    return ratio


def _require_done(stage_dir: str, fingerprint: str, command: str) -> None:
    done = StageStore(stage_dir).read_done()
    if done is None:
        raise BoosterInputError(f"{stage_dir}: the stage is not finished; run `{command}` first")
    if done.get("fingerprint") != fingerprint:
        raise BoosterInputError(f"{stage_dir}: the stage was finished under another configuration; rerun "
                                f"`{command}` with this config first")


def stage_weights(cfg: Config, base, stage: str, variant=None, seed=None, ratio=None):
    """(frozen params, LoRA, name) of a finished stage, restored from its Orbax output."""
    from booster_jax.pipeline import with_ratio

    run = pick_run(cfg, variant, seed)
    rc = run.cfg
    out = cfg.run.output_dir
    afp = stages.align_fingerprint(rc, base)
    align_dir = os.path.join(out, "align", afp)
    _require_done(align_dir, afp, "python run.py align CONFIG")
    align_lora = stages.run_align(rc, base, align_dir, progress=False)  # a finished stage: restored, not run
    if stage == "align":
        return base.params, align_lora, f"{run.name} aligned"
    p = pick_ratio(cfg, ratio)
    pc = with_ratio(rc, p)
    tag = f"{run.name}-p{p:g}"
    finetune_dir = os.path.join(out, "finetune", tag)
    _require_done(finetune_dir, stages.finetune_fingerprint(pc, afp), "python run.py finetune CONFIG")
    frozen, lora = stages.run_finetune(pc, base, align_lora, afp, finetune_dir, progress=False)
    return frozen, lora, tag


def export(cfg: Config, stage: str, fmt: str, out_dir: str, variant=None, seed=None, ratio=None) -> str:
    """Write the export to ``out_dir`` (an empty or new directory); returns the directory."""
    if stage not in STAGES:
        raise BoosterInputError(f"export --stage: {stage!r}; expected one of {STAGES}")
    if fmt not in FORMATS:
        raise BoosterInputError(f"export --format: {fmt!r}; expected one of {FORMATS}")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise BoosterInputError(f"export --out {out_dir}: the directory is not empty; choose a new one")
    base = stages.load_base(cfg)
    frozen, lora, name = stage_weights(cfg, base, stage, variant, seed, ratio)
    spec = stages.lora_spec(cfg)
    if fmt == "peft":
        if frozen is not base.params:
            raise BoosterInputError(
                f"export --format peft: the attack of {name} trained a fresh LoRA on the alignment-merged "
                "weights, so an adapter alone does not reproduce it; use --format merged, or export "
                "--stage align --format merged and apply this stage's adapter to that")
        save_peft(lora, spec, out_dir, base_model=base.model_dir)
    else:
        hf.save_params(merge_lora(frozen, lora, spec), base.llama, out_dir, dtype=_save_dtype(cfg))
    base.tokenizer.save_pretrained(out_dir)  # carries the [PAD] token the run added
    log.info("exported %s (%s, %s) to %s", name, stage, fmt, out_dir)
    return out_dir


def _save_dtype(cfg: Config) -> str:
    return "bfloat16" if cfg.model.param_dtype == "bfloat16" else "float32"
