#!/usr/bin/env python
"""Steady-state speed of sft_step and booster_step on one accelerator (prepared for one H100/H200).

    python benchmarks/gpu_steps.py                     # ~1.1B LLaMA (TinyLlama shape), bf16, LoRA r 32 q,k,v
    python benchmarks/gpu_steps.py --batches 10,40 --steps 20 --json $OUT/gpu_steps.json
    python benchmarks/gpu_steps.py --tiny              # a tiny model on CPU, in seconds (a smoke test)

After the steps, one evaluation phase: greedy generation (``--eval-prompts`` x ``--eval-new-tokens``)
and the BeaverDam-shaped judge scoring the pairs, with the device's peak memory.

The model is randomly initialised on the device (no download); the steps are the registered ones
(``get_method("sft", "finetune")``, ``get_method("booster", "align")``), jitted with the state
donated as the training loop does. Each configuration is compiled and warmed up, then timed over
``--steps`` steps (block_until_ready at the end); the median of ``--repeats`` timings is reported.

FLOPs, MFU: one SFT-equivalent pass (forward + backward) is counted as ``6 * N * tokens`` with N
all base parameters (the usual full-fine-tuning convention; LoRA really skips the frozen weights'
gradients, about 4N, and attention's T^2 terms are not counted). An SFT step is one pass over its
batch; a Booster step is three passes (harmful at w, harmful at the perturbed w', alignment at
w), each over a batch of the same size, so ``3 * 6 * N * tokens``. tokens/s counts the tokens of
every pass (a Booster step of batch B x T processes 3 B T). MFU = achieved FLOP/s over the chip's
dense bf16 peak (H100/H200 SXM: ~989 TFLOP/s; ``--peak-tflops`` for others).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PEAKS_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L4": 121.0, "V5P": 459.0,
                "V5E": 197.0, "V5 LITE": 197.0, "V4": 275.0}


def chip_peak(device) -> float | None:
    kind = device.device_kind.upper()
    for name, tf in PEAKS_TFLOPS.items():
        if name in kind:
            return tf * 1e12
    return None


def build(args):
    import jax
    import jax.numpy as jnp

    from booster_jax.config import BoosterConfig, OptimConfig
    from booster_jax.methods.base import Forward, StepContext, get_method, init_state, make_optimizer
    from booster_jax.models.llama import LlamaConfig, LoraSpec, init_params, make_model
    from booster_jax.models.lora import init_lora

    if args.tiny:
        llama = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                            num_kv_heads=2, head_dim=16)
    else:  # the TinyLlama-1.1B shape
        llama = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22,
                            num_heads=32, num_kv_heads=4, head_dim=64, rms_norm_eps=1e-5)
    spec = LoraSpec(r=32, alpha=4.0, targets=("q_proj", "k_proj", "v_proj"))
    model = make_model(llama, spec, args.dtype, args.dtype)
    if args.tiny:  # numpy draws on the eval_shape shapes: no init compilation on a small CPU
        import numpy as np

        rs = np.random.RandomState(0)
        params, lora = (jax.tree.map(lambda x: jnp.asarray(0.02 * rs.standard_normal(x.shape), x.dtype),
                                     jax.eval_shape(f)) for f in (lambda: init_params(model, jax.random.key(0)),
                                                                  lambda: init_lora(jax.random.key(1), llama, spec)))
    else:  # on the device, in its dtype: a 1B model is never materialised on the host
        params = jax.jit(lambda k: init_params(model, k))(jax.random.key(0))
        lora = jax.jit(lambda k: init_lora(k, llama, spec))(jax.random.key(1))
    lora = jax.tree.map(lambda x: x + 1e-3, lora)  # B != 0, like a trained adapter
    optimizer = make_optimizer(OptimConfig(lr=1e-4))
    forward = Forward(model)
    steps = {
        "sft_step": (get_method("sft", "finetune").make_step(StepContext(forward, optimizer)), ("task",)),
        "booster_step": (get_method("booster", "align").make_step(StepContext(forward, optimizer, BoosterConfig())),
                         ("align", "harmful")),
    }
    n_params = sum(x.size for x in jax.tree.leaves(params))
    return llama, params, lora, optimizer, steps, n_params, init_state, jnp


def batch(rows, length, vocab, seed):
    import jax.numpy as jnp
    import numpy as np

    rs = np.random.RandomState(seed)
    ids = rs.randint(1, vocab, size=(rows, length)).astype(np.int32)
    loss = np.zeros((rows, length), np.float32)
    loss[:, length // 4:] = 1.0
    return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.ones((rows, length), jnp.int32),
            "loss_mask": jnp.asarray(loss)}


def eval_phase(args, llama, params, lora, dev) -> list[dict]:
    """One evaluation phase as the pipeline runs it: batched greedy generation with the aligned model,
    then the BeaverDam-shaped judge (the same LLaMA shape with a 14-label head, built on demand in the
    run's dtype) scoring the (prompt, response) pairs; both timed, with the device's peak memory."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from booster_jax.eval import beaver_dam as bd
    from booster_jax.eval.generate import generate
    from booster_jax.models.llama import LoraSpec, make_model

    n, prompt_len = (4, 8) if args.tiny else (args.eval_prompts, 64)
    new_tokens = 4 if args.tiny else args.eval_new_tokens
    rs = np.random.RandomState(7)
    prompts = [list(rs.randint(3, llama.vocab_size, prompt_len)) for _ in range(n)]
    model = make_model(llama, LoraSpec(r=32, alpha=4.0, targets=("q_proj", "k_proj", "v_proj")), args.dtype,
                       args.dtype)
    out = []
    for label in ("warm-up", "timed"):  # the first call compiles
        t0 = time.perf_counter()
        gen = generate(model, params, lora, prompts, max_new_tokens=new_tokens, eos_id=None, pad_id=0,
                       batch_size=min(16, n))
        secs = time.perf_counter() - t0
    tokens = sum(len(g) for g in gen)
    out.append({"step": "generate", "prompts": n, "new_tokens": new_tokens, "tokens_per_s": tokens / secs,
                "seconds": secs})
    judge = make_model(llama, dtype=args.dtype, param_dtype=args.dtype)  # the judge's backbone: no LoRA
    kernel = jnp.asarray(0.02 * rs.standard_normal((llama.hidden_size, len(bd.BEAVERTAILS_CATEGORIES))), args.dtype)
    rows = [p + g for p, g in zip(prompts, gen)]
    length = max(map(len, rows))
    ids = np.zeros((len(rows), length), np.int32)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    pooled = mask.sum(1).astype(np.int32) - 1
    for label in ("warm-up", "timed"):
        t0 = time.perf_counter()
        probs = np.asarray(bd._scores(judge, params, kernel, ids, mask, pooled))
        secs = time.perf_counter() - t0
    try:
        peak = (dev.memory_stats() or {}).get("peak_bytes_in_use", 0) / 1e9
    except Exception:  # noqa: BLE001 - CPU reports nothing
        peak = None
    out.append({"step": "judge", "pairs": len(rows), "pairs_per_s": len(rows) / secs, "seconds": secs,
                "peak_bytes_in_use_gb": peak, "finite": bool(np.isfinite(probs).all())})
    print(f"evaluate: generate {n} prompts x {new_tokens} new tokens: {out[0]['tokens_per_s']:.0f} tok/s; "
          f"judge {len(rows)} pairs: {out[1]['pairs_per_s']:.1f} pairs/s; device peak "
          f"{peak if peak is not None else float('nan'):.2f} GB", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny model, CPU-sized, a few steps")
    ap.add_argument("--batches", default="10,32", help="comma-separated batch sizes (rows per stream)")
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="the chip's dense bf16 peak (0 = by device kind)")
    ap.add_argument("--json", default="", help="also write the results here")
    ap.add_argument("--eval-prompts", type=int, default=64, help="prompts of the evaluation phase")
    ap.add_argument("--eval-new-tokens", type=int, default=256, help="new tokens per prompt in the evaluation phase")
    args = ap.parse_args(argv)
    if args.tiny:
        args.batches, args.length, args.steps, args.repeats, args.dtype = "2", 16, 2, 1, "float32"

    import jax

    dev = jax.devices()[0]
    llama, params, lora, optimizer, steps, n_params, init_state, jnp = build(args)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else chip_peak(dev)
    print(f"device {dev.device_kind} ({jax.default_backend()}, {jax.device_count()} device(s)); model "
          f"{n_params / 1e9:.4g} B params, {args.dtype}; LoRA r 32 q,k,v; length {args.length}; "
          f"peak {peak / 1e12 if peak else float('nan'):.0f} TFLOP/s", flush=True)
    results = []
    for rows in [int(b) for b in args.batches.split(",")]:
        for name, (step, streams) in steps.items():
            passes = 3 if name == "booster_step" else 1
            batches = {s: batch(rows, args.length, llama.vocab_size, i) for i, s in enumerate(streams)}
            jitted = jax.jit(step, donate_argnums=(1,))
            state = init_state(jax.tree.map(jnp.copy, lora), optimizer)
            key = jax.random.key(0)
            t0 = time.perf_counter()
            compiled = jitted.lower(params, state, batches, key).compile()
            compile_s = time.perf_counter() - t0
            mem = compiled.memory_analysis()
            for _ in range(2):  # warm-up
                state, metrics = compiled(params, state, batches, key)
            jax.block_until_ready(state)
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    state, metrics = compiled(params, state, batches, key)
                jax.block_until_ready((state, metrics))
                times.append((time.perf_counter() - t0) / args.steps)
            ms = statistics.median(times) * 1e3
            tokens = passes * rows * args.length
            flops = 6 * n_params * tokens
            r = {"step": name, "batch": rows, "length": args.length, "ms_per_step": ms,
                 "tokens_per_s": tokens / (ms / 1e3), "model_tflops_per_s": flops / (ms / 1e3) / 1e12,
                 "mfu": (flops / (ms / 1e3) / peak) if peak else None, "compile_s": compile_s,
                 "loss": float(metrics["loss"]),
                 "temp_gb": getattr(mem, "temp_size_in_bytes", 0) / 1e9 if mem else None}
            try:
                r["peak_bytes_in_use_gb"] = (dev.memory_stats() or {}).get("peak_bytes_in_use", 0) / 1e9
            except Exception:  # noqa: BLE001 - CPU reports nothing
                r["peak_bytes_in_use_gb"] = None
            results.append(r)
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
            print(f"{name:<13} batch {rows:>3} x {args.length}: {ms:9.2f} ms/step  {r['tokens_per_s']:11.0f} tok/s  "
                  f"{r['model_tflops_per_s']:8.2f} TFLOP/s  MFU {mfu}  (compile {compile_s:.1f} s, XLA temp "
                  f"{r['temp_gb'] if r['temp_gb'] is not None else float('nan'):.2f} GB)", flush=True)
            del state
    results += eval_phase(args, llama, params, lora, dev)
    by = {(r["step"], r["batch"]): r for r in results if "batch" in r}
    for rows in sorted({r["batch"] for r in results if "batch" in r}):
        if ("sft_step", rows) in by and ("booster_step", rows) in by:
            ratio = by[("booster_step", rows)]["ms_per_step"] / by[("sft_step", rows)]["ms_per_step"]
            print(f"batch {rows}: booster_step / sft_step time = {ratio:.2f} (3 passes: ideal 3.0)")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"device": dev.device_kind, "n_params": n_params, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
