"""booster-jax's Python API: the names a notebook or a plugin uses, stable across releases.

    import booster_jax as bj
    cfg = bj.resolve(bj.load_config("configs/synthetic/smoke.yaml"))  # the embedded world, no download
    base = bj.load_base(cfg); forward = bj.forward_for(cfg, base)

The README's "Python API" session is run by tests/test_api.py. Names are resolved on first use
(PEP 562), so ``import booster_jax.config`` or ``run.py --help`` does not pay for JAX, Flax and
transformers; ``dir(booster_jax)`` lists them all.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    # configs: typed, validated; the section fields of a plugin method use ``setting`` and the range checks
    "booster_jax.config": ("Config", "load_config", "config_from_dict", "apply_overrides", "config_to_dict",
                           "setting", "POS", "NONNEG", "UNIT"),
    "booster_jax.errors": ("BoosterInputError",),
    # a model and its tokenizer (HF directory or hub id; the embedded one), the forward call with LoRA
    "booster_jax.train.pretrain": ("resolve",),
    "booster_jax.train.stages": ("Base", "load_base", "forward_for", "lora_spec", "alignment_examples",
                                 "run_align", "run_finetune"),
    "booster_jax.models.llama": ("LoraSpec",),
    "booster_jax.models.lora": ("init_lora", "merge_lora"),
    # rows and batches
    "booster_jax.data.template": ("Example", "tokenize_examples"),
    "booster_jax.data.formats": ("read_refusal_rows", "read_instructions"),
    "booster_jax.data.batches": ("collate",),
    "booster_jax.api": ("make_batch", "stage_step"),
    # the method contract, the losses and the built-in steps
    "booster_jax.methods.base": ("MethodSpec", "StepContext", "TrainState", "Forward", "register", "get_method",
                                 "method_config", "lm_loss", "token_nll", "global_norm", "apply_gradients",
                                 "init_state", "make_optimizer"),
    "booster_jax.methods.sft": ("make_sft_step", "lm_value_and_grad"),
    "booster_jax.methods.booster": ("make_booster_step", "booster_gradient", "booster_passes", "booster_update"),
    "booster_jax.methods.vaccine": ("make_vaccine_step", "vaccine_gradient"),
    "booster_jax.methods.repnoise": ("make_repnoise_step", "repnoise_loss"),
    "booster_jax.methods.booster_vaccine": ("make_booster_vaccine_step",),
    "booster_jax.methods.lisa": ("make_lisa_step",),
    # stages, the whole pipeline, an evaluation
    "booster_jax.pipeline": ("run_pipeline",),
    "booster_jax.eval.evaluate": ("evaluate", "heldout_loss", "make_judge"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'booster_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
