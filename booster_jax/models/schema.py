"""The LLaMA family's parameter schema, declared once: every parameter's path and logical axes.

Plain data and no JAX import, so the config can check ``lora.targets`` and the dtypes without loading
the model. The model (``models/llama.py``) creates its projections from ``PROJECTIONS``; the LoRA tree
and its PEFT names (``models/lora.py``), the HF tensor names (``models/hf.py``), the sharding rules
(``parallel.py``) and the plan read this module and nothing else, so a new projection or parameter is
one edit here, and a parameter missing from it is an error where shardings are derived, never a silent
replica.
"""

from __future__ import annotations

# The projections: name -> (block, logical axis of the input features, of the output features). A
# projection's base kernel/bias and its LoRA A/B all live at layers/<block>/<name>/<leaf>.
PROJECTIONS: dict[str, tuple[str, str, str]] = {
    "q_proj": ("self_attn", "embed", "heads"), "k_proj": ("self_attn", "embed", "heads"),
    "v_proj": ("self_attn", "embed", "heads"), "o_proj": ("self_attn", "heads", "embed"),
    "gate_proj": ("mlp", "embed", "mlp"), "up_proj": ("mlp", "embed", "mlp"), "down_proj": ("mlp", "mlp", "embed"),
}
LORA_TARGETS = tuple(PROJECTIONS)

# Every other parameter, by its path from the model root -> its logical axes. A layer's parameters carry a
# leading "layers" axis (``nn.scan`` stacks them; the unrolled loop stacks them the same way).
PARAM_AXES: dict[tuple[str, ...], tuple[str | None, ...]] = {
    ("embed_tokens", "embedding"): ("vocab", "embed"),
    ("lm_head", "kernel"): ("embed", "vocab"),
    ("norm", "scale"): (None,),
    ("layers", "input_layernorm", "scale"): ("layers", None),
    ("layers", "post_attention_layernorm", "scale"): ("layers", None),
    ("score", "kernel"): ("embed", None),  # the sequence-classification head (LlamaForSequenceClassification)
}
ROOTS = frozenset(path[0] for path in PARAM_AXES)  # the top-level keys of a parameter tree

# model.dtype / model.param_dtype (the names of jax.numpy dtypes)
DTYPE_NAMES = ("float32", "bfloat16")


def param_axes(path: tuple[str, ...]) -> tuple[str | None, ...] | None:
    """The logical axes of the parameter at ``path`` (from the model root), or None if the schema has none."""
    path = tuple(path)
    if path in PARAM_AXES:
        return PARAM_AXES[path]
    if len(path) == 4 and path[0] == "layers" and PROJECTIONS.get(path[2], ("",))[0] == path[1]:
        _, i, o = PROJECTIONS[path[2]]
        return {"kernel": ("layers", i, o), "bias": ("layers", o),
                "a": ("layers", i, "lora_rank"), "b": ("layers", "lora_rank", o)}.get(path[3])
    return None
