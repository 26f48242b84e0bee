"""Steady-state training-step time: our jitted Booster and SFT steps vs the PyTorch reference (eager).

A random LLaMA (default hidden 256, 4 layers, vocab 1000) in float32 with a LoRA (r 32, alpha 4,
q/k/v: the paper's adapter), batches of 10 x 64 tokens (right-padded, mixed lengths, prompts masked)
for the alignment and the harmful streams. Ours: ``jax.jit`` of the registered step, timed with
``block_until_ready`` after a compiling call (compile time reported apart). Theirs:
``tests/torch_reference.TorchReference`` (the official trainer step on transformers + PEFT, eager),
same weights, same batches, AdamW + clipping 1.0. Prints a Markdown table and the command.

    python benchmarks/bench_steps.py [--steps 20] [--batch 10] [--seq 64] [--hidden 256] [--layers 4]
                                     [--vocab 1000] [--rank 32] [--threads 0]

``--threads N`` sets torch's threads and, for N = 1, XLA's CPU backend to one thread too;
0 (the default) means all cores for both (torch.set_num_threads(os.cpu_count())).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def model_options(description: str) -> argparse.ArgumentParser:
    """The model and batch options shared by the step benchmarks (bench_steps, bench_methods)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--steps", type=int, default=20, help="timed steps per method (median reported)")
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--lora-alpha", type=float, default=4.0)
    return p


def parse_with_threads(p: argparse.ArgumentParser, argv):
    """Parse; ``--threads 1`` pins XLA's CPU backend to one thread (before jax initialises it)."""
    args = p.parse_args(argv)
    if args.threads == 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()
    return args


def parse(argv, description):
    p = model_options(description)
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (and XLA if 1); 0 = all cores")
    p.add_argument("--skip-torch", action="store_true")
    return parse_with_threads(p, argv)


