#!/usr/bin/env python
"""Peak memory of the Booster step over the SFT step, from XLA's compiled memory_analysis().

    python benchmarks/bench_memory.py                 # small LLaMA, batch 10 x 256, float32, one device
    python benchmarks/bench_memory.py --dtype bfloat16 --hidden 1024 --layers 8

Both steps are compiled (never run) on abstract inputs of the same shapes: the alignment and
harmful batches of Booster and the one batch of SFT have the same rows, so the ratio is what
Booster's three passes cost over one. Peak per device = arguments + outputs - aliased (donated
state) + temporaries. Reported for:

* ``booster``: the registered step (booster.py; it runs its passes as one ``lax.scan``);
* ``booster-sequenced``: the three passes as plain calls (booster.py before the scan) with ``jax.lax.optimization_barrier`` between the passes
  (it does not help: the passes already run in order; what costs memory is that XLA allocates
  the stacked scan residuals of *every* pass at the start of the program -- the zero-init
  broadcasts are CSE'd into one and their copies scheduled first);
* ``booster-scan``: the three passes as the iterations of one ``lax.scan`` (bitwise the same
  update): a loop body's buffers are reused across iterations, so one pass's activations are
  allocated at a time -- the memory of the official code's sequential passes;
* ``booster_vaccine``: the registered Booster + Vaccine step (four passes in Booster's pass engine,
  one ``lax.scan``), and ``booster_vaccine-plain``: its four passes as plain calls (its form before
  the pass engine), and ``vaccine`` (two plain passes) for reference;
* the plan's analytic activation estimate, for comparison.

The numbers are the compiling backend's (CPU here: its buffer assignment is a proxy for a GPU's,
which differs in fusion and in the bf16 handling of dots).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402


def sequenced_booster_step(ctx):
    """Booster's update with the passes forced into order (a barrier ties each pass to the previous one)."""
    from booster_jax.config import BoosterConfig
    from booster_jax.methods.base import apply_gradients, global_norm
    from booster_jax.methods.sft import lm_value_and_grad

    cfg = ctx.cfg or BoosterConfig()
    lam, alpha, eps = float(cfg.lam), float(cfg.alpha), float(cfg.eps)
    vg = lm_value_and_grad(ctx.forward)

    def step(frozen, state, batches, rng):
        w = state.trainable
        h, g1 = vg(w, frozen, batches["harmful"], None)
        g1_norm = global_norm(g1)
        perturbed = jax.tree.map(lambda p, g: p - (alpha / (g1_norm + eps) * g).astype(p.dtype), w, g1)
        perturbed, g1 = jax.lax.optimization_barrier((perturbed, g1))
        hp, g2 = vg(perturbed, frozen, batches["harmful"], None)
        w, g2 = jax.lax.optimization_barrier((w, g2))  # the alignment pass starts after pass 2
        f, g3 = vg(w, frozen, batches["align"], None)
        grads = jax.tree.map(lambda a, b, c: a + lam * b - lam * c, g3, g1, g2)
        return apply_gradients(state, grads, ctx.optimizer), {"loss": f, "harmful_loss": h,
                                                              "harmful_loss_perturbed": hp}

    return step


