"""``python run.py plan CONFIG``: memory per device of a run before any weight is read.

Sizes come from ``jax.eval_shape`` (the model init, the LoRA init, the optimizer init) and the
sharding rules of ``booster_jax.parallel`` applied to the config's mesh -- or to a hypothetical
one (``plan.devices=8 plan.device_memory_gb=16``). The architecture is read from the model
directory's ``config.json``, or from a built-in table for well-known hub ids (so a 7B run can be
planned on a laptop without downloading anything).

Activations are an analytic estimate of what the backward pass keeps (with ``model.remat=none``
every layer's residuals live until its backward; ``full`` and ``dots`` keep less and recompute the
rest, see ``activation_bytes``; the plan prints all three):

    per layer and token:  6 D (x, norms, residuals, o_proj)  +  q, k, v and the roped q, k
                          + 4 F (gate, up, silu, product)     +  2 r per adapted projection
                          + T (4 + 4 + c) (f32 scores, f32 softmax, probs in the compute dtype) per head
    once per token:       V (c + 4 + 4)  (logits, f32 logits, log-softmax)

times the compute dtype's bytes ``c`` where not said; head and MLP terms shrink with the tensor
axis, rows with the batch axes (``data * fsdp``; the batch is padded to a multiple of it).
When the mesh fits on the local devices and ``plan.compile`` is on, the real steps are also
compiled on abstract inputs and XLA's ``memory_analysis()`` is reported (arguments, outputs,
temporaries per device; on CPU the numbers are the CPU backend's, a proxy for a GPU's).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from booster_jax import parallel
from booster_jax.errors import BoosterInputError

GB = 1e9

# config.json fields of well-known hub ids (only what LlamaConfig.from_hf_dict reads); "pad": whether
# the tokenizer has a pad token (without one the run adds [PAD]: one more embedding row)
_LLAMA2 = dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
               num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5,
               rope_theta=10000.0, max_position_embeddings=4096, pad=False)
KNOWN_MODELS: dict[str, dict] = {
    "meta-llama/Llama-2-7b-hf": _LLAMA2,
    "meta-llama/Llama-2-7b-chat-hf": _LLAMA2,
    "meta-llama/Llama-2-13b-hf": {**_LLAMA2, "hidden_size": 5120, "intermediate_size": 13824,
                                  "num_hidden_layers": 40, "num_attention_heads": 40, "num_key_value_heads": 40},
    "meta-llama/Meta-Llama-3-8B": dict(model_type="llama", vocab_size=128256, hidden_size=4096,
                                       intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                                       num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0,
                                       max_position_embeddings=8192, pad=False),
    "meta-llama/Llama-3.1-8B": dict(model_type="llama", vocab_size=128256, hidden_size=4096,
                                    intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                                    num_key_value_heads=8, rms_norm_eps=1e-5, max_position_embeddings=131072,
                                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0,
                                                  "original_max_position_embeddings": 8192},
                                    rope_theta=500000.0, pad=False),
    "mistralai/Mistral-7B-v0.1": dict(model_type="mistral", vocab_size=32000, hidden_size=4096,
                                      intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                                      num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=10000.0,
                                      sliding_window=4096, max_position_embeddings=32768, pad=False),
    # the paper's judge: a Llama-7B sequence classifier (14 labels); its tokenizer has a pad token
    "PKU-Alignment/beaver-dam-7b": {**_LLAMA2, "pad": True},
    "Qwen/Qwen2.5-7B": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                            num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                            rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=131072,
                            use_sliding_window=False, pad=True),
}


def architecture(cfg) -> tuple[Any, str, bool]:
    """(LlamaConfig, where it came from, whether the run adds a [PAD] row) without reading weights."""
    from booster_jax.models.llama import LlamaConfig

    path = cfg.model.path
    if not path:  # the embedded synthetic world: its (committed or pre-trained) base model, if present
        from booster_jax.data.synthetic import embedded
        from booster_jax.train.pretrain import PretrainRecipe

        for d in (embedded.COMMITTED_BASE, os.path.join(cfg.world.dir, "base_model")):
            if os.path.exists(os.path.join(d, "config.json")):
                path = d
                break
        else:
            r = PretrainRecipe()
            d = dict(model_type="llama", vocab_size=2048, hidden_size=r.hidden_size,
                     intermediate_size=r.intermediate_size, num_hidden_layers=r.num_layers,
                     num_attention_heads=r.num_heads, num_key_value_heads=r.num_kv_heads)
            return LlamaConfig.from_hf_dict(d, "PretrainRecipe"), "the synthetic world's recipe (vocab guessed)", False
    if os.path.isdir(path):
        from booster_jax.models import hf

        llama = hf.read_config(path)
        pad = False
        tc = os.path.join(path, "tokenizer_config.json")
        if os.path.exists(tc):
            with open(tc) as f:
                pad = bool(json.load(f).get("pad_token"))
        return llama, os.path.join(path, "config.json"), cfg.model.add_pad_token and not pad
    if path in KNOWN_MODELS:
        d = dict(KNOWN_MODELS[path])
        pad = d.pop("pad")
        return LlamaConfig.from_hf_dict(d, f"built-in table ({path})"), f"built-in table ({path})", \
            cfg.model.add_pad_token and not pad
    raise BoosterInputError(
        f"model.path {path!r}: not a local directory and not a known id; the planner reads no network. "
        f"Known ids: {', '.join(sorted(KNOWN_MODELS))}")


def _local_bytes(tree, sizes: dict[str, int]) -> int:
    """Bytes one device holds of ``tree`` (ShapeDtypeStructs) under the sharding rules."""
    total = 0
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        spec = parallel.spec_for(parallel._names(path), x.shape, sizes)
        shape = list(x.shape)
        for i, ax in enumerate(spec):
            if ax is not None:
                for a in (ax if isinstance(ax, tuple) else (ax,)):
                    shape[i] //= sizes[a]
        total += math.prod(shape) * np.dtype(x.dtype).itemsize
    return total


SHARD_THRESHOLD = 0.01  # a parameter holding more than this fraction of the base must be sharded on a pod


def check_sufficiently_sharded(params, sizes: dict[str, int]) -> None:
    """On a mesh with fsdp or tensor > 1, every base parameter above ``SHARD_THRESHOLD`` of the model must be
    split across devices (MaxText's ``assert_params_sufficiently_sharded``): a whole copy on every device is a
    rule that does not apply (an axis the mesh does not divide) and costs its size on every chip."""
    if sizes.get("fsdp", 1) * sizes.get("tensor", 1) == 1:
        return
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    total = sum(math.prod(x.shape) for _, x in leaves)
    whole = []
    for path, x in leaves:
        spec = parallel.spec_for(parallel._names(path), x.shape, sizes)
        split = math.prod(sizes[a] for ax in spec if ax is not None for a in (ax if isinstance(ax, tuple) else (ax,)))
        if split == 1 and math.prod(x.shape) > SHARD_THRESHOLD * total:
            whole.append(f"{'/'.join(parallel._names(path))} {list(x.shape)}")
    if whole:
        raise BoosterInputError(
            f"mesh {sizes}: these parameters would be replicated whole on every device (no dimension divides "
            f"its mesh axis): {'; '.join(whole)}. Change mesh.fsdp / mesh.tensor so that their sizes divide")


def activation_bytes(llama, rows: int, length: int, compute_bytes: int, tensor: int, lora_r: int,
                     n_adapted: int, remat: str = "none", head_positions: int | None = None) -> int:
    """The analytic estimate of the activations one device keeps for the backward pass (see the module doc).

    ``remat`` (``model.remat``): "none" keeps every layer's activations; "full" keeps each layer's input
    (D per token) plus one layer's activations, recomputed during its backward; "dots" keeps each layer's
    input and its matmul outputs (q, k, v, o, gate, up, down and the LoRA products) plus one layer's rest.
    ``head_positions``: K, the positions per row the LM head runs at (``data.batches.target_index``: a row's
    targets, bucketed); None = every position, the bound the plan uses since it reads no data.
    """
    def split(n):  # a dimension the tensor axis shards when it divides it
        return n // tensor if n % tensor == 0 else n

    d, f, hd = llama.hidden_size, split(llama.intermediate_size), llama.head_dim
    h, kv = split(llama.num_heads), split(llama.num_kv_heads)
    c = compute_bytes
    per_token_layer = (6 * d + 2 * h * hd + 3 * kv * hd + 4 * f + 2 * lora_r * n_adapted) * c \
        + h * length * (4 + 4 + c)
    per_token_head = llama.vocab_size * (c + 4 + 4)
    tokens = rows * length
    head_tokens = rows * (length if head_positions is None else min(head_positions, length))
    kept = {"none": per_token_layer, "full": d * c,
            "dots": (4 * d + h * hd + 2 * kv * hd + 2 * f + 2 * lora_r * n_adapted) * c}[remat]
    recomputed = 0 if remat == "none" else per_token_layer  # the layer whose backward is running
    return tokens * (llama.num_layers * kept + recomputed) + head_tokens * per_token_head


def _steps_for(cfg):
    """[(label, method, stage, {stream: rows})]: the alignment method and the attack's SFT step."""
    from booster_jax.methods.base import get_method

    out = []
    align = get_method(cfg.align.method, "align")
    rows = {s: (cfg.align.harmful_batch_size if s == "harmful" else cfg.align.batch_size) for s in align.streams}
    out.append((f"align:{cfg.align.method}", cfg.align.method, "align", rows))
    ft = get_method(cfg.finetune.method, "finetune")
    rows = {s: (cfg.finetune.batch_size if s == "task" else cfg.align.batch_size) for s in ft.streams}
    out.append((f"finetune:{cfg.finetune.method}", cfg.finetune.method, "finetune", rows))
    return out


def _compiled_memory(cfg, llama, spec, method, stage, rows, mesh) -> dict:
    """XLA's memory_analysis of the jitted step on abstract, sharded inputs (nothing is allocated)."""
    from jax.sharding import NamedSharding

    from booster_jax.methods.base import (Forward, StepContext, build_extra, build_step, get_method, init_state,
                                          make_optimizer, method_config)
    from booster_jax.models.llama import init_params, make_model
    from booster_jax.models.lora import init_lora

    ms = get_method(method, stage)
    stage_cfg = getattr(cfg, stage)
    optimizer = make_optimizer(stage_cfg.optim, 1000)
    model = make_model(llama, spec, cfg.model.dtype, cfg.model.param_dtype, deterministic=cfg.lora.dropout == 0,
                       scan_layers=cfg.model.scan_layers, remat=cfg.model.remat)
    section = method_config(ms, stage_cfg)
    params = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
    lora = jax.eval_shape(lambda: init_lora(jax.random.key(0), llama, spec))
    extra = jax.eval_shape(lambda: build_extra(ms, lora, params, section))
    state = jax.eval_shape(lambda: init_state(lora, optimizer, extra))
    step = parallel.shard_activations(build_step(ms, StepContext(Forward(model), optimizer, section)), mesh)

    def abstract(tree, shardings):
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

    kw = parallel.step_jit_kwargs(mesh, params, state)
    bs = parallel.batch_sharding(mesh)
    length = cfg.data.max_length
    batches = {}
    for s, n in rows.items():
        r = parallel.padded_batch(n, mesh)
        batches[s] = {"input_ids": jax.ShapeDtypeStruct((r, length), jnp.int32, sharding=bs),
                      "attention_mask": jax.ShapeDtypeStruct((r, length), jnp.int32, sharding=bs),
                      "loss_mask": jax.ShapeDtypeStruct((r, length), jnp.float32, sharding=bs)}
    key = jax.eval_shape(lambda: jax.random.key(0))
    key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=NamedSharding(mesh, jax.sharding.PartitionSpec()))
    compiled = jax.jit(step, donate_argnums=(1,), **kw).lower(
        abstract(params, kw["in_shardings"][0]), abstract(state, kw["in_shardings"][1]), batches, key).compile()
    m = compiled.memory_analysis()
    if m is None:
        return {}
    out = {k: int(getattr(m, k + "_size_in_bytes", 0)) for k in ("argument", "output", "alias", "temp")}
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    out["backend"] = jax.default_backend()
    return out


