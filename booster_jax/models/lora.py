"""LoRA adapters as a pytree of their own: init like PEFT, merge, and PEFT-format import/export.

The tree mirrors the base params: ``lora["layers"][block][proj] = {"a": [L, in, r], "b": [L, r, out]}``
where block is ``self_attn`` or ``mlp``; the layer axis is leading, as in the scanned base params.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from booster_jax import files
from booster_jax.errors import BoosterInputError
from booster_jax.models.llama import LlamaConfig, LoraSpec, projection_shape
from booster_jax.models.schema import LORA_TARGETS, PROJECTIONS

BLOCK_OF = {name: block for name, (block, _, _) in PROJECTIONS.items()}  # the model's schema
PEFT_PREFIX = "base_model.model.model.layers"


def check_spec(spec: LoraSpec) -> None:
    bad = [t for t in spec.targets if t not in LORA_TARGETS]
    if bad or not spec.targets:
        raise BoosterInputError(f"lora.targets: {bad or 'empty'} not allowed; expected a subset of {LORA_TARGETS}")
    if spec.r <= 0:
        raise BoosterInputError(f"lora.r: expected a positive rank, got {spec.r}")


def init_lora(rng: jax.Array, cfg: LlamaConfig, spec: LoraSpec, dtype=jnp.float32) -> dict:
    """A ~ Kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)) as PEFT; B = 0, so the model is unchanged."""
    check_spec(spec)
    tree: dict = {}
    for i, proj in enumerate(spec.targets):
        fan_in, fan_out = projection_shape(cfg, proj)
        bound = 1.0 / np.sqrt(fan_in)
        a = jax.random.uniform(jax.random.fold_in(rng, i), (cfg.num_layers, fan_in, spec.r), dtype, -bound, bound)
        b = jnp.zeros((cfg.num_layers, spec.r, fan_out), dtype)
        tree.setdefault(BLOCK_OF[proj], {})[proj] = {"a": a, "b": b}
    return {"layers": tree}


def iter_adapters(lora: dict):
    for block, projs in lora["layers"].items():
        for proj, ab in projs.items():
            yield block, proj, ab["a"], ab["b"]


def merge_lora(params: dict, lora: dict, spec: LoraSpec) -> dict:
    """Base params with ``W + A @ B * scaling`` folded in (the baselines merge before fine-tuning)."""
    layers = jax.tree.map(lambda x: x, params["layers"])  # shallow structural copy
    for block, proj, a, b in iter_adapters(lora):
        kernel = layers[block][proj]["kernel"]
        delta = jnp.einsum("lir,lro->lio", a.astype(jnp.float32), b.astype(jnp.float32)) * spec.scaling
        layers[block][proj] = {**layers[block][proj], "kernel": (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)}
    return {**params, "layers": layers}


def save_peft(lora: dict, spec: LoraSpec, out_dir: str, base_model: str = "") -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` with PEFT's names and [out, in] layout."""
    from safetensors.numpy import save_file

    os.makedirs(out_dir, exist_ok=True)
    tensors = {}
    for block, proj, a, b in iter_adapters(lora):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        for i in range(a.shape[0]):
            base = f"{PEFT_PREFIX}.{i}.{block}.{proj}"
            tensors[f"{base}.lora_A.weight"] = np.ascontiguousarray(a[i].T)
            tensors[f"{base}.lora_B.weight"] = np.ascontiguousarray(b[i].T)
    save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": spec.r, "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout, "target_modules": list(spec.targets), "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "base_model_name_or_path": base_model,
    }
    files.write_json_atomic(os.path.join(out_dir, "adapter_config.json"), config, indent=2)


def load_peft(adapter_dir: str, cfg: LlamaConfig) -> tuple[dict, LoraSpec]:
    """Read a PEFT LoRA directory into our tree; errors name the file and the tensor."""
    from safetensors.numpy import load_file

    conf_path = os.path.join(adapter_dir, "adapter_config.json")
    weights_path = os.path.join(adapter_dir, "adapter_model.safetensors")
    for path in (conf_path, weights_path):
        if not os.path.exists(path):
            raise BoosterInputError(f"{path}: missing (a PEFT LoRA directory needs adapter_config.json and "
                                    "adapter_model.safetensors)")
    with open(conf_path) as f:
        conf = json.load(f)
    if conf.get("peft_type", "LORA") != "LORA":
        raise BoosterInputError(f"{conf_path}: peft_type {conf.get('peft_type')!r}; expected 'LORA'")
    targets = conf.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    targets = tuple(t for t in LORA_TARGETS if t in targets)
    spec = LoraSpec(r=int(conf["r"]), alpha=float(conf["lora_alpha"]), targets=targets,
                    dropout=float(conf.get("lora_dropout", 0.0)))
    if conf.get("use_rslora") or conf.get("use_dora"):
        raise BoosterInputError(f"{conf_path}: rsLoRA/DoRA adapters are not supported")
    tensors = load_file(weights_path)
    tree: dict = {}
    for proj in targets:
        fan_in, fan_out = projection_shape(cfg, proj)
        a = np.zeros((cfg.num_layers, fan_in, spec.r), np.float32)
        b = np.zeros((cfg.num_layers, spec.r, fan_out), np.float32)
        for i in range(cfg.num_layers):
            for kind, dest, shape in (("lora_A", a, (spec.r, fan_in)), ("lora_B", b, (fan_out, spec.r))):
                name = _find_tensor(tensors, f"layers.{i}.{BLOCK_OF[proj]}.{proj}.{kind}")
                if name is None:
                    raise BoosterInputError(f"{weights_path}: missing tensor for layer {i} {proj} {kind}")
                t = tensors[name]
                if t.shape != shape:
                    raise BoosterInputError(f"{weights_path}: {name} has shape {t.shape}; expected {shape}")
                dest[i] = t.T
        tree.setdefault(BLOCK_OF[proj], {})[proj] = {"a": jnp.asarray(a), "b": jnp.asarray(b)}
    return {"layers": tree}, spec


def _find_tensor(tensors: dict, suffix: str) -> str | None:
    for name in tensors:  # PEFT names carry an optional adapter name: ...lora_A.default.weight or ...lora_A.weight
        stem = name.replace(".default.weight", ".weight")
        if stem.endswith(suffix + ".weight"):
            return name
    return None
