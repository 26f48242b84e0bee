"""Forward + backward with gradients for the LoRA weights only: ours (jit) vs transformers + PEFT (eager).

Same model, LoRA and batch shapes as ``bench_steps.py`` (default hidden 256, 4 layers, vocab 1000,
LoRA r 32 on q,k,v, batch 10 x 64); the loss is the token-mean LM loss over the masked targets on
both sides. Ours: ``jax.jit(jax.value_and_grad(loss))`` w.r.t. the LoRA tree; theirs:
``model(**batch).loss.backward()`` with the base frozen (PEFT). Prints the median times, the
ratio and the command.

    python benchmarks/bench_forward_backward.py [--steps 20] [--batch 10] [--seq 64] [--threads 0]
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_steps import build, host_line, make_batches, median_ms, parse  # noqa: E402


def main(argv=None):
    args = parse(argv, __doc__.splitlines()[0])
    import jax
    import jax.numpy as jnp
    import torch

    from booster_jax.methods.base import lm_loss
    from tests.torch_reference import to_torch

    peft_model, params, lora, forward = build(args)
    data = make_batches(args, args.steps + 1)

    fb = jax.jit(jax.value_and_grad(lambda w, b: lm_loss(forward(w, params, b), b)))
    jdata = [jax.tree.map(jnp.asarray, b["align"]) for b in data]
    t0 = time.perf_counter()
    jax.block_until_ready(fb(lora, jdata[0]))
    compile_s = time.perf_counter() - t0
    peft_model.train()
    tdata = [to_torch(b["align"]) for b in data]

    def theirs(b):
        peft_model.zero_grad(set_to_none=True)
        loss = peft_model(**b).loss
        loss.backward()
        return loss

    theirs(tdata[0])  # warm-up
    times = {"ours": [], "theirs": []}
    for i in range(1, args.steps + 1):  # interleaved, so load drift on a shared host hits both alike
        t0 = time.perf_counter()
        jax.block_until_ready(fb(lora, jdata[i]))
        times["ours"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        theirs(tdata[i])
        times["theirs"].append(time.perf_counter() - t0)
    ours, ref = median_ms(times["ours"]), median_ms(times["theirs"])
    # the two compute the same thing: compare the losses of the last batch
    loss_ours = float(fb(lora, jdata[-1])[0])
    loss_ref = theirs(tdata[-1]).item()

    print(f"model: hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, {args.heads} heads, "
          f"vocab {args.vocab}, float32; LoRA r {args.rank} on q,k,v; batch {args.batch} x {args.seq}; median of "
          f"{args.steps} calls after a warm-up call, interleaved; JAX {jax.__version__} on "
          f"{jax.devices()[0].platform}, torch {torch.__version__} eager on cpu; {host_line(args, torch)}\n")
    print("| implementation | forward + LoRA backward, median (ms) | JAX / PyTorch | min (ms) | "
          "first call incl. compile (s) |")
    print("|---|---:|---:|---:|---:|")
    print(f"| booster_jax (jit value_and_grad) | {ours:.1f} | {ours / ref:.2f} | {1000 * min(times['ours']):.1f} | "
          f"{compile_s:.1f} |")
    print(f"| transformers + PEFT (eager) | {ref:.1f} | - | {1000 * min(times['theirs']):.1f} | - |")
    print(f"\nsame loss on the last batch: ours {loss_ours:.6f}, reference {loss_ref:.6f}")
    print(f"command: python benchmarks/bench_forward_backward.py "
          f"{' '.join(argv if argv is not None else sys.argv[1:])}".rstrip())


if __name__ == "__main__":
    main()