def build(args):
    """The same random base model and PEFT-initialised LoRA for both sides, and a stream of batches."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from booster_jax.methods.base import Forward
    from booster_jax.models import hf
    from booster_jax.models.llama import make_model
    from booster_jax.models.lora import load_peft

    torch.set_num_threads(args.threads or os.cpu_count())
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=args.vocab, hidden_size=args.hidden,
                                  intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                                  num_attention_heads=args.heads, num_key_value_heads=args.heads,
                                  max_position_embeddings=1024, tie_word_embeddings=False)
    base = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float()
    conf = LoraConfig(r=args.rank, lora_alpha=args.lora_alpha, target_modules=["q_proj", "k_proj", "v_proj"],
                      lora_dropout=0.0, task_type="CAUSAL_LM")
    with tempfile.TemporaryDirectory() as d:
        base.save_pretrained(os.path.join(d, "base"))  # before PEFT wraps the projections
        peft_model = get_peft_model(base, conf)
        cfg = hf.read_config(os.path.join(d, "base"))
        params = hf.load_params(os.path.join(d, "base"), cfg)
        peft_model.save_pretrained(os.path.join(d, "lora"))
        lora, spec = load_peft(os.path.join(d, "lora"), cfg)
    return peft_model, params, lora, Forward(make_model(cfg, spec))


def make_batches(args, n):
    import numpy as np

    from tests.torch_reference import synthetic_batch

    rng = np.random.default_rng(0)

    def one(seed):
        lengths = rng.integers(args.seq // 2, args.seq + 1, args.batch)
        lengths[0] = args.seq
        prompts = [int(rng.integers(1, n_ // 2 + 1)) for n_ in lengths]
        return synthetic_batch(args.vocab, lengths, prompts, args.seq, seed=seed)

    return [{"align": one(2 * i), "harmful": one(2 * i + 1)} for i in range(n)]


def median_ms(times):
    return 1000 * statistics.median(times)


def host_line(args, torch):
    return (f"host {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"torch threads {torch.get_num_threads()}, XLA threads {'1' if args.threads == 1 else 'default'}, "
            f"load average {os.getloadavg()[0]:.1f} at the end")


def main(argv=None):
    args = parse(argv, __doc__.splitlines()[0])
    import jax
    import jax.numpy as jnp
    import torch

    from booster_jax.config import BoosterConfig, OptimConfig
    from booster_jax.methods.base import StepContext, get_method, init_state, make_optimizer
    from tests.torch_reference import TorchReference, to_torch

    peft_model, params, lora, forward = build(args)
    data = make_batches(args, args.steps + 1)
    jdata = [jax.tree.map(jnp.asarray, b) for b in data]
    optim = OptimConfig(lr=5e-4, weight_decay=0.1, max_grad_norm=1.0)
    booster = BoosterConfig(lam=5.0, alpha=0.1)
    compile_s, runners = {}, {}

    for method in ("sft", "booster"):
        optimizer = make_optimizer(optim)
        step = jax.jit(get_method(method, "align").make_step(StepContext(forward, optimizer, booster)))
        box = {"state": init_state(lora, optimizer)}

        def run(i, step=step, box=box):
            box["state"], m = step(params, box["state"], jdata[i], jax.random.key(i))
            jax.block_until_ready((box["state"], m))

        t0 = time.perf_counter()
        run(0)
        compile_s[method] = time.perf_counter() - t0
        runners[("jax", method)] = run

    if not args.skip_torch:
        tdata = [{k: to_torch(v) for k, v in b.items()} for b in data]
        for method in ("sft", "booster"):
            ref = TorchReference(copy.deepcopy(peft_model), lr=optim.lr, weight_decay=optim.weight_decay,
                                 max_grad_norm=optim.max_grad_norm, lam=booster.lam, alpha=booster.alpha)
            if method == "booster":
                run = lambda i, ref=ref: ref.booster_step(tdata[i]["align"], tdata[i]["harmful"])
            else:
                run = lambda i, ref=ref: ref.sft_step(tdata[i]["align"])
            run(0)  # warm-up (allocator, first-call overheads)
            runners[("torch", method)] = run

    # Interleaved rounds: on a shared host the load drifts, and timing one method after the other would
    # charge the drift to whichever ran during the busy minute.
    times = {k: [] for k in runners}
    for i in range(1, args.steps + 1):
        for key, run in runners.items():
            t0 = time.perf_counter()
            run(i)
            times[key].append(time.perf_counter() - t0)
    results = {k: median_ms(v) for k, v in times.items()}
    best = {k: 1000 * min(v) for k, v in times.items()}

    print(f"model: hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, {args.heads} heads, "
          f"vocab {args.vocab}, float32; LoRA r {args.rank} alpha {args.lora_alpha:g} on q,k,v; batches "
          f"{args.batch} x {args.seq} tokens (align + harmful); median of {args.steps} steps after a warm-up step, "
          f"the four runs interleaved step by step; JAX {jax.__version__} on {jax.devices()[0].platform}, "
          f"torch {torch.__version__} eager on cpu; "
          f"{host_line(args, torch)}\n")
    print("| implementation | method | ms / step (median) | Booster / SFT | JAX / PyTorch | min ms | "
          "first call incl. compile (s) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for impl in ("jax", "torch"):
        for method in ("sft", "booster"):
            if (impl, method) not in results:
                continue
            ms = results[(impl, method)]
            ratio = f"{ms / results[(impl, 'sft')]:.2f}" if method == "booster" else "-"
            vs = f"{ms / results[('torch', method)]:.2f}" if impl == "jax" and ("torch", method) in results else "-"
            name = "booster_jax (jit)" if impl == "jax" else "PyTorch reference (eager)"
            first = f"{compile_s[method]:.1f}" if impl == "jax" else "-"
            print(f"| {name} | {method} | {ms:.1f} | {ratio} | {vs} | {best[(impl, method)]:.1f} | {first} |")
    given = " ".join(argv if argv is not None else sys.argv[1:])
    print(f"\ncommand: python benchmarks/bench_steps.py {given}".rstrip())


if __name__ == "__main__":
    main()
