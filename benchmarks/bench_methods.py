"""Steady-state ms/step of every training method's jitted step, and its ratio to SFT in the same stage.

Same model and batches as ``benchmarks/bench_steps.py`` (a random LLaMA, default hidden 256, 4
layers, vocab 1000, float32; LoRA r 32, alpha 4 on q/k/v; batches of 10 x 64 tokens, right-padded,
mixed lengths, prompts masked). Alignment methods (sft, booster, vaccine, repnoise, booster_vaccine)
read an alignment and a harmful batch, fine-tuning methods (sft, lisa) a task and an alignment batch.
Each registered step is jitted, called once to compile (reported apart), then timed with
``block_until_ready`` for ``--steps`` rounds, all methods interleaved step by step so load drift
on a shared host is spread evenly. Coefficients are the official ones (they do not change the cost);
Lisa runs its default schedule, so a short run times its alignment phase (the fine-tuning phase is the
same computation on the other stream).

    python benchmarks/bench_methods.py [--steps 20] [--batch 10] [--seq 64] [--hidden 256] [--layers 4]
                                       [--vocab 1000] [--rank 32] [--threads 0] [--methods sft,booster,...]

``--threads 1`` pins the whole process to one CPU before jax starts (``bench_steps.pin_threads``; XLA's
thread flags alone do not bound its pool) and stops before the table if a row's CPU / wall, printed
per row, exceeds 1.2; the default 0 leaves XLA its own threads.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ALIGN = ("sft", "booster", "vaccine", "repnoise", "booster_vaccine")
FINETUNE = ("sft", "lisa")
# forward+backward passes per step (RepNoise: two forwards, L + 2 vocabulary projections, one backward)
PASSES = {("align", "sft"): "1", ("align", "booster"): "3", ("align", "vaccine"): "2",
          ("align", "repnoise"): "2 fwd + 1 bwd", ("align", "booster_vaccine"): "4",
          ("finetune", "sft"): "1", ("finetune", "lisa"): "1"}


def parse(argv):
    from benchmarks.bench_steps import model_options, parse_with_threads, thread_options

    p = thread_options(model_options(__doc__.splitlines()[0]), default=0)
    p.add_argument("--methods", default="", help="comma-separated subset, e.g. sft,vaccine (default: all)")
    return parse_with_threads(p, argv)


def main(argv=None):
    args = parse(argv)
    import jax
    import jax.numpy as jnp

    from benchmarks.bench_steps import build, check_one_thread, cpu_per_wall, interleave, make_batches, threads_note
    from booster_jax.config import AlignConfig, FinetuneConfig, OptimConfig
    from booster_jax.methods.base import StepContext, get_method, init_state, make_optimizer, method_config

    _, params, lora, forward = build(args)
    data = make_batches(args, args.steps + 1)
    jdata = [jax.tree.map(jnp.asarray, {**b, "task": b["harmful"]}) for b in data]
    optim = OptimConfig(lr=5e-4, weight_decay=0.1, max_grad_norm=1.0)
    align_cfg, finetune_cfg = AlignConfig(), FinetuneConfig()
    wanted = set(filter(None, args.methods.split(",")))
    plan = [("align", m) for m in ALIGN] + [("finetune", m) for m in FINETUNE]
    plan = [(s, m) for s, m in plan if not wanted or m in wanted]

    compile_s, runners = {}, {}
    for stage, method in plan:
        spec = get_method(method, stage)
        stage_cfg = align_cfg if stage == "align" else finetune_cfg
        section = method_config(spec, stage_cfg)
        optimizer = make_optimizer(optim)
        step = jax.jit(spec.make_step(StepContext(forward, optimizer, section)))
        extra = spec.init_extra(lora, params, section) if spec.init_extra else ()
        box = {"state": init_state(lora, optimizer, extra)}

        def run(i, step=step, box=box, names=spec.streams):
            box["state"], m = step(params, box["state"], {k: jdata[i][k] for k in names}, jax.random.key(i))
            jax.block_until_ready((box["state"], m))

        t0 = time.perf_counter()
        run(0)
        compile_s[(stage, method)] = time.perf_counter() - t0
        runners[(stage, method)] = run

    times, cpu = interleave(runners, args.steps)
    per_wall = {k: cpu_per_wall(times[k], cpu[k]) for k in runners}
    check_one_thread(args, {" ".join(k): r for k, r in per_wall.items()})
    med = {k: 1000 * statistics.median(v) for k, v in times.items()}
    best = {k: 1000 * min(v) for k, v in times.items()}

    print(f"model: hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, {args.heads} heads, "
          f"vocab {args.vocab}, float32; LoRA r {args.rank} alpha {args.lora_alpha:g} on q,k,v; batches "
          f"{args.batch} x {args.seq} tokens per stream; median of {args.steps} steps after a compiling call, "
          f"methods interleaved step by step; JAX {jax.__version__} on {jax.devices()[0].platform}; "
          f"{os.cpu_count()} CPUs, {threads_note(args)}, "
          f"load average {os.getloadavg()[0]:.1f} at the end\n")
    print("| stage | method | fwd+bwd passes | ms / step (median) | / SFT (same stage) | min ms | "
          "CPU / wall | first call incl. compile (s) |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for stage, method in plan:
        key = (stage, method)
        ratio = f"{med[key] / med[(stage, 'sft')]:.2f}" if (stage, "sft") in med else "-"
        print(f"| {stage} | {method} | {PASSES[key]} | {med[key]:.1f} | {ratio} | {best[key]:.1f} | "
              f"{per_wall[key]:.2f} | {compile_s[key]:.1f} |")
    given = " ".join(argv if argv is not None else sys.argv[1:])
    print(f"\ncommand: python benchmarks/bench_methods.py {given}".rstrip())


if __name__ == "__main__":
    main()
