"""A tiny SFT-like stage for the checkpoint/resume tests (run as ``python -m tests.resume_worker``).

Tiny random Llama (hidden 16, 2 layers, vocab 50) with LoRA on q/k/v, AdamW via the method
contract, two batch streams (a finite "align" stream that rolls over epochs, an infinite
"harmful" one) and a step that uses its RNG key, so the state, both stream positions and the
key must all be restored for a resumed run to match an uninterrupted one bit for bit.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from booster_jax.config import OptimConfig, RunConfig
from booster_jax.data.batches import BatchStream
from booster_jax.methods.base import Forward, apply_gradients, init_state, lm_loss, make_optimizer
from booster_jax.models.llama import LlamaConfig, LoraSpec, init_params, make_model
from booster_jax.models.lora import init_lora

CFG = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                  num_kv_heads=2, head_dim=8)
SPEC = LoraSpec(r=4, alpha=8.0, targets=("q_proj", "k_proj", "v_proj"))
BUCKETS = (16,)
# Light XLA optimisation: a quarter of the compile time on 2 CPU cores. Every run of a comparison
# uses the same options, so bitwise equality is still a fair test of resuming.
FAST_XLA = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
JIT_KWARGS = {"compiler_options": FAST_XLA}


def make_items(n: int, seed: int):
    rs = np.random.RandomState(seed)
    items = []
    for _ in range(n):
        length = rs.randint(4, 15)
        ids = rs.randint(1, CFG.vocab_size, size=length).astype(np.int32)
        mask = np.zeros(length, np.float32)
        mask[length // 2:] = 1.0  # the second half is the "response"
        items.append((ids, mask))
    return items


def make_streams():
    return {
        "align": BatchStream(make_items(22, 1), 4, seed=3, pad_id=0, buckets=BUCKETS),
        "harmful": BatchStream(make_items(9, 2), 3, seed=4, pad_id=0, buckets=BUCKETS, infinite=True),
    }


def make_step(optimizer):
    """SFT on "align" plus an rng-drawn perturbation of the gradient (makes the key and "harmful" matter).

    ``frozen = {"params": base weights, "nan_at": int32}``: from step ``nan_at`` (1-based) on, the
    loss and the update are NaN. A runtime value, so the NaN tests share one compiled step.
    """
    forward = Forward(make_model(CFG, SPEC))

    def step(frozen, state, batches, rng):
        def loss_fn(trainable):
            return lm_loss(forward(trainable, frozen["params"], batches["align"]), batches["align"])

        loss, grads = jax.value_and_grad(loss_fn)(state.trainable)
        # the harmful stream steers the noise, so its position matters too (without a second forward)
        harmful = batches["harmful"]
        rng = jax.random.fold_in(rng, jnp.sum(harmful["input_ids"] * harmful["attention_mask"]))
        leaves, treedef = jax.tree.flatten(grads)
        keys = jax.random.split(rng, len(leaves))
        grads = treedef.unflatten([g + 1e-3 * jax.random.normal(k, g.shape, g.dtype) for g, k in zip(leaves, keys)])
        poison = jnp.where(state.step + 1 >= frozen["nan_at"], jnp.nan, 0.0)
        loss = loss + poison
        grads = jax.tree.map(lambda g: g + poison, grads)
        new = apply_gradients(state, grads, optimizer)
        return new, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    return step


def build(nan_at: int = 2**30):
    """(frozen, state, step_fn, streams, rng) of the tiny stage, the same on every call."""
    model = make_model(CFG, SPEC)
    frozen = jax.jit(init_params, static_argnums=0, **JIT_KWARGS)(model, jax.random.key(0))  # eager is slow
    lora = jax.jit(init_lora, static_argnums=(1, 2), **JIT_KWARGS)(jax.random.key(1), CFG, SPEC)
    optimizer = make_optimizer(OptimConfig(lr=5e-3, weight_decay=0.1))
    state = init_state(lora, optimizer)
    frozen = {"params": frozen, "nan_at": jnp.int32(nan_at)}
    return frozen, state, make_step(optimizer), make_streams(), jax.random.key(7)


def leaves_np(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def main(argv=None):
    from booster_jax.train.checkpoint import StageStore
    from booster_jax.train.loop import Reporting, StepProgram, run_stage

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--log-every", type=int, default=4)
    ap.add_argument("--sleep", type=float, default=0.0, help="seconds after each step, so a parent can kill us")
    args = ap.parse_args(argv)

    frozen, state, step_fn, streams, rng = build()
    run_cfg = dataclasses.replace(RunConfig(), checkpoint_every=args.every, keep_last=2, log_every=args.log_every)
    store = StageStore.from_run_config(os.path.join(args.out, "stage"), run_cfg, fingerprint="tiny-sft")
    progress_path = os.path.join(args.out, "progress")

    def on_step(step, state, metrics):
        with open(progress_path, "w") as fh:
            fh.write(str(step))
        if args.sleep:
            time.sleep(args.sleep)

    # keep the final rng: run_stage does not return it, so recompute it from the checkpoint's JSON
    report = Reporting.for_run(run_cfg, metrics_path=os.path.join(args.out, "metrics.jsonl"), tokens_key="align",
                               progress=False, on_step=on_step)
    state, summary = run_stage(name="tiny", store=store, program=StepProgram(step_fn, JIT_KWARGS), frozen=frozen,
                               state=state, streams=streams, total_steps=args.steps, rng=rng, report=report)
    _, record = store.restore_latest(state)
    store.close()
    np.savez(os.path.join(args.out, "result.npz"), *leaves_np(state))
    with open(os.path.join(args.out, "result.json"), "w") as fh:
        json.dump({"streams": {k: s.state() for k, s in streams.items()}, "rng": record["rng"],
                   "summary": summary, "step": int(state.step)}, fh)
    print("finished", summary["steps"], file=sys.stderr)


if __name__ == "__main__":
    main()