def scanned_booster_step(ctx):
    """Booster's update with its three passes as the iterations of one ``lax.scan`` (harmful at w, harmful at
    w', alignment at w): a loop body's buffers are reused from one iteration to the next, so only one pass's
    activations are ever allocated. Needs the two batches in one shape (pad the shorter to the longer
    bucket: zero-mask rows/columns change no loss)."""
    import jax.numpy as jnp

    from booster_jax.config import BoosterConfig
    from booster_jax.methods.base import apply_gradients, global_norm
    from booster_jax.methods.sft import lm_value_and_grad

    cfg = ctx.cfg or BoosterConfig()
    lam, alpha, eps = float(cfg.lam), float(cfg.alpha), float(cfg.eps)
    vg = lm_value_and_grad(ctx.forward)

    def step(frozen, state, batches, rng):
        w = state.trainable
        h_b, a_b = batches["harmful"], batches["align"]
        stacked = jax.tree.map(lambda h, a: jnp.stack([h, h, a]), h_b, a_b)

        def body(g1, xs):
            i, batch = xs
            scale = jnp.where(i == 1, alpha / (global_norm(g1) + eps), 0.0)
            wi = jax.tree.map(lambda p, g: p - (scale * g).astype(p.dtype), w, g1)
            loss, g = vg(wi, frozen, batch, None)
            return jax.tree.map(lambda c, n: jnp.where(i == 0, n, c), g1, g), (loss, g)

        _, (losses, gs) = jax.lax.scan(body, jax.tree.map(jnp.zeros_like, w), (jnp.arange(3), stacked))
        g1, g2, g3 = (jax.tree.map(lambda x, k=k: x[k], gs) for k in range(3))
        grads = jax.tree.map(lambda a, b, c: a + lam * b - lam * c, g3, g1, g2)
        return apply_gradients(state, grads, ctx.optimizer), {"loss": losses[2], "harmful_loss": losses[0],
                                                              "harmful_loss_perturbed": losses[1]}

    return step


def plain_booster_vaccine_step(ctx):
    """Booster + Vaccine's update with its four passes as plain calls (its form before the pass engine)."""
    from booster_jax.methods.base import apply_gradients
    from booster_jax.methods.booster import booster_update
    from booster_jax.methods.sft import lm_value_and_grad
    from booster_jax.methods.vaccine import vaccine_gradient

    bc, rho = ctx.cfg.booster, float(ctx.cfg.vaccine.rho)
    vg = lm_value_and_grad(ctx.forward)

    def step(frozen, state, batches, rng):
        w = state.trainable
        h, g1 = vg(w, frozen, batches["harmful"], None)
        scale = bc.alpha / (jax.tree.reduce(lambda a, x: a + jnp.sum(x * x), g1, 0.0) ** 0.5 + bc.eps)
        hp, g2 = vg(jax.tree.map(lambda p, g: p - (scale * g).astype(p.dtype), w, g1), frozen,
                    batches["harmful"], None)
        g3, m = vaccine_gradient(ctx.forward, rho, w, frozen, batches["align"])
        grads = booster_update(g3, g1, g2, bc.lam)
        return apply_gradients(state, grads, ctx.optimizer), {"loss": m["loss"], "harmful_loss": h,
                                                              "harmful_loss_perturbed": hp}

    return step


