"""Forward + backward with gradients for the LoRA weights only: ours (jit) vs transformers + PEFT vs plain JAX.

Same model, LoRA and batch options as ``bench_steps.py`` (``--shape bench|smollm2``, ``--model DIR``);
the loss is the token-mean LM loss over the masked targets everywhere. Ours:
``jax.jit(jax.value_and_grad(loss))`` w.r.t. the LoRA tree; PyTorch: ``model(**batch).loss.backward()``
with the base frozen (PEFT), transformers' default attention (SDPA; ``--eager-row`` adds eager as a
labelled extra); plain JAX: ``bench_steps.plain_jax_loss`` (unrolled, from the maths). Every row is the
median of interleaved calls in one process; the load average is printed.

    python benchmarks/bench_forward_backward.py [--shape bench|smollm2] [--model DIR] [--steps 20] [--threads 1]

``--threads 1`` (the default) pins the whole process to one CPU and torch to one thread, and stops before
the table if a row's CPU / wall (printed per row) exceeds 1.2, exactly as in ``bench_steps.py``.
"""

from __future__ import annotations

import copy
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_steps import (build, check_one_thread, cpu_per_wall, cpu_ratios, interleave, load_avg,  # noqa: E402
                         make_batches, median_ms, parse, plain_jax_loss, plain_jax_weights, shape_line)


def main(argv=None):
    args = parse(argv, __doc__.splitlines()[0])
    import jax
    import jax.numpy as jnp

    from booster_jax.methods.base import lm_loss
    from tests.torch_reference import to_torch

    load_start = load_avg()
    peft_model, params, lora, forward = build(args)
    cfg = forward.model.cfg
    data = make_batches(args, args.steps + 1)
    jdata = [jax.tree.map(jnp.asarray, b["align"]) for b in data]

    # The base weights are an argument, as in the training step: closed over, they would become HLO
    # constants (minutes of constant folding at 135M parameters, and not the program the pipeline runs).
    fb = jax.jit(jax.value_and_grad(lambda w, p, b: lm_loss(forward(w, p, b), b)))
    t0 = time.perf_counter()
    fb = fb.lower(lora, params, jdata[0]).compile()
    compile_s = time.perf_counter() - t0
    frozen, adapters = plain_jax_weights(params, lora, cfg)
    plain = jax.jit(jax.value_and_grad(plain_jax_loss(cfg, forward.model.lora.scaling)))
    losses = {"ours": float(fb(lora, params, jdata[0])[0]), "plain": float(plain(adapters, frozen, jdata[0])[0])}
    runners = {"ours": lambda i: jax.block_until_ready(fb(lora, params, jdata[i])),
               "plain": lambda i: jax.block_until_ready(plain(adapters, frozen, jdata[i]))}
    if not args.skip_torch:
        tdata = [to_torch(b["align"]) for b in data]
        models = {"torch": peft_model}
        if args.eager_row:
            models["torch_eager"] = copy.deepcopy(peft_model)
            models["torch_eager"].set_attn_implementation("eager")
        for name, model in models.items():
            model.train()

            def theirs(i, model=model):
                model.zero_grad(set_to_none=True)
                loss = model(**tdata[i]).loss
                loss.backward()
                return loss.item()

            losses[name] = theirs(0)  # also the warm-up
            runners[name] = theirs
        attn = peft_model.config._attn_implementation
    times, cpu = interleave(runners, args.steps)
    per_wall = {k: cpu_per_wall(times[k], cpu[k]) for k in runners}
    check_one_thread(args, per_wall)
    res = {k: median_ms(v) for k, v in times.items()}

    print(shape_line(args, f"median of {args.steps} calls after a warm-up, interleaved in one process") +
          f"; load average (1/5/15 min) {load_start} at the start, {load_avg()} at the end\n")
    print("| implementation | forward + LoRA backward, median (ms) | ours / PyTorch | ours / plain JAX | min (ms) | "
          "CPU ms (median) | CPU / wall | compile (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    names = {"ours": "booster_jax (jit value_and_grad)", "plain": "plain JAX (jit, unrolled, bench_steps.py)",
             "torch": f"transformers + PEFT (default attention: {attn if not args.skip_torch else '-'})",
             "torch_eager": "extra: transformers + PEFT, eager attention"}
    for k in runners:
        vs_t = f"{res['ours'] / res['torch']:.2f}" if k == "ours" and "torch" in res else "-"
        vs_p = f"{res['ours'] / res['plain']:.2f}" if k == "ours" else "-"
        first = f"{compile_s:.1f}" if k == "ours" else "-"
        print(f"| {names[k]} | {res[k]:.1f} | {vs_t} | {vs_p} | {1000 * min(times[k]):.1f} | {median_ms(cpu[k]):.1f} | "
              f"{per_wall[k]:.2f} | {first} |")
    print("\nthe same ratios from process CPU time: " +
          cpu_ratios(cpu, [("ours/PyTorch", "ours", "torch"), ("ours/plain", "ours", "plain")]))
    print("same loss on the first batch: " + ", ".join(f"{k} {v:.6f}" for k, v in losses.items()))
    print(f"command: python benchmarks/bench_forward_backward.py "
          f"{' '.join(argv if argv is not None else sys.argv[1:])}".rstrip())


if __name__ == "__main__":
    main()
