#!/usr/bin/env python
"""model.remat on CPU: step time and XLA memory of the SFT and Booster steps per policy.

    python benchmarks/bench_remat.py                  # small LLaMA, batch 10 x 256, float32
    python benchmarks/bench_remat.py --hidden 1024 --layers 8 --steps 5

Each policy's step is compiled on the same shapes (XLA memory_analysis: temporaries and peak =
arguments + outputs - aliased + temporaries) and run ``--steps`` times after a warm-up, the
policies interleaved round by round (so a loaded host slows them alike); the median is reported
and the ratio to "none". What remat buys is memory; its price is the recomputed forward.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

POLICIES = ("none", "dots", "full")


def main(argv=None) -> int:
    from booster_jax.config import BoosterConfig, OptimConfig
    from booster_jax.methods.base import Forward, StepContext, get_method, init_state, make_optimizer
    from booster_jax.models.llama import LlamaConfig, LoraSpec, init_params, make_model
    from booster_jax.models.lora import init_lora

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args(argv)
    llama = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.6875),
                        num_layers=args.layers, num_heads=args.hidden // 64, num_kv_heads=args.hidden // 64,
                        head_dim=64)
    spec = LoraSpec(r=32, alpha=4.0, targets=("q_proj", "k_proj", "v_proj"))
    optimizer = make_optimizer(OptimConfig())
    rs = np.random.RandomState(0)
    b = {"input_ids": jnp.asarray(rs.randint(1, args.vocab, (args.batch, args.length)), jnp.int32),
         "attention_mask": jnp.ones((args.batch, args.length), jnp.int32),
         "loss_mask": jnp.ones((args.batch, args.length), jnp.float32)}
    params = init_params(make_model(llama, spec), jax.random.key(0))
    lora = init_lora(jax.random.key(1), llama, spec)
    runs = {}
    for method, batches, section in (("sft", {"task": b}, None), ("booster", {"align": b, "harmful": b}, BoosterConfig())):
        stage = "finetune" if method == "sft" else "align"
        for policy in POLICIES:
            fwd = Forward(make_model(llama, spec, remat=policy))
            step = jax.jit(get_method(method, stage).make_step(StepContext(fwd, optimizer, section)))
            state = init_state(lora, optimizer)
            compiled = step.lower(params, state, batches, jax.random.key(0)).compile()
            m = compiled.memory_analysis()
            peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
            jax.block_until_ready(compiled(params, state, batches, jax.random.key(0)))  # warm-up
            runs[(method, policy)] = {"fn": compiled, "state": state, "batches": batches, "temp": m.temp_size_in_bytes,
                                      "peak": peak, "times": []}
    for _ in range(args.steps):  # interleaved rounds
        for r in runs.values():
            t = time.perf_counter()
            jax.block_until_ready(r["fn"](params, r["state"], r["batches"], jax.random.key(0)))
            r["times"].append(time.perf_counter() - t)
    load = os.getloadavg()[0]
    print(f"backend {jax.default_backend()}; LLaMA hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, "
          f"float32; LoRA r 32 q,k,v; batch {args.batch} x {args.length}; {args.steps} interleaved steps, "
          f"load average {load:.1f}")
    print(f"{'step':<10}{'model.remat':<13}{'temporaries MB':>15}{'peak MB':>10}{'step s':>9}{'time / none':>13}")
    for (method, policy), r in runs.items():
        med = statistics.median(r["times"])
        base = statistics.median(runs[(method, "none")]["times"])
        print(f"{method:<10}{policy:<13}{r['temp'] / 1e6:15.1f}{r['peak'] / 1e6:10.1f}{med:9.3f}{med / base:13.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