def _architecture_of(path: str):
    """LlamaConfig of a model directory or a known hub id, without weights; None if neither."""
    from booster_jax.models.llama import LlamaConfig

    if os.path.isdir(path):
        from booster_jax.models import hf

        return hf.read_config(path)
    if path in KNOWN_MODELS:
        d = {k: v for k, v in KNOWN_MODELS[path].items() if k != "pad"}
        return LlamaConfig.from_hf_dict(d, f"built-in table ({path})")
    return None


def eval_phase(cfg, llama, sizes: dict, base_bytes: int) -> dict:
    """Per-device memory of an evaluation: the base weights, the KV cache and logits of batched
    generation, and (BeaverDam) the judge, which is built for the evaluation and sharded like the base.
    Training's state and activations are gone by then (the judge is never loaded beside them)."""
    from booster_jax.models.llama import DTYPES, init_params, make_model

    c = np.dtype(DTYPES[cfg.model.dtype]).itemsize
    rows = -(-parallel.padded_batch(cfg.eval.batch_size, sizes) // parallel.batch_shards(sizes))
    length = cfg.data.max_length + max(cfg.eval.max_new_tokens_harmful, cfg.eval.max_new_tokens_task)
    kv = llama.num_kv_heads // sizes["tensor"] if llama.num_kv_heads % sizes["tensor"] == 0 else llama.num_kv_heads
    out = {"base_params": base_bytes,
           "kv_cache": 2 * llama.num_layers * rows * length * kv * llama.head_dim * c,
           "logits": rows * llama.vocab_size * 4 * 2}
    note = None
    if cfg.eval.judge == "beaver_dam":
        judge = _architecture_of(cfg.eval.judge_path)
        dtype = "bfloat16" if cfg.eval.judge_dtype == "auto" else cfg.eval.judge_dtype
        if judge is None:
            note = f"judge {cfg.eval.judge_path!r}: architecture unknown offline; not counted"
        else:
            shapes = jax.eval_shape(lambda: init_params(make_model(judge, param_dtype=dtype), jax.random.key(0)))
            shapes.pop("lm_head", None)  # a classifier: a 14-label score head instead
            out["judge_params"] = _local_bytes(shapes, sizes)
            # one layer's forward temporaries of a judge batch (no backward: nothing is kept per layer)
            jrows = -(-parallel.padded_batch(16, sizes) // parallel.batch_shards(sizes))
            out["judge_activations"] = activation_bytes(judge.replace(num_layers=1, vocab_size=1), jrows, 512,
                                                        np.dtype(DTYPES[dtype]).itemsize, sizes["tensor"], 0, 0)
            note = f"judge {cfg.eval.judge_path} in {dtype}" + (" (eval.judge_dtype auto: bf16 on an accelerator)"
                                                               if cfg.eval.judge_dtype == "auto" else "")
    out["total"] = sum(out.values())
    return {"estimate": out, "note": note, "rows": rows, "length": length}


def _cpu_bf16(cfg, compiled: dict) -> bool:
    """XLA:CPU's bf16 numbers say nothing about a GPU's: it converts every bf16 weight to an f32 copy
    before the layer loop (the stacked frozen kernels, all layers at once: +2x the weights) and keeps
    bf16 activations as f32. Measured on the Llama-2-7B plan: 60.4 GB temporaries for 22.2 estimated."""
    return compiled.get("backend") == "cpu" and "bfloat16" in (cfg.model.dtype, cfg.model.param_dtype)


def _f32_check(cfg, llama, spec, method, stage, rows, mesh, sizes, act_bf16) -> dict:
    """The same step compiled in float32, where XLA:CPU adds no converts, against the estimate's f32
    activations: the check of the estimate's formula that a CPU can give."""
    from booster_jax.config import apply_overrides

    cfg32 = apply_overrides(cfg, {"model.dtype": "float32", "model.param_dtype": "float32"})
    m = _compiled_memory(cfg32, llama, spec, method, stage, rows, mesh)
    act32 = max(activation_bytes(llama, -(-parallel.padded_batch(n, sizes) // parallel.batch_shards(sizes)),
                                 cfg.data.max_length, 4, sizes["tensor"], cfg.lora.r, len(cfg.lora.targets),
                                 cfg.model.remat)
                for n in rows.values())
    return {"temp": m.get("temp", 0), "activations_estimate": act32, "ratio": m.get("temp", 0) / max(act32, 1),
            "bf16_activations_estimate": act_bf16}


def make_plan(cfg) -> dict:
    """The plan as a dict (``print_plan`` formats it)."""
    from booster_jax.methods.base import get_method, init_state, make_optimizer
    from booster_jax.models.llama import DTYPES, LoraSpec, init_params, make_model
    from booster_jax.models.lora import init_lora

    llama, source, adds_pad = architecture(cfg)
    if adds_pad:
        llama = llama.replace(vocab_size=llama.vocab_size + 1)
    local = jax.device_count()
    devices = cfg.plan.devices or local
    shape = parallel.mesh_shape(cfg.mesh, devices)
    sizes = dict(zip(parallel.AXES, shape))
    spec = LoraSpec(r=cfg.lora.r, alpha=cfg.lora.alpha, targets=tuple(cfg.lora.targets), dropout=cfg.lora.dropout)
    model = make_model(llama, spec, cfg.model.dtype, cfg.model.param_dtype)
    params = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
    lora = jax.eval_shape(lambda: init_lora(jax.random.key(0), llama, spec))
    opt = jax.eval_shape(lambda: init_state(lora, make_optimizer(cfg.align.optim, 1000)).opt_state)
    check_sufficiently_sharded(params, sizes)
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    n_lora = sum(math.prod(x.shape) for x in jax.tree.leaves(lora))
    c = np.dtype(DTYPES[cfg.model.dtype]).itemsize
    lora_local = _local_bytes(lora, sizes)
    per_device = {"base_params": _local_bytes(params, sizes), "lora": lora_local, "optimizer": _local_bytes(opt, sizes)}
    if sizes["fsdp"] > 1:
        # FSDP all-gathers a layer's weights (and the LM head) before use: ~two layers in flight
        layer = sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(params["layers"]))
        head = max(math.prod(x.shape) * np.dtype(x.dtype).itemsize
                   for k, v in params.items() if k in ("embed_tokens", "lm_head") for x in jax.tree.leaves(v))
        per_device["gathered_weights"] = (2 * layer // llama.num_layers + head) // sizes["tensor"]

    mem_gb = cfg.plan.device_memory_gb
    mem_source = "plan.device_memory_gb"
    if not mem_gb and not cfg.plan.devices:
        try:
            limit = (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")
        except Exception:  # noqa: BLE001 - CPU backends report nothing
            limit = None
        if limit:
            mem_gb, mem_source = limit / GB, "the local device"

    steps = []
    mesh = None
    if cfg.plan.compile and devices <= local:
        mesh = parallel.make_mesh(cfg.mesh, devices=jax.devices()[:devices])
    for label, method, stage, rows in _steps_for(cfg):
        ms = get_method(method, stage)
        # gradient-sized LoRA trees alive at the peak (MethodSpec.gradient_trees): SFT g and the update;
        # Booster g1, w', g2, g3, g, update
        n_grad_trees = ms.gradient_trees
        def act_for(remat):  # the passes run one after another: the largest batch counts
            return max(activation_bytes(llama, -(-parallel.padded_batch(n, sizes) // parallel.batch_shards(sizes)),
                                        cfg.data.max_length, c, sizes["tensor"], cfg.lora.r, len(cfg.lora.targets),
                                        remat) for n in rows.values())

        act = act_for(cfg.model.remat)
        est = dict(per_device, gradients=n_grad_trees * lora_local, activations=act)
        est["total"] = sum(est.values())
        entry = {"label": label, "rows": rows, "estimate": est,
                 "activations_by_remat": {r: act_for(r) for r in ("none", "full", "dots")}}
        if ms.passes > 1 and not ms.scanned_passes:
            # Measured (benchmarks/bench_memory.py, XLA CPU): the scan residual buffers of every pass are
            # allocated at the start of the step, so a multi-pass step written as plain calls can hold all
            # its passes' activations (the Booster pass engine runs them as one lax.scan and does not).
            entry["all_passes_total"] = est["total"] + (ms.passes - 1) * act
            entry["passes"] = ms.passes
        if mesh is not None:
            try:
                entry["compiled"] = _compiled_memory(cfg, llama, spec, method, stage, rows, mesh)
                if _cpu_bf16(cfg, entry["compiled"]):
                    entry["f32_check"] = _f32_check(cfg, llama, spec, method, stage, rows, mesh, sizes, act)
            except Exception as e:  # noqa: BLE001 - the estimate still stands
                entry["compiled_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        steps.append(entry)
    evaluation = eval_phase(cfg, llama, sizes, per_device["base_params"]) if cfg.eval.enabled else None
    return {
        "evaluation": evaluation,
        "model": cfg.model.path or "(synthetic world)", "source": source, "adds_pad_row": adds_pad,
        "n_params": n_params, "n_lora": n_lora, "param_dtype": cfg.model.param_dtype, "dtype": cfg.model.dtype,
        "mesh": sizes, "devices": devices, "local_devices": local, "length": cfg.data.max_length,
        "device_memory_gb": mem_gb or None, "device_memory_source": mem_source if mem_gb else None,
        "per_device": per_device, "steps": steps,
        "compile_note": None if mesh is not None else (
            "compile off (plan.compile=false)" if not cfg.plan.compile else
            f"not compiled: the mesh needs {devices} devices, {local} local"),
    }


def _gb(n: float) -> str:
    return f"{n / GB:8.2f} GB"


def print_plan(cfg, notes=()) -> dict:
    """Print the plan for ``cfg`` (only process 0 prints) and return it; ``notes``: lines said at the end
    (e.g. the data files a training run will need but that are not there yet)."""
    p = make_plan(cfg)
    if jax.process_index() != 0:
        return p
    mesh = " x ".join(f"{k}={v}" for k, v in p["mesh"].items())
    lines = [
        f"model      {p['model']}  [{p['source']}]",
        f"           {p['n_params'] / 1e9:.3f} B params ({p['param_dtype']}), LoRA {p['n_lora'] / 1e6:.2f} M "
        f"(r={cfg.lora.r} on {','.join(cfg.lora.targets)}), compute {p['dtype']}"
        + (", +1 [PAD] row" if p["adds_pad_row"] else ""),
        f"mesh       {mesh} ({p['devices']} devices; batch rows padded to a multiple of "
        f"{p['mesh']['data'] * p['mesh']['fsdp']}), length {p['length']}",
    ]
    mem = p["device_memory_gb"]
    lines.append(f"device     {mem:.0f} GB ({p['device_memory_source']})" if mem else
                 "device     memory unknown (set plan.device_memory_gb)")
    for s in p["steps"]:
        e = s["estimate"]
        lines.append(f"\n{s['label']}  (rows per stream: {s['rows']})   per device:")
        for k in ("base_params", "gathered_weights", "lora", "optimizer", "gradients", "activations", "total"):
            if k in e:
                lines.append(f"  {k:<17}{_gb(e[k])}" + (f"   (model.remat={cfg.model.remat})" if k == "activations" else ""))
        by = s["activations_by_remat"]
        lines.append("  activations by model.remat: " + ", ".join(
            f"{r} {by[r] / GB:.2f} GB" for r in ("none", "dots", "full")))
        if "compiled" in s and s["compiled"]:
            m = s["compiled"]
            lines.append(f"  compiled ({m['backend']}): arguments {m['argument'] / GB:.2f} GB, outputs "
                         f"{m['output'] / GB:.2f} GB (aliased {m['alias'] / GB:.2f}), temporaries "
                         f"{m['temp'] / GB:.2f} GB -> peak {m['peak'] / GB:.2f} GB")
        elif "compiled_error" in s:
            lines.append(f"  compile failed: {s['compiled_error']}")
        if "all_passes_total" in s:
            lines.append(f"  {'all ' + str(s['passes']) + ' passes live':<17}{_gb(s['all_passes_total'])}   "
                         "(if XLA keeps every pass's activations, as its CPU schedule does)")
        check = s.get("f32_check")
        if check:
            lines.append("  (not a GPU's number: XLA:CPU converts every bf16 weight to an f32 copy before the layer "
                         "loop and keeps bf16 activations as f32)")
            lines.append(f"  check in float32 (no converts): compiled temporaries {check['temp'] / GB:.2f} GB vs "
                         f"estimated f32 activations {check['activations_estimate'] / GB:.2f} GB "
                         f"({100 * (check['ratio'] - 1):+.0f}%); the bf16 estimate uses the same formula")
        if mem:
            compiled_peak = None if check else s.get("compiled", {}).get("peak")
            for what, need in (("estimate", e["total"]), ("all passes live", s.get("all_passes_total")),
                               ("compiled", compiled_peak)):
                if need:
                    verdict = "fits" if need <= 0.9 * mem * GB else "does NOT fit"
                    lines.append(f"  -> {what}: {verdict} in {mem:.0f} GB ({100 * need / (mem * GB):.0f}% of it)")
    ev = p.get("evaluation")
    if ev:
        e = ev["estimate"]
        lines.append(f"\nevaluate  (generation batch {ev['rows']} rows per device x {ev['length']} tokens; "
                     f"{ev['note'] or 'no model judge'})   per device:")
        for k in ("base_params", "kv_cache", "logits", "judge_params", "judge_activations", "total"):
            if k in e:
                lines.append(f"  {k:<17}{_gb(e[k])}")
        if mem:
            verdict = "fits" if e["total"] <= 0.9 * mem * GB else "does NOT fit"
            lines.append(f"  -> estimate: {verdict} in {mem:.0f} GB ({100 * e['total'] / (mem * GB):.0f}% of it)")
    if mem:
        lines.append("\n(\"fits\" leaves 10% for the runtime; JAX preallocates 75% of a GPU unless "
                     "XLA_PYTHON_CLIENT_MEM_FRACTION is raised)")
    if p["compile_note"]:
        lines.append(f"\n({p['compile_note']}; the numbers above are the eval_shape sizes and the estimate)")
    if notes:
        lines.append("")
        lines += [f"note: {n}" for n in notes]
    print("\n".join(lines))
    return p
