"""A profile of a step is readable: the Booster passes and each decoder layer carry a ``jax.named_scope``
that survives into the lowered program's op locations (what a profiler's trace names ops by)."""

import jax
import jax.numpy as jnp
import numpy as np

from booster_jax.config import OptimConfig, load_config
from booster_jax.methods.base import Forward, StepContext, get_method, init_state, make_optimizer
from booster_jax.models.llama import LlamaConfig, LoraSpec, init_params, make_model
from booster_jax.models.lora import init_lora

CFG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                  num_kv_heads=1, head_dim=16)
SPEC = LoraSpec(r=2, alpha=4.0, targets=("q_proj", "v_proj"))


def test_booster_step_names_its_passes_and_layers():
    model = make_model(CFG, SPEC)
    params = init_params(model, jax.random.key(0))
    optimizer = make_optimizer(OptimConfig(lr=1e-3), 10)
    spec = get_method("booster", "align")
    step = spec.make_step(StepContext(Forward(model), optimizer, load_config(None, []).align.booster,
                                      total_steps=10))
    state = init_state(init_lora(jax.random.key(1), CFG, SPEC), optimizer)
    ids = jnp.asarray(np.random.RandomState(0).randint(1, 64, (2, 8)), jnp.int32)
    b = {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "loss_mask": jnp.ones(ids.shape, jnp.float32)}
    text = jax.jit(step).lower(params, state, {"align": b, "harmful": b}, jax.random.key(2)).as_text(
        debug_info=True)
    # the op locations' name stacks ("jit(step)/booster_passes/scan", "layers/decoder_layer/add"): the scope's
    # name followed by "/", not the function booster_passes, whose name is in the call-site locations anyway
    assert "/booster_passes/" in text and "/decoder_layer/" in text