def measure(args) -> dict:
    from booster_jax.config import AlignConfig, BoosterConfig, OptimConfig, VaccineConfig
    from booster_jax.methods.base import Forward, StepContext, get_method, init_state, make_optimizer, method_config
    from booster_jax.models.llama import LlamaConfig, LoraSpec, init_params, make_model
    from booster_jax.models.lora import init_lora
    from booster_jax.plan import activation_bytes

    heads = args.hidden // args.head_dim
    llama = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.6875),
                        num_layers=args.layers, num_heads=heads, num_kv_heads=heads, head_dim=args.head_dim)
    spec = LoraSpec(r=32, alpha=4.0, targets=("q_proj", "k_proj", "v_proj"))
    model = make_model(llama, spec, args.dtype, args.dtype)
    forward = Forward(model)
    optimizer = make_optimizer(OptimConfig())
    params = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
    lora = jax.eval_shape(lambda: init_lora(jax.random.key(0), llama, spec))
    state = jax.eval_shape(lambda: init_state(lora, optimizer))
    b = {"input_ids": jax.ShapeDtypeStruct((args.batch, args.length), jnp.int32),
         "attention_mask": jax.ShapeDtypeStruct((args.batch, args.length), jnp.int32),
         "loss_mask": jax.ShapeDtypeStruct((args.batch, args.length), jnp.float32)}
    if args.head_positions:  # collate's target_index: the LM head and the loss at K positions per row
        b["target_index"] = jax.ShapeDtypeStruct((args.batch, args.head_positions), jnp.int32)
    key = jax.eval_shape(lambda: jax.random.key(0))
    bv = method_config(get_method("booster_vaccine", "align"), AlignConfig())
    steps = {
        "sft": (get_method("sft", "finetune").make_step(StepContext(forward, optimizer)), {"task": b}),
        "booster": (get_method("booster", "align").make_step(StepContext(forward, optimizer, BoosterConfig())),
                    {"align": b, "harmful": b}),
        "booster-sequenced": (sequenced_booster_step(StepContext(forward, optimizer, BoosterConfig())),
                              {"align": b, "harmful": b}),
        "booster-scan": (scanned_booster_step(StepContext(forward, optimizer, BoosterConfig())),
                         {"align": b, "harmful": b}),
        "vaccine": (get_method("vaccine", "align").make_step(StepContext(forward, optimizer, VaccineConfig())),
                    {"align": b}),
        "booster_vaccine": (get_method("booster_vaccine", "align").make_step(StepContext(forward, optimizer, bv)),
                            {"align": b, "harmful": b}),
        "booster_vaccine-plain": (plain_booster_vaccine_step(StepContext(forward, optimizer, bv)),
                                  {"align": b, "harmful": b}),
    }
    out = {}
    for name, (step, batches) in steps.items():
        m = jax.jit(step, donate_argnums=(1,)).lower(params, state, batches, key).compile().memory_analysis()
        peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
        out[name] = {"argument": m.argument_size_in_bytes, "temp": m.temp_size_in_bytes, "peak": peak}
    n = sum(x.size for x in jax.tree.leaves(params))
    out["_model"] = {"params": n, "analytic_activations": activation_bytes(
        llama, args.batch, args.length, jnp.dtype(args.dtype).itemsize, 1, spec.r, len(spec.targets),
        head_positions=args.head_positions or None)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--head-dim", type=int, default=64, help="heads = hidden / head-dim (Llama-2: 128)")
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--head-positions", type=int, default=0,
                    help="K: the batches carry target_index [batch, K], so the LM head runs at K positions per row "
                         "(as collate builds them); 0 = the head at every position (before issue 27)")
    args = ap.parse_args(argv)
    r = measure(args)
    model = r.pop("_model")
    print(f"backend {jax.default_backend()}; LLaMA hidden {args.hidden}, {args.layers} layers, vocab {args.vocab} "
          f"({model['params'] / 1e6:.1f} M params, {args.dtype}); LoRA r 32 q,k,v; batch {args.batch} x {args.length}; "
          f"LM head at {args.head_positions or args.length} positions per row")
    print(f"{'step':<23}{'arguments MB':>14}{'temporaries MB':>16}{'peak MB':>10}{'peak / SFT':>12}")
    for name, m in r.items():
        print(f"{name:<23}{m['argument'] / 1e6:14.1f}{m['temp'] / 1e6:16.1f}{m['peak'] / 1e6:10.1f}"
              f"{m['peak'] / r['sft']['peak']:12.2f}")
    print(f"(the plan's analytic activation estimate for one pass: {model['analytic_activations'] / 1e6:.1f} MB)")
    print(f"RATIO booster/sft peak = {r['booster']['peak'] / r['sft']['peak']:.2f}; sequenced "
          f"{r['booster-sequenced']['peak'] / r['sft']['peak']:.2f}; scanned passes "
          f"{r['booster-scan']['peak'] / r['sft']['peak']:.2f}; booster_vaccine "
          f"{r['booster_vaccine']['peak'] / r['sft']['peak']:.2f} (plain calls "
          f"{r['booster_vaccine-plain']['peak'] / r['sft']['peak']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
